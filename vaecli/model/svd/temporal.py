"""The temporal blocks of the SVD `VideoDecoder`, named after the sgm checkpoint keys.

Frames arrive as `(N, C, H, W)` with N = clips * num_frames, clip-major (`(b t) c h w`). Temporal layers see
them as clips `(b, t, H, W, C)` (sgm's `(b, C, t, H, W)` with channels innermost, a free view of channels-last
frames): convolutions along t zero-pad at clip edges and GroupNorm statistics span all t frames of a clip, so
how frames are grouped into clips changes the result (see `Clips`). The (3, 1, 1) convolutions run as matrix
products per tap (`vaecli.ops.conv.temporal_conv`), so no layout copies happen around the temporal blocks.

Two blend conventions exist and both are kept exactly as sgm defines them:
- `VideoResBlock`: out = α·temporal + (1-α)·spatial (α weights the temporal branch).
- `VideoBlock` (temporal attention): out = α·spatial + (1-α)·temporal (α weights the spatial branch).
with α = mix_factor ("fixed") or sigmoid(mix_factor) ("learned", "learned_with_images"). With
"learned_with_images", frames flagged in `Clips.image_only` take the pure spatial branch in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vaecli.model.svd.blocks import AttnBlock, Clips, ResnetBlock
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.conv import temporal_conv
from vaecli.ops.norm import clip_norm_silu, temporal_norm


def make_mix_factor(module: nn.Module, strategy: str, alpha: float) -> None:
    """Register `mix_factor` on `module` as sgm does: a buffer for "fixed", a parameter otherwise."""
    value = torch.tensor([float(alpha)])
    if strategy == "fixed":
        module.register_buffer("mix_factor", value)
    else:
        module.register_parameter("mix_factor", nn.Parameter(value))


def blend_alpha(mix_factor: torch.Tensor, strategy: str) -> torch.Tensor:
    """The blend weight α ([1]) for a merge strategy."""
    return mix_factor if strategy == "fixed" else torch.sigmoid(mix_factor)


def image_frames_alpha(alpha: torch.Tensor, clips: Clips, image_value: float) -> torch.Tensor:
    """α per frame, shaped (N,): `image_value` for frames flagged in `clips.image_only`, α elsewhere."""
    flags = clips.image_only.to(device=alpha.device, dtype=torch.bool).reshape(-1)
    return torch.where(flags, torch.full_like(alpha, image_value), alpha)


class TimeStack(nn.Module):
    """sgm `openaimodel.ResBlock(dims=3, kernel_size=video_kernel_size, skip_t_emb=True)`, channels unchanged.

    On clips `(b, t, H, W, C)` (sgm's `(b, C, t, H, W)`, channels innermost): x + out_layers(in_layers(x)), where
    in_layers = [GroupNorm32 (eps 1e-5, fp32), SiLU, Conv3d] and out_layers = [GroupNorm32, SiLU, Dropout(0), Conv3d];
    the Conv3d kernel is (3, 1, 1) with zero padding along t only for SVD. The Conv3d modules hold the
    checkpoint's weights; they are applied by `temporal_conv` (per-tap matrix products).
    """

    def __init__(self, channels: int, kernel_size: tuple[int, int, int]):
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.in_layers = nn.Sequential(
            temporal_norm(channels), nn.SiLU(), nn.Conv3d(channels, channels, kernel_size, padding=padding)
        )
        self.out_layers = nn.Sequential(
            temporal_norm(channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv3d(channels, channels, kernel_size, padding=padding),
        )

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """x `(b, t, H, W, C)` -> x + α·out_layers(in_layers(x)) (α = 1 when None, the plain block).

        A one-element α is folded into the last convolution's weights, so the blend costs nothing; a per-frame α
        `(b, t)` (frames flagged as images) is applied after it. Without autograd the sum is accumulated into x's
        own memory (contiguous x) and x is returned: callers pass a tensor they no longer need.
        """
        conv_in, conv_out = self.in_layers[2], self.out_layers[3]
        h = temporal_conv(clip_norm_silu(self.in_layers[0], x), conv_in.weight, conv_in.bias)
        h = clip_norm_silu(self.out_layers[0], h)
        if alpha is not None and alpha.numel() > 1:
            return x + alpha[:, :, None, None, None] * temporal_conv(h, conv_out.weight, conv_out.bias)
        if not torch.is_grad_enabled() and x.is_contiguous():  # inference: accumulate into x, no new tensor
            return temporal_conv(h, conv_out.weight, conv_out.bias, into=x, scale=alpha)
        return temporal_conv(h, conv_out.weight, conv_out.bias, residual=x, scale=alpha)


class VideoResBlock(ResnetBlock):
    """A spatial `ResnetBlock` followed by a temporal `time_stack`, blended by α (sgm `VideoResBlock`).

    x_s = ResnetBlock(x) per frame; x_t = time_stack(x_s) per clip; out = α·x_t + (1-α)·x_s, computed as
    x_s + α·(x_t - x_s) with α folded into time_stack's last convolution.
    With `clips.skip_video` it returns x_s (the 2D decoder's result, bit for bit).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int],
                 merge_strategy: str = "learned", alpha: float = 0.0):
        super().__init__(in_channels, out_channels)
        self.merge_strategy = merge_strategy
        self.time_stack = TimeStack(out_channels, kernel_size)
        make_mix_factor(self, merge_strategy, alpha)

    def forward(self, x: torch.Tensor, clips: Clips | None = None) -> torch.Tensor:
        return self.temporal(super().forward(x), clips)

    def temporal(self, x: torch.Tensor, clips: Clips | None) -> torch.Tensor:
        """The temporal half: x_s (N, C, H, W), the spatial block's output -> the blend (N, C, H, W).

        At inference the result is accumulated into x_s's memory (x_s is not needed afterwards).
        """
        if clips is None or clips.skip_video:
            return x
        x_spatial = rearrange(x, "(b t) c h w -> b t h w c", t=clips.num_frames)  # a view of channels-last frames
        alpha = blend_alpha(self.mix_factor, self.merge_strategy).to(x.dtype)
        if clips.image_only is not None and self.merge_strategy == "learned_with_images":
            alpha = rearrange(image_frames_alpha(alpha, clips, 0.0), "(b t) -> b t", t=clips.num_frames)
        out = self.time_stack(x_spatial, alpha)
        return rearrange(out, "b t h w c -> (b t) c h w")


class AE3DConv(nn.Conv2d):
    """The decoder's conv_out followed by a temporal Conv3d `time_mix_conv`, with no residual (sgm `AE3DConv`).

    (N, C_in, H, W) -> 2D conv -> clips (b, t, H, W, C_out) -> time_mix_conv -> (N, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int]):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, kernel_size, padding=tuple(k // 2 for k in kernel_size))

    def forward(self, x: torch.Tensor, clips: Clips | None = None) -> torch.Tensor:
        return self.temporal(super().forward(x), clips)

    def temporal(self, x: torch.Tensor, clips: Clips | None) -> torch.Tensor:
        """time_mix_conv over clips of the 2D conv's output x (N, C_out, H, W)."""
        if clips is None or clips.skip_video:
            return x
        x = rearrange(x, "(b t) c h w -> b t h w c", t=clips.num_frames)
        out = temporal_conv(x, self.time_mix_conv.weight, self.time_mix_conv.bias)
        return rearrange(out, "b t h w c -> (b t) c h w")


def frame_embedding(frame_index: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of frame indices, cos first: (N,) -> (N, dim), fp32 (sgm `util.timestep_embedding`).

    freqs_i = exp(-ln(max_period) * i / half) for i < half = dim // 2; emb = [cos(t·f), sin(t·f)] (+ a zero
    column for odd dim). Not to be confused with sgm `model.get_timestep_embedding` (sin first, half - 1).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=frame_index.device) / half)
    args = frame_index.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GEGLU(nn.Module):
    """Linear to 2·dim_out, split into value and gate: value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """sgm `FeedForward(glu=True, mult=4)`: net = [GEGLU(dim -> 4·dim), Dropout, Linear(4·dim -> dim_out)]."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        inner = 4 * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """sgm `CrossAttention` used as self-attention: to_q/to_k/to_v (no bias), to_out.0 (with bias).

    x: (B, L, C) -> (B, L, C); `heads` heads of C // heads channels, scale 1/sqrt(C // heads).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        # (B, L, heads*d) -> (B, heads, L, d)
        q, k, v = (rearrange(layer(x), "b l (h d) -> b h l d", h=self.heads) for layer in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class VideoTransformerBlock(nn.Module):
    """sgm `VideoTransformerBlock(dim=C, n_heads=1, d_head=C, ff_in=True)`: attention along time.

    x: (N, S, C) with N = b·t frames and S = H·W positions -> regrouped to (b·S, t, C), then
    x = ff_in(norm_in(x)) + x; x = attn1(norm1(x)) + x; x = attn2(norm2(x)) + x (a second self-attention,
    there is no context); x = ff(norm3(x)) + x; regrouped back to (N, S, C). LayerNorms have eps 1e-5.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = SelfAttention(dim, 1)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dim)

    def forward(self, x: torch.Tensor, num_frames: int, attention: AttentionBackend) -> torch.Tensor:
        positions = x.shape[1]
        x = rearrange(x, "(b t) s c -> (b s) t c", t=num_frames)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x), attention) + x
        x = self.attn2(self.norm2(x), attention) + x
        x = self.ff(self.norm3(x)) + x
        return rearrange(x, "(b s) t c -> (b t) s c", s=positions)


class VideoBlock(AttnBlock):
    """Spatial attention plus attention along time (sgm `VideoBlock`, ComfyUI `AttnVideoBlock`).

    h = attend(x) (norm, q, k, v, softmax; no proj_out) as (N, S, C);
    m = time_mix_block(h + video_time_embed(frame_embedding(frame index within its clip)));
    out = x + proj_out(α·h + (1-α)·m), α weighting the *spatial* branch.
    With `clips.skip_video` (or no clips) it is the plain `AttnBlock`.
    """

    def __init__(self, channels: int, merge_strategy: str = "learned", alpha: float = 0.0):
        super().__init__(channels)
        self.merge_strategy = merge_strategy
        self.time_mix_block = VideoTransformerBlock(channels)
        self.video_time_embed = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, channels)
        )
        make_mix_factor(self, merge_strategy, alpha)

    def forward(self, x: torch.Tensor, clips: Clips) -> torch.Tensor:
        if clips.skip_video:
            return super().forward(x, clips.attention)
        height, width = x.shape[-2:]
        h = rearrange(self.attend(x, clips.attention), "n c h w -> n (h w) c")
        frames = torch.arange(clips.num_frames, device=x.device).repeat(x.shape[0] // clips.num_frames)  # (b t)
        emb = self.video_time_embed(frame_embedding(frames, self.channels).to(x.dtype))  # (N, C)
        mixed = self.time_mix_block(h + emb[:, None, :], clips.num_frames, clips.attention)
        alpha = blend_alpha(self.mix_factor, self.merge_strategy).to(x.dtype)
        if clips.image_only is not None and self.merge_strategy == "learned_with_images":
            alpha = image_frames_alpha(alpha, clips, 1.0)[:, None, None]  # (N, 1, 1) over (N, S, C)
        h = alpha * h + (1.0 - alpha) * mixed
        return self.project(rearrange(h, "n (h w) c -> n c h w", h=height, w=width), x)
