"""The 2D building blocks of the SD/SVD VAE, named after the sgm checkpoint keys.

All blocks take and return images laid out `(N, C, H, W)`, N = frames (clips concatenated frame by frame,
clip-major: clip 0's frames first). Decoder blocks also take `clips` (a `Clips` value saying how N splits into
clips); the 2D blocks ignore it, so the decoder can call every block the same way.

Any memory format gives the same numbers; the model runs channels-last (memory order N, H, W, C; `VAE` converts
its inputs), where 1x1 convolutions are matrix products on `(N, H, W, C)` views and the temporal blocks need no
permute copies. Residual additions are in place on the block's fresh output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vaecli.ops.attention import AttentionBackend
from vaecli.ops.norm import norm_silu, spatial_norm


@dataclass(frozen=True)
class Clips:
    """How the frame axis of a decoder input splits into independent clips.

    num_frames: frames per clip; the input's N must be a multiple of it (N // num_frames clips).
    skip_video: decode every frame alone with the spatial path only (equals the 2D decoder exactly).
    image_only: optional bool tensor (N,), frames to treat as still images (merge strategy
        "learned_with_images" only): they take the spatial path of every temporal blend.
    frame_batch: run the per-frame (2D) layers this many frames at a time (None: all at once). Results are the
        same; between two temporal layers only one batch's intermediates are alive (less memory, one copy more).
    attention: the backend every attention layer of this call uses (a value of the plan; modules keep none).
    """

    num_frames: int
    skip_video: bool = False
    image_only: torch.Tensor | None = None
    frame_batch: int | None = None
    attention: AttentionBackend = field(default_factory=lambda: AttentionBackend("sdpa"))


SPATIAL_KINDS = ("conv", "resnet", "attn", "upsample", "downsample", "norm_silu")
TEMPORAL_KINDS = ("time_stack", "time_mix", "video_attn")


@dataclass(frozen=True)
class Stage:
    """One step of a model's forward pass: `fn` maps frames (N, C, H, W) to frames, `layer` is the module it runs.

    kind: what the layer computes, which the streaming executor needs to run it piece by piece —
      per frame: "conv" (an nn.Conv2d, stride 1, padding k//2), "resnet" (a ResnetBlock's 2D path), "attn" (an
      AttnBlock over the whole frame), "upsample", "downsample", "norm_silu" (GroupNorm then SiLU; `layer` is the
      norm); across the frames of a clip: "time_stack" (a VideoResBlock's temporal half), "time_mix" (AE3DConv's
      time_mix_conv), "video_attn" (a VideoBlock: spatial attention, then attention along time).
    """

    kind: str
    layer: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def per_frame(self) -> bool:
        return self.kind in SPATIAL_KINDS


def stage_groups(stages: list[Stage]) -> Iterator[tuple[list[Stage], Stage | None]]:
    """The stages as (consecutive per-frame stages, the temporal stage after them): every walk over a model's
    stages runs a group's per-frame stages together (possibly none), then its temporal stage; the last group's
    temporal stage is None."""
    run: list[Stage] = []
    for stage in stages:
        if stage.per_frame:
            run.append(stage)
            continue
        yield run, stage
        run = []
    yield run, None


def frame_batches(fns: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, batch: int | None
                  ) -> torch.Tensor:
    """Apply the per-frame functions `fns` in turn to frames x (N, C, H, W), `batch` frames at a time.

    Each batch's result is written into one output (channels-last), so only one batch's intermediates live.
    """
    def apply(part: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            part = fn(part)
        return part

    if not fns or batch is None or x.shape[0] <= batch:
        return apply(x)
    first = apply(x[:batch])
    out = torch.empty((x.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last)
    out[:batch] = first
    del first
    for start in range(batch, x.shape[0], batch):
        out[start:start + batch] = apply(x[start:start + batch])
    return out


class ResnetBlock(nn.Module):
    """sgm `ResnetBlock` without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))).

    GroupNorm(32, eps 1e-6); a 1x1 `nin_shortcut` when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = spatial_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = spatial_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, clips: Clips | None = None) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        if self.in_channels != self.out_channels:
            x = pointwise(self.nin_shortcut, x)
        return h.add_(x)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 `conv` applied to frames (N, C_in, H, W) as a matrix product over the (N, H, W, C_in) view.

    For channels-last frames both views are free and the result is channels-last (N, C_out, H, W).
    """
    pixels = rearrange(x, "n c h w -> n h w c")  # a view for channels-last frames
    out = F.linear(pixels, conv.weight.flatten(1), conv.bias)  # (N, H, W, C_out), contiguous
    return rearrange(out, "n h w c -> n c h w")


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 conv with stride 2 (sgm `Downsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv (sgm `Upsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (sgm `AttnBlock`).

    q, k, v and proj_out are 1x1 convs (weights [C, C, 1, 1]); the scale is 1/sqrt(C);
    out = x + proj_out(attend(x)). `attention` (passed per call, from the plan) computes softmax(q kᵀ/√C) v.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = spatial_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def attend(self, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """(N, C, H, W) -> attention output (N, C, H, W), before proj_out and the residual."""
        h = self.norm(x)
        height, width = h.shape[-2:]
        # (N, C, H, W) -> (N, heads=1, tokens=H*W, C): q, k, v are contiguous matrix products of the pixel view
        q, k, v = (rearrange(pointwise(layer, h), "n c h w -> n 1 (h w) c") for layer in (self.q, self.k, self.v))
        out = attention(q, k, v)
        return rearrange(out, "n 1 (h w) c -> n c h w", h=height, w=width)

    def project(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + proj_out(h) for frames (N, C, H, W); the sum is computed in place on proj_out's output."""
        return pointwise(self.proj_out, h).add_(x)

    def forward(self, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        return self.project(self.attend(x, attention), x)
