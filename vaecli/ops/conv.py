"""The temporal convolution of SVD's decoder as per-pixel matrix products, without permutes.

SVD's `time_stack` and `time_mix_conv` are Conv3d with kernel (k, 1, 1): at every pixel, output frame i is
Σ_j W_j · x[i + j - k//2] + bias, a (C_out × C_in) matrix product per tap over neighbouring frames, zero outside
the clip. On channels-last frames (memory order frame, H, W, C) each frame is a contiguous (H·W, C) matrix, so
every tap is one GEMM over a contiguous slice: no (b, C, t, H, W) permute copies in or out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def temporal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                  residual: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  into: torch.Tensor | None = None) -> torch.Tensor:
    """Conv3d along time on clips laid out `(b, t, H, W, C_in)` -> `(b, t, H, W, C_out)`, zero-padded per clip.

    weight: `(C_out, C_in, k, kh, kw)` as stored in the checkpoint (k odd). With kh = kw = 1 this is k GEMMs on
    contiguous slices; other kernels fall back to `F.conv3d` on a permuted view.
    scale: optional one-element tensor α multiplying the convolution (folded into the weights).
    residual: optional `(b, t, H, W, C_out)` added to the result: returns residual + α·conv(x).
    into: like residual, but the sum is accumulated in place into this tensor (contiguous), which is returned:
        no new activation is allocated (inference only: autograd may need the old values).
    """
    b, t, height, width, c_in = x.shape
    c_out, _, taps, kh, kw = weight.shape
    if scale is not None:
        weight = weight * scale
        bias = None if bias is None else bias * scale
    if (kh, kw) != (1, 1):
        out = F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=(taps // 2, kh // 2, kw // 2))
        out = out.permute(0, 2, 3, 4, 1)  # (b, C, t, H, W) -> (b, t, H, W, C)
        if into is not None:
            return into.add_(out)
        return out if residual is None else out + residual
    pixels = height * width
    rows = x.reshape(b, t * pixels, c_in)  # each clip: t frames of H·W pixels, one row per pixel and frame
    matrices = weight.reshape(c_out, c_in, taps)  # (C_out, C_in, tap); matrices[..., j].T maps C_in -> C_out
    center = taps // 2
    w_center = matrices[..., center].t()
    if into is not None:
        out = into.view(b * t * pixels, c_out).addmm_(rows.reshape(-1, c_in), w_center)
        if bias is not None:
            out.add_(bias)
    elif residual is not None:
        out = torch.addmm(residual.reshape(b * t * pixels, c_out), rows.reshape(-1, c_in), w_center)
        if bias is not None:
            out.add_(bias)
    elif bias is not None:
        out = torch.addmm(bias, rows.reshape(-1, c_in), w_center)
    else:
        out = rows.reshape(-1, c_in) @ w_center
    out = out.view(b, t * pixels, c_out)
    for j in range(taps):
        shift = j - center  # output frame i reads input frame i + shift
        if j == center or abs(shift) >= t:
            continue
        w_j = matrices[..., j].t()
        src = rows[:, max(0, shift) * pixels:(t + min(0, shift)) * pixels]
        dst = out[:, max(0, -shift) * pixels:(t - max(0, shift)) * pixels]
        for clip in range(b):
            dst[clip].addmm_(src[clip], w_j)
    return out.view(b, t, height, width, c_out)
