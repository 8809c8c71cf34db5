"""The Wan 2.1 and Wan 2.2 5B video VAEs as plain modules (attribute names follow the original releases'
checkpoint keys: `encoder.conv1`, `encoder.downsamples.N`, `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`,
`conv1`, `conv2`, `decoder.conv1`, `decoder.middle`, `decoder.upsamples.N`, `decoder.head`; in 2.2 every level is
one block, `encoder.downsamples.N.downsamples.M` / `decoder.upsamples.N.upsamples.M`, beside a parameter-free
`avg_shortcut`).

Layouts: video tensors are (B, C, T, H, W); pixels in [-1, 1]. Time is causal: every 3-D convolution sees only
the current and earlier frames, so a clip can be run in chunks of frames that carry a `Cache` (the last input
frames of every temporal convolution, keyed by module) from one chunk to the next and give the numbers of one
call. The first frame of a clip is coded alone: T latent frames <-> 1 + 4 (T - 1) frames.

Where a chunk may end: the encoder takes 1 + 4k frames at the start of a clip, then multiples of 4; the decoder
takes any number of latent frames in any chunk.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vaecli.model.wan.conv import CL3, Cache, CausalConv3d
from vaecli.ops.attention import AttentionBackend

_STARTED = "started"  # an upsampler's cache entry once the clip's first frame went through it


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D layer `fn` to every frame of (B, C, T, H, W)."""
    b = x.shape[0]
    y = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


class RMSNorm(nn.Module):
    """x / ‖x‖ over channels at every position, × √C × γ. γ: [C, 1, 1, 1] for (B, C, T, H, W) (`images=False`),
    [C, 1, 1] for (N, C, H, W). Half-precision inputs are normalised in fp32."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(wide, dim=1).to(x.dtype).mul_(self.gamma * self.scale)


def keeps_frames(layer: nn.Module) -> bool:
    """Whether `layer` maps every frame of its input to one frame of its output, made from that frame and the
    ones before it (the causal cache): then a chunk can go through it a frame at a time."""
    if isinstance(layer, Resample):
        return layer.mode.endswith("2d")
    if isinstance(layer, (DownResidualBlock, UpResidualBlock)):
        blocks = layer.downsamples if isinstance(layer, DownResidualBlock) else layer.upsamples
        return (layer.avg_shortcut is None or layer.avg_shortcut.factor_t == 1) and all(map(keeps_frames, blocks))
    return isinstance(layer, (ResidualBlock, AttentionBlock, CausalConv3d, RMSNorm, nn.SiLU))


FRAME_BY_FRAME_HEIGHT = 128  # frames (in the model's pixels) at least this high go through `frame_by_frame` one at a time
# Below it the activations are small, and one frame at a time is slower on CPU: torch convolves a 1-frame fp32 input
# of B·C·T·H ≤ 20480 with its slow im2col path (released 2.1, 9 frames, fp32, 2 cores: 64×64 decode 0.63× and
# encode 0.62× of the whole chunk at once; 128×128 decode 1.14× -> 1.34× and encode 1.09× -> 1.28× of diffusers).


def frame_by_frame(layers, x: torch.Tensor, step, height: int) -> torch.Tensor:
    """(B, C, T, H, W) through `layers` (each `keeps_frames`), `step(layer, x)` for each: for frames of at least
    `FRAME_BY_FRAME_HEIGHT` (`height`: the clip's frame height in the model's pixels) one frame at a time, the
    frames written into one channels-last output. The numbers of the whole chunk at once (the causal caches carry
    from frame to frame) with the activations of one frame, at the resolutions where frames are largest."""
    if height < FRAME_BY_FRAME_HEIGHT:
        for layer in layers:
            x = step(layer, x)
        return x
    out = None
    for t in range(x.shape[2]):
        y = x[:, :, t:t + 1]
        for layer in layers:
            y = step(layer, y)
        if x.shape[2] == 1:
            return y
        if out is None:
            out = torch.empty((*y.shape[:2], x.shape[2], *y.shape[3:]), dtype=y.dtype, device=y.device,
                              memory_format=CL3)
        out[:, :, t:t + 1] = y
        del y
    return out


class ResidualBlock(nn.Module):
    """x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))) on (B, C, T, H, W); `residual` keeps the
    original Sequential's indices (0 norm1, 2 conv1, 3 norm2, 6 conv2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x), inplace=True), cache)
        h = r[6](F.silu(r[3](h), inplace=True), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame of (B, C, T, H, W), scale 1/√C:
    x + proj(attention(to_qkv(norm(x))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """Frames (N, C, H, W) -> (N, C, H, W) after the projection and the residual."""
        height, width = x.shape[-2:]
        qkv = rearrange(self.to_qkv(self.norm(x)), "n (three c) h w -> three n 1 (h w) c", three=3)
        out = attention(qkv[0], qkv[1], qkv[2])
        return x + self.proj(rearrange(out, "n 1 (h w) c -> n c h w", h=height, w=width))

    def forward(self, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        return per_frame(lambda f: self.attend(f, attention), x)


class Resample(nn.Module):
    """2× resampling of (B, C, T, H, W). Modes:

    upsample2d / upsample3d: nearest 2× in space then a 3×3 conv to C/2 channels (`resample.1`); 3d also doubles
      time after the clip's first frame: `time_conv` makes 2C channels per frame, read as two frames of C.
    downsample2d / downsample3d: pad right/bottom by 1, 3×3 conv stride 2 (`resample.1`); 3d also halves time
      after the clip's first frame: `time_conv` (kernel 3, stride 2, no padding) over the previous chunk's last
      frame and this chunk's.
    The clip's first frame passes the time step untouched (it is coded alone).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):  # out_dim: C/2 in Wan 2.1, C in 2.2
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def space(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, C, H, W) -> (N, C', 2H, 2W) or (N, C, H/2, W/2)."""
        if self.mode.startswith("upsample"):
            x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)
        else:
            x = F.pad(x, (0, 1, 0, 1))
        return self.resample[1](x)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self.double_time(x, cache)
        x = per_frame(self.space, x)
        if self.mode == "downsample3d":
            x = self.halve_time(x, cache)
        return x

    def double_time(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T', H, W): the clip's first frame once, every later frame twice over."""
        head = None
        if cache.get(self) is None:  # the clip's first frame: no time step; later frames start from zeros
            cache[self] = _STARTED
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            y = self.time_conv(x, cache)
            # (B, 2C, T, H, W) -> (B, C, 2T, H, W): channels [0, C) give frame 2t, [C, 2C) frame 2t + 1
            b, c2, t, h, w = y.shape
            x = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=CL3)
            x[:, :, 0::2], x[:, :, 1::2] = y[:, :c2 // 2], y[:, c2 // 2:]
        return x if head is None else torch.cat([head, x], dim=2)

    def halve_time(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T', H, W): the clip's first frame, then one frame per two (T even later)."""
        before = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if before is None:  # the clip's first frame passes; the frames after it pair up with it
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2) if x.shape[2] > 1 else x
        return self.time_conv(torch.cat([before, x], dim=2))


class AvgDown3D(nn.Module):
    """Wan 2.2's parameter-free down shortcut: (B, C, T, H, W) -> (B, C', T/ft, H/fs, W/fs), every output channel
    the mean of C·ft·fs²/C' values (the space-to-channel folding of an ft×fs×fs block). A chunk of odd length
    (only the clip's first one: 1 + 2k frames at this level) gets a zero frame in front of its first."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=ft, fh=fs, fw=fs)
        return rearrange(x, "b (o g) t h w -> b o g t h w", o=self.out_dim).mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2's parameter-free up shortcut: (B, C, T, H, W) -> (B, C', ft·T, fs·H, fs·W), every input channel
    repeated C'·ft·fs²/C times and unfolded into an ft×fs×fs block; the clip's first frame gives one frame, not
    ft (its first ft − 1 are dropped), as the main path's upsampler does."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = rearrange(x.repeat_interleave(self.repeats, dim=1), "b (o ft fh fw) t h w -> b o (t ft) (h fh) (w fw)",
                      o=self.out_dim, ft=ft, fh=fs, fw=fs)
        if cache.get(self) is None:
            cache[self] = _STARTED
            x = x[:, :, ft - 1:]
        return x


class DownResidualBlock(nn.Module):
    """A Wan 2.2 encoder level on (B, C, T, H, W): `downsamples` (residual blocks, then the level's Resample unless
    it is the last level) plus `avg_shortcut` of the level's input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_res_blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.avg_shortcut(x)


class UpResidualBlock(nn.Module):
    """A Wan 2.2 decoder level on (B, C, T, H, W): `upsamples` (num_res_blocks + 1 residual blocks, then a
    width-keeping upsampler unless it is the last level) plus `avg_shortcut` (`DupUp3D`) of the level's input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_res_blocks + 1)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return h if self.avg_shortcut is None else h + self.avg_shortcut(x, cache)


class Encoder3d(nn.Module):
    """Frames (B, in_channels, T, H, W) in [-1, 1] -> (B, z_channels, t, H/2^(L-1), W/2^(L-1)) (the moments:
    mean, log-variance). `residual`: Wan 2.2's levels (one `DownResidualBlock` each)."""

    def __init__(self, dim: int, z_channels: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 attn_scales: tuple[float, ...], temperal_downsample: tuple[bool, ...], in_channels: int = 3,
                 residual: bool = False):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            temporal = not last and temperal_downsample[i]
            if residual:
                layers.append(DownResidualBlock(in_dim, out_dim, num_res_blocks, temporal, not last))
                continue
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if not last:
                layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], z_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache, attention: AttentionBackend) -> torch.Tensor:
        """conv1 and the levels before the first that halves time run a frame at a time (`frame_by_frame`):
        at full resolution, where one frame's activations are the largest."""
        def step(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return layer(x, attention) if isinstance(layer, AttentionBlock) else layer(x, cache)

        layers = [self.conv1, *self.downsamples, *self.middle]
        local = next(i for i, layer in enumerate([*layers, None]) if layer is None or not keeps_frames(layer))
        x = frame_by_frame(layers[:local], x, step, x.shape[-2])
        for layer in layers[local:]:
            x = step(layer, x)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


class Decoder3d(nn.Module):
    """Latents (B, z_dim, t, h, w) -> frames (B, out_channels, T, 2^(L-1)h, 2^(L-1)w), ≈[-1, 1] (unclamped).
    `residual`: Wan 2.2's levels (one `UpResidualBlock` each, the width kept by the upsamplers)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 attn_scales: tuple[float, ...], temperal_upsample: tuple[bool, ...], out_channels: int = 3,
                 residual: bool = False):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            temporal = not last and temperal_upsample[i]
            if residual:
                layers.append(UpResidualBlock(in_dim, out_dim, num_res_blocks, temporal, not last))
                continue
            if i > 0:
                in_dim //= 2  # the upsampler before halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if not last:
                layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], out_channels, 3, padding=1))

    def stem(self, z: torch.Tensor, cache: Cache, attention: AttentionBackend) -> torch.Tensor:
        """conv1 and the middle (with its whole-frame attention), at latent resolution: (B, z_dim, t, h, w) ->
        (B, dims[0], t, h, w)."""
        x = self.conv1(z, cache)
        for layer in self.middle:
            x = layer(x, attention) if isinstance(layer, AttentionBlock) else layer(x, cache)
        return x

    def tail(self, x: torch.Tensor, cache: Cache, attention: AttentionBackend | None = None) -> torch.Tensor:
        """The levels and the head: (B, dims[0], t, h, w) -> (B, out_channels, T, 2^(L-1)h, 2^(L-1)w). Local in
        space (no attention in the released models), so a tile with `halo()` latent pixels around it gives the
        tile's frames exactly. The levels after the last that doubles time, and the head, run a frame at a time
        (`frame_by_frame`): at full resolution, where one frame's activations are the largest."""
        def step(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if layer is self.head:
                return layer[2](F.silu(layer[0](x), inplace=True), cache)
            return layer(x, attention) if isinstance(layer, AttentionBlock) else layer(x, cache)

        layers = [*self.upsamples, self.head]
        local = len(layers) - next(i for i, layer in enumerate([*layers[::-1], None])
                                   if layer is None or (layer is not self.head and not keeps_frames(layer)))
        height = x.shape[-2] * 2 ** sum(isinstance(m, Resample) for m in self.upsamples.modules())
        for layer in layers[:local]:
            x = step(layer, x)
        return frame_by_frame(layers[local:], x, step, height)

    def forward(self, z: torch.Tensor, cache: Cache, attention: AttentionBackend) -> torch.Tensor:
        return self.tail(self.stem(z, cache, attention), cache, attention)

    def tail_layers(self):
        """(module, scale, frames) for every module of `tail` in the order it runs: `scale` its resolution over
        the latent size, `frames` its frames per latent frame (after the clip's first), as the upsamplers set
        them (an upsampler's spatial conv runs at its output scale, its `time_conv` before the upsampling)."""
        scale, frames, before = 1, 1, {}
        for m in (*self.upsamples.modules(), *self.head.modules()):
            if isinstance(m, Resample) and m.mode.startswith("upsample"):
                if m.mode == "upsample3d":
                    before[m.time_conv] = (scale, frames)
                scale *= 2
                frames *= 2 if m.mode == "upsample3d" else 1
            yield (m, *before.get(m, (scale, frames)))

    def halo(self) -> int | None:
        """Latent pixels a tile of `tail` needs on each side so that its own pixels are exact: every 'same'
        convolution of kernel k at 2^j× the latent resolution reaches (k // 2) / 2^j latent pixels further
        (nearest upsampling and the shortcuts are local); None when the tail has attention (whole frames)."""
        reach = Fraction(0)
        for m, scale, _ in self.tail_layers():
            if isinstance(m, AttentionBlock):
                return None
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                reach += Fraction(m.kernel_size[-1] // 2, scale)
        return math.ceil(reach)


class WanVAE(nn.Module):
    """The Wan 2.1 or 2.2 5B VAE: `encoder` + `conv1` (moments -> moments, 1×1×1) and `conv2` (latents ->
    latents) + `decoder`. Latents here are raw (the model's own space; files normalise them per channel). With
    `patch_size` p > 1 (2.2) frames are folded into p×p pixel patches (3p² channels) before the encoder and
    unfolded after the decoder.

    config: a `WanConfig` (dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample, residual,
    patch_size, decoder_dim).
    """

    def __init__(self, config: Any):
        super().__init__()
        c = config
        self.config = c
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.attn_scales,
                                 c.temperal_downsample, c.in_channels, c.residual)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(c.dec_dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.attn_scales,
                                 c.temperal_downsample[::-1], c.out_channels, c.residual)

    def encode_chunk(self, x: torch.Tensor, cache: Cache, attention: AttentionBackend) -> torch.Tensor:
        """Frames (B, 3, T, H, W) of one chunk (1 + 4k at the clip's start, then 4k) -> moments (B, 2z, t, h, w)."""
        p = self.config.patch_size
        if p > 1:  # pixel patches: channel c·p² + pw·p + ph holds pixel (p·y + ph, p·x + pw) of colour c
            x = rearrange(x, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=p, pw=p)
        return self.conv1(self.encoder(x, cache, attention))

    def decode_chunk(self, z: torch.Tensor, cache: Cache, attention: AttentionBackend) -> torch.Tensor:
        """Raw latents (B, z, t, h, w) of one chunk -> frames (B, 3, T, fh, fw) clamped to [-1, 1] (f: the
        spatial factor, 8 or 16)."""
        return self.decode_tail(self.decode_stem(z, cache, attention), cache)

    def decode_stem(self, z: torch.Tensor, cache: Cache, attention: AttentionBackend) -> torch.Tensor:
        """Raw latents (B, z, t, h, w) -> the decoder's stem output (B, C, t, h, w): whole frames, latent size."""
        return self.decoder.stem(self.conv2(z), cache, attention)

    def decode_tail(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """A stem output (B, C, t, h, w), whole or a tile of it -> frames (B, 3, T, fh, fw) in [-1, 1]."""
        x = self.decoder.tail(x, cache)
        p = self.config.patch_size
        if p > 1:
            x = rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=p, pw=p)
        return x.clamp_(-1.0, 1.0)

    def moments(self, x: torch.Tensor, attention: AttentionBackend | None = None, chunk: int = 4,
                first: int = 1) -> torch.Tensor:
        """A whole clip (B, C, 1 + 4k, H, W) -> moments (B, 2z, 1 + k, h, w): `first` frames (1 + 4j) in the
        first call, then `chunk` (a multiple of 4) at a time."""
        attention = attention or AttentionBackend("sdpa")
        cache: Cache = {}
        parts = [self.encode_chunk(x[:, :, :first], cache, attention)]
        for start in range(first, x.shape[2], chunk):
            parts.append(self.encode_chunk(x[:, :, start:start + chunk], cache, attention))
        return torch.cat(parts, dim=2)

    def decode(self, z: torch.Tensor, attention: AttentionBackend | None = None, chunk: int = 1) -> torch.Tensor:
        """Raw latents of a whole clip (B, z, t, h, w) -> frames (B, 3, 1 + 4(t - 1), fh, fw) in [-1, 1]."""
        attention = attention or AttentionBackend("sdpa")
        cache: Cache = {}
        return torch.cat([self.decode_chunk(z[:, :, s:s + chunk], cache, attention)
                          for s in range(0, z.shape[2], chunk)], dim=2)
