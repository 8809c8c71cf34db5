"""The Wan family behind the family seam: the Wan 2.1 VAE (Wan 2.1, Wan 2.2 14B, Qwen-Image, Cosmos-Predict2) and
the Wan 2.2 5B VAE (48 channels, 16× in space).

`WanCodec` is the loaded model as the pipeline sees it: 8× (2.1) or 16× (2.2) in space, 4× causal in time
(1 + 4k frames <-> 1 + k latent frames), latents stored normalised per channel, (μ − mean) / std. Decoding streams latent frames in
chunks carrying the causal cache (exact, memory constant in the clip's length); encoding takes the clip's first
1 + 4k frames, then 4k at a time, carrying the cache between the runner's batches (`clip`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from einops import rearrange

from vaecli.errors import UsageError
from vaecli.model.family import Checkpoint, Codec, Family, FrameRule, Normalization
from vaecli.model.plan import COST_MODELS, Budget, Plan, format_bytes
from vaecli.model.wan import layout as wan_layout
from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.modules import WanVAE
from vaecli.ops.attention import resolve_attention
from vaecli.ops.device import dtype_name

RULE = FrameRule(4, causal=True)
LIVE_TENSORS = 6  # full-resolution tensors alive at once in a chunk (input, norm, conv output, shortcut, cat, out)
MAX_ENCODE_FRAMES = 32


@dataclass(frozen=True)
class Chunks:
    """A Wan decode's cut: `latent` latent frames per decoder call (the causal cache carried between calls)."""

    latent: int

    def describe(self) -> str:
        return f"{self.latent} latent frame(s) per call, the causal cache carried (exact)"

    def to_dict(self) -> dict:
        return {"latent_frames": self.latent}


class WanCodec(Codec):
    """A loaded Wan VAE (`vae`, on `device` in `dtype`), or one on the meta device that prices plans."""

    family = "wan"
    video_latents = True

    def __init__(self, vae: WanVAE, name: str, hash: str, device: torch.device | None = None):
        self.vae, self.config = vae, vae.config
        self.name, self.hash = name, hash
        param = next(vae.parameters())
        self.resident = param.device.type != "meta"
        self.device, self.dtype = device or param.device, param.dtype
        self.spatial_factor = self.config.spatial_factor
        self.frame_rule = RULE
        self.latent_channels = self.config.z_dim
        self.in_channels = self.config.pixel_channels
        self.normalization = Normalization("per-channel", mean=self.config.latents_mean, std=self.config.latents_std)

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters())

    def metadata(self) -> dict[str, str]:
        return {"wan.version": self.config.version}

    # -- prices: activations of one call of n output frames at full resolution, plus the causal cache ---------

    def _frame_bytes(self, pixels: int) -> int:
        """One frame of the widest full-resolution activation (2.2: at half resolution, after the pixel patches)."""
        c = self.config
        if c.residual:
            widest = max(c.dim, c.dec_dim) * max(c.dim_mult[0], c.dim_mult[1] / 4) / c.patch_size ** 2
        else:
            widest = c.dim * max(c.dim_mult[0], c.dim_mult[1] // 2 or 1)
        return int(pixels * widest * torch.empty((), dtype=self.dtype).element_size())

    def _cache_bytes(self, pixels: int) -> int:
        """Two frames per causal convolution, at most the full-resolution width (an upper bound)."""
        convs = sum(1 for m in self.vae.decoder.modules() if getattr(m, "time_pad", 0))
        return 2 * convs * self._frame_bytes(pixels)

    def _price(self, frames_out: int, pixels: int) -> int:
        cost = COST_MODELS.get(self.device.type, COST_MODELS["cpu"])
        return cost.predict(LIVE_TENSORS * frames_out * self._frame_bytes(pixels) + self._cache_bytes(pixels))

    def _plan(self, stage, budget, backend, strategy, chunk, act, reasons, pieces=None) -> Plan:
        return Plan(stage, str(budget.device), dtype_name(self.dtype), backend, strategy, chunk, 0, act,
                    budget.activation_bytes, self.weights_bytes(), tuple(reasons), pieces=pieces)

    def plan_decode(self, frames: int, latent_hw: tuple[int, int], budget: Budget, *, attention: str = "auto",
                    chunk: int | None = None, overlap: int | None = None, tile: int | None = None) -> Plan:
        if tile is not None or overlap:
            raise UsageError("a Wan decode streams latent frames exactly; --tile and --overlap are not for it yet")
        backend = resolve_attention(attention, budget.device, self.dtype)
        pixels = latent_hw[0] * latent_hw[1] * self.spatial_factor ** 2
        sizes = [chunk] if chunk else range(min(frames, 16), 0, -1)
        c = next((c for c in sizes if self._price(4 * c, pixels) <= budget.activation_bytes), sizes[-1] if chunk
                 else 1)
        act = self._price(4 * c, pixels)
        why = [f"budget {format_bytes(max(budget.activation_bytes, 0))} for activations on {budget.device}",
               f"{c} latent frame(s) per call ({4 * c} frames), the causal cache carried: exact, memory constant "
               "in the clip's length", f"attention {backend.name}"]
        return self._plan("decode", budget, backend, "stream", c, act, why, Chunks(c))

    def plan_encode(self, frames: int, size_hw: tuple[int, int], budget: Budget, *, attention: str = "auto",
                    batch: int | None = None) -> Plan:
        backend = resolve_attention(attention, budget.device, self.dtype)
        pixels = size_hw[0] * size_hw[1]
        if batch is not None and batch % 4:
            raise UsageError(f"--batch {batch}: a Wan encode takes multiples of 4 frames per call")
        sizes = [batch] if batch else range(min(MAX_ENCODE_FRAMES, max(4, frames - 1)) // 4 * 4, 0, -4)
        n = next((n for n in sizes if self._price(n + 1, pixels) <= budget.activation_bytes), sizes[-1])
        why = [f"budget {format_bytes(max(budget.activation_bytes, 0))} for activations on {budget.device}",
               f"the first {n + 1} frames, then {n} per call, the causal cache carried (exact)",
               f"attention {backend.name}"]
        return self._plan("encode", budget, backend, "batches", n, self._price(n + 1, pixels), why)

    # -- running ------------------------------------------------------------------------------------------

    def moments(self, x: torch.Tensor, plan: Plan, clip: dict | None = None) -> torch.Tensor:
        """Frames (n, 3, H, W) of one batch -> moments (t, 2z, h, w). `clip` keeps the causal cache between the
        batches of a clip; it is updated only when the batch succeeded (a redo in another dtype starts from it)."""
        clip = {} if clip is None else clip
        cache = self._cache(clip)
        video = rearrange(x.to(self.device, self.dtype), "t c h w -> 1 c t h w")
        with torch.inference_mode():
            out = self.vae.encode_chunk(video, cache, plan.attention)
        clip.update(owner=self, cache=cache)
        return rearrange(out, "1 c t h w -> t c h w")

    def _cache(self, clip: dict) -> dict:
        """This codec's copy of the clip's cache (keys remapped and values cast when another codec, e.g. the
        precision fallback's, made it)."""
        cache, owner = clip.get("cache", {}), clip.get("owner")
        if owner is None or owner is self:
            return dict(cache)
        names = {m: n for n, m in owner.vae.named_modules()}
        mine = dict(self.vae.named_modules())
        return {mine[names[m]]: (v.to(self.dtype) if isinstance(v, torch.Tensor) else v) for m, v in cache.items()}

    def decode(self, z: torch.Tensor, plan: Plan, *, check_finite: bool = False) -> Iterator[torch.Tensor]:
        """Raw latents of one clip (t, z, h, w) -> frames (n, 3, H, W) in [-1, 1], one block per decoder call."""
        step = plan.pieces.latent if plan.pieces is not None else z.shape[0]
        video = rearrange(z.to(self.device, self.dtype), "t c h w -> 1 c t h w")
        cache: dict = {}
        with torch.inference_mode():
            for start in range(0, video.shape[2], step):
                out = self.vae.decode_chunk(video[:, :, start:start + step], cache, plan.attention)
                yield rearrange(out, "1 c t h w -> t c h w")

    def in_dtype(self, dtype: torch.dtype) -> "WanCodec":
        if dtype == self.dtype:
            return self
        return WanCodec(copy.deepcopy(self.vae).to(dtype), self.name, self.hash, self.device)


class WanFamily(Family):
    name = "wan"
    title = "Wan 2.1 / 2.2 video VAE"
    layouts = wan_layout.LAYOUTS_TRIED

    def claims(self, keys: frozenset[str]):
        return wan_layout.detect_layout(keys)

    def read(self, path: Path, layout, header: dict, metadata: dict[str, str], config_json: dict, config) -> Checkpoint:
        state, inferred, dtypes = wan_layout.read_state(path, layout, header, config_json)
        return Checkpoint(path, self, layout, state, inferred, dtypes, dict(metadata))

    def _vae(self, config: WanConfig, state, device, dtype) -> WanVAE:
        with torch.device("meta"):
            vae = WanVAE(config)
        if state is None:
            return vae.to(dtype).eval().requires_grad_(False)
        vae.load_state_dict(state, strict=True, assign=True)
        return vae.to(device, dtype).eval().requires_grad_(False)

    def build(self, ckpt: Checkpoint | None, *, device: torch.device, dtype: torch.dtype, attention: str = "auto",
              config: WanConfig | None = None, name: str | None = None, hash: str | None = None) -> WanCodec:
        if ckpt is None:
            return WanCodec(self._vae(config, None, device, dtype), name or config.name, hash or "", device)
        return WanCodec(self._vae(ckpt.config, ckpt.state, device, dtype), name or ckpt.config.name, hash or "")

    def module(self, ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype, attention) -> WanVAE:
        return self._vae(ckpt.config, ckpt.state, device, dtype)

    def describe(self, ckpt: Checkpoint) -> tuple[dict, list[str]]:
        cfg: WanConfig = ckpt.config
        norm = Normalization("per-channel", mean=cfg.latents_mean, std=cfg.latents_std)
        fields = {"layout": ckpt.layout.naming, "prefix": ckpt.layout.prefix, "version": cfg.version,
                  "latent_channels": cfg.z_dim, "spatial_factor": cfg.spatial_factor,
                  "frame_rule": RULE.to_dict(), "normalization": norm.to_dict()}
        extra = f", decoder dim {cfg.dec_dim}, {cfg.patch_size}×{cfg.patch_size} pixel patches" if cfg.residual else ""
        lines = [f"config:      {cfg.name}  (Wan {cfg.version}: dim {cfg.dim}, dim_mult {list(cfg.dim_mult)}, "
                 f"{cfg.num_res_blocks} res blocks, time halved at {list(cfg.temperal_downsample)}{extra})",
                 f"latents:     {cfg.z_dim} channels, 1/{cfg.spatial_factor} size, {RULE.describe()}, "
                 "normalised per channel (mean/std)"]
        return fields, lines

    def convert(self, ckpt: Checkpoint, out, *, to: str, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
        to = to or "original"
        if to not in ("original", "diffusers"):
            raise UsageError(f"--to must be original or diffusers for a Wan VAE, not {to!r}")
        return wan_layout.save_checkpoint(ckpt.state, ckpt.config, out, layout=to, overwrite=overwrite, dtype=dtype)


FAMILY = WanFamily()
