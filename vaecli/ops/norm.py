"""Normalisation layers with explicit precision rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics and affine transform are computed in fp32, the result cast back.

    This is sgm's `GroupNorm32`, used in the temporal `time_stack` blocks (eps 1e-5): for fp16/bf16 inputs
    the variance over (C/groups x T x H x W) would otherwise lose precision. For fp32 input it is exactly
    `nn.GroupNorm`. The parameters are cast too, so bf16 weights with fp32 input also work on CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The clip view (b, C, t, H, W) of frames is a permutation; torch's CPU group_norm copies it to contiguous
        # anyway, and its backward crashes (segfault, torch 2.13) on such strided input when only the affine
        # parameters need gradients: copy explicitly.
        x = x if x.is_contiguous() else x.contiguous()
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def spatial_norm(channels: int) -> nn.GroupNorm:
    """The spatial GroupNorm of the SD/SVD VAE: 32 groups, eps 1e-6, affine (sgm `Normalize`)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def temporal_norm(channels: int) -> GroupNorm32:
    """The temporal GroupNorm of `time_stack`: 32 groups, eps 1e-5, computed in fp32 (sgm `normalization`)."""
    return GroupNorm32(num_groups=32, num_channels=channels, eps=1e-5, affine=True)
