"""Normalisation layers and the fused norm → SiLU op, with explicit precision and layout rules.

Layouts: frames are `(N, C, H, W)` in any memory format (the model runs channels-last: memory order N, H, W, C);
temporal activations are `(b, t, H, W, C)` with unit stride over C (a free view of channels-last frames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _needs_copy(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether to hand torch's group_norm a contiguous copy of x.

    Contiguous and channels-last inputs have native kernels (other strides are copied by torch anyway). But
    torch 2.13's CPU group_norm backward crashes (segfault) on strided and channels-last inputs when only the
    affine parameters need gradients (training the temporal layers alone), so recorded CPU ops get a copy.
    """
    if not (x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return True
    recorded = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    return recorded and not x.is_contiguous() and x.device.type == "cpu"


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that avoids torch's CPU backward crash on channels-last inputs (see `_needs_copy`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous() if _needs_copy(x, self.weight) else x)


class GroupNorm32(GroupNorm):
    """GroupNorm whose statistics and affine transform are computed in fp32, the result cast back.

    This is sgm's `GroupNorm32`, used in the temporal `time_stack` blocks (eps 1e-5): for fp16/bf16 inputs
    the variance over (C/groups x T x H x W) would otherwise lose precision. For fp32 input it is exactly
    `nn.GroupNorm`. The parameters are cast too, so bf16 weights with fp32 input also work on CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        x = x.contiguous() if _needs_copy(x, self.weight) else x
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def spatial_norm(channels: int) -> GroupNorm:
    """The spatial GroupNorm of the SD/SVD VAE: 32 groups, eps 1e-6, affine (sgm `Normalize`)."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def temporal_norm(channels: int) -> GroupNorm32:
    """The temporal GroupNorm of `time_stack`: 32 groups, eps 1e-5, computed in fp32 (sgm `normalization`)."""
    return GroupNorm32(num_groups=32, num_channels=channels, eps=1e-5, affine=True)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)) for frames `(N, C, H, W)`, in x's dtype and memory format.

    Statistics are fp32 (torch's kernels accumulate in fp32; `GroupNorm32` computes entirely in fp32). On CUDA
    with Triton, one fused kernel reads x once per pass and writes the result once; elsewhere the SiLU runs
    in place on the norm's fresh output (no second tensor).
    """
    if x.is_cuda:
        from vaecli.ops import triton_norm

        if triton_norm.available() and triton_norm.supports(x):
            return triton_norm.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(norm(x), inplace=True)


def clip_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(GroupNorm(x)) with statistics per clip: x `(b, t, H, W, C)` -> same shape and layout.

    Each group's statistics span all t·H·W positions of its clip (sgm's GroupNorm over `(b, C, t, H, W)`). The
    clip is viewed, without a copy, as a channels-last image `(b, C, t·H·W, 1)`, for which torch (and the Triton
    kernel) have native kernels.
    """
    b, t, height, width, channels = x.shape
    image = x.reshape(b, t * height * width, 1, channels).permute(0, 3, 1, 2)  # (b, C, L=t·H·W, 1), C innermost
    out = norm_silu(norm, image)
    return out.permute(0, 2, 3, 1).reshape(b, t, height, width, channels)
