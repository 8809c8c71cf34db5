"""GroupNorm (+ SiLU) as two Triton kernels for channels-last CUDA tensors, statistics in fp32.

Layout: x is `(N, C, H, W)` channels-last, i.e. memory `(N, H·W, C)` (the clip view `(b, C, t·H·W, 1)` of the
temporal norms is the same thing). Pass 1 reads x once per group and chunk of pixels and writes each chunk's
mean and sum of squared deviations; the chunks are merged in fp32 (Chan's parallel formula, stable for large
means); pass 2 reads x once and writes silu((x - μ)·rstd·γ + β) once in x's dtype. Compared with torch's
group_norm followed by an in-place SiLU this saves two of five passes over the activations.

Inference only (no autograd); `norm_silu` uses it on CUDA when Triton is importable and no gradient is needed.
The kernels also run in Triton's CPU interpreter (`TRITON_INTERPRET=1`), which the tests use without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def available() -> bool:
    """Whether Triton is importable (probed once, on first use)."""
    return importlib.util.find_spec("triton") is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: a 4-D channels-last tensor that needs no gradient."""
    return (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and x.requires_grad))


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x)) (or the norm alone, `silu=False`) for channels-last `x` (N, C, H, W) -> same layout."""
    import triton

    from vaecli.ops import _triton_kernels as kernels

    n, channels, height, width = x.shape
    pixels = height * width
    per_group = channels // groups
    block_cg = triton.next_power_of_2(per_group)
    block_p = max(16, min(1024, 4096 // block_cg))
    chunk = 8 * block_p  # pixels per program in pass 1
    chunks = triton.cdiv(pixels, chunk)
    partial = torch.empty(n, groups, chunks, 2, device=x.device, dtype=torch.float32)
    kernels.group_stats[(n, groups, chunks)](x, partial, pixels, channels, per_group, groups, chunk, chunks,
                                             BLOCK_P=block_p, BLOCK_CG=block_cg)
    counts = (torch.clamp(pixels - torch.arange(chunks, device=x.device) * chunk, max=chunk) * per_group).float()
    means, m2s = partial[..., 0], partial[..., 1]  # (N, groups, chunks)
    mean = (means * counts).sum(-1) / (pixels * per_group)
    m2 = m2s.sum(-1) + (counts * (means - mean[..., None]) ** 2).sum(-1)
    rstd = torch.rsqrt(m2 / (pixels * per_group) + eps)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(channels)
    rows = max(1, min(64, 8192 // block_c))
    has_affine = weight is not None
    kernels.group_apply[(n, triton.cdiv(pixels, rows))](
        x, out, mean.contiguous(), rstd.contiguous(), weight if has_affine else mean, bias if has_affine else mean,
        pixels, channels, per_group, groups, BLOCK_P=rows, BLOCK_C=block_c, AFFINE=has_affine, SILU=silu)
    return out
