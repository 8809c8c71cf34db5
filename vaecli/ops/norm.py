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
    """sgm's `GroupNorm32` (the temporal `time_stack` norms, eps 1e-5): statistics in fp32 for half inputs.

    sgm upcasts the activations to fp32, normalises and casts back. torch's group_norm kernels (CPU and CUDA)
    already accumulate half inputs in fp32 and round the result once, so this computes the same thing without
    the two fp32 copies of the activations (which were the decoder's memory peak). Parameters are cast to the
    input's dtype, so bf16 weights with fp32 input (and the reverse) work too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous() if _needs_copy(x, self.weight) else x
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype:
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def spatial_norm(channels: int) -> GroupNorm:
    """The spatial GroupNorm of the SD/SVD VAE: 32 groups, eps 1e-6, affine (sgm `Normalize`)."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def temporal_norm(channels: int) -> GroupNorm32:
    """The temporal GroupNorm of `time_stack`: 32 groups, eps 1e-5, computed in fp32 (sgm `normalization`)."""
    return GroupNorm32(num_groups=32, num_channels=channels, eps=1e-5, affine=True)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)) for frames `(N, C, H, W)`, in x's dtype and memory format.

    Statistics are fp32 (torch's kernels and the Triton kernel accumulate half inputs in fp32). On CUDA
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
