"""The Wan family behind the family seam: the Wan 2.1 VAE (Wan 2.1, Wan 2.2 14B, Qwen-Image, Cosmos-Predict2) and
the Wan 2.2 5B VAE (48 channels, 16× in space).

`WanCodec` is the loaded model as the pipeline sees it: 8× (2.1) or 16× (2.2) in space, 4× causal in time
(1 + 4k frames <-> 1 + k latent frames), latents stored normalised per channel, (μ − mean) / std. Decoding streams latent frames in
chunks carrying the causal cache (exact, memory constant in the clip's length); encoding takes the clip's first
1 + 4k frames, then 4k at a time, carrying the cache between the runner's batches (`clip`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from einops import rearrange

from vaecli.errors import UsageError
from vaecli.model.checkpoint import read_header
from vaecli.model.family import Checkpoint, Codec, Family, FrameRule, NonFiniteActivation, Normalization
from vaecli.model.plan import COST_MODELS, Budget, Plan, format_bytes
from vaecli.model.wan import layout as wan_layout
from vaecli.model.wan import memory as wan_memory
from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.conv import channels_last_
from vaecli.model.wan.modules import WanVAE
from vaecli.model.wan.tiles import decode_columns, decode_tiled, tile_work
from vaecli.ops.attention import AttentionBackend, resolve_attention
from vaecli.ops.device import dtype_name, release_host_memory

RULE = FrameRule(4, causal=True)
MAX_ENCODE_FRAMES = {"cpu": 4}  # pixel frames per encoder call after the first, at most; 32 elsewhere
MAX_DECODE_FRAMES = {"cpu": 1}  # latent frames per decoder call, at most; 16 elsewhere
# On CPU smaller calls are faster (oneDNN's convolutions stay in cache): released 2.1 width, 17 frames of 96x96,
# fp32, 2 cores: decode 10.98 s one latent frame per call against 13.57 s for the whole clip in one call; encode
# 4 frames per call faster than 16 (docs/performance.md).


TILES = (128, 96, 64, 48, 32, 24, 16, 12, 8)  # latent px, tried largest first when whole frames do not fit
MAX_TILE_WORK = 4.0  # tiles computing more than this times whole frames' work (their halos) only when forced
# Tiles run tile-major when whole frames do not fit: step by step every tile keeps its own causal caches, halo
# included, and the caches are most of a large frame's decode (with the largest frames run one at a time, no
# step-by-step tile was cheaper than whole frames at 720p for 2.1 or 2.2, docs/memory.md); --tile N forces them.


@dataclass(frozen=True)
class Chunks:
    """A Wan decode's cut: `latent` latent frames per decoder call (the causal cache carried between calls);
    with `tile`, the decoder's tail in square tiles of that many latent px, each grown by `halo` (exact): every
    tile of a call, then the next call, or with `columns` tile-major, each tile through the whole clip."""

    latent: int
    tile: int | None = None
    halo: int = 0
    columns: bool = False

    def describe(self) -> str:
        if not self.tile:
            return f"{self.latent} latent frame(s) per call, the causal cache carried (exact)"
        where = f"tiles of {self.tile} latent px (halo {self.halo}), {self.latent} latent frame(s) per call"
        if self.columns:
            return (f"{where}, each tile through the whole clip with its own causal cache (exact; the clip's "
                    "stem output and frames held: memory grows with its length)")
        return f"{where}, the causal caches carried (exact)"

    def to_dict(self) -> dict:
        return {"latent_frames": self.latent, "tile": self.tile, "halo": self.halo,
                "order": "tile-major" if self.columns else "step-major"}


class WanCodec(Codec):
    """A loaded Wan VAE (`vae`, on `device` in `dtype`), or one on the meta device that prices plans."""

    family = "wan"
    video_latents = True

    def __init__(self, vae: WanVAE, name: str, hash: str, device: torch.device | None = None,
                 source: tuple[Path, wan_layout.Layout] | None = None):
        self.vae, self.config = vae, vae.config
        self._source = source  # the file and layout it was read from, to read again in another dtype
        self.name, self.hash = name, hash
        param = next(vae.parameters())
        self.resident = param.device.type != "meta"
        self.device, self.dtype = device or param.device, param.dtype
        self.spatial_factor = self.config.spatial_factor
        self.frame_rule = RULE
        self.latent_channels = self.config.z_dim
        self.in_channels = self.config.pixel_channels
        self.normalization = Normalization("per-channel", mean=self.config.latents_mean, std=self.config.latents_std)
        self._prices: dict[tuple, int] = {}  # memoised counted prices

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters())

    def metadata(self) -> dict[str, str]:
        return {"wan.version": self.config.version}

    # -- prices: the codec's own code counted (`vaecli.model.wan.memory`), through the device's cost model --

    def _priced(self, key: tuple, counted) -> int:
        if key not in self._prices:
            self._prices[key] = COST_MODELS.get(self.device.type, COST_MODELS["cpu"]).predict(counted())
        return self._prices[key]

    def _encode_price(self, frames: int, size_hw: tuple[int, int], batch: int, backend: AttentionBackend) -> int:
        """Predicted activations of encoding `frames` frames of `size_hw`, the first 1 + batch then `batch` per call."""
        return self._priced(("encode", frames, size_hw, batch, backend.name),
                            lambda: wan_memory.encode_peak(self, frames, size_hw, batch, backend))

    def _decode_price(self, frames: int, latent_hw: tuple[int, int], pieces: Chunks, backend: AttentionBackend) -> int:
        """Predicted activations of decoding `frames` latent frames of `latent_hw` cut as `pieces`."""
        return self._priced(("decode", frames, latent_hw, pieces, backend.name),
                            lambda: wan_memory.decode_peak(self, frames, latent_hw, pieces, backend))

    def _plan(self, stage, budget, backend, strategy, chunk, act, reasons, pieces=None) -> Plan:
        return Plan(stage, str(budget.device), dtype_name(self.dtype), backend, strategy, chunk, 0, act,
                    budget.activation_bytes, self.weights_bytes(), tuple(reasons), pieces=pieces)

    def plan_decode(self, frames: int, latent_hw: tuple[int, int], budget: Budget, *, attention: str = "auto",
                    chunk: int | None = None, overlap: int | None = None, tile: int | None = None) -> Plan:
        """Whole frames, as many latent frames per call as fit (up to 16; 1 on CPU, where that is fastest); else
        one latent frame per call in the tile-major tiles of the least work that fit (down to 8 latent px, at most
        `MAX_TILE_WORK` times whole frames' work: one tile's caches alive, the clip's stem output and frames
        held); else the cheapest of them. `--chunk` / `--tile` force the cut (forced tiles step by step where they
        fit, else tile-major); all of them exact."""
        if overlap:
            raise UsageError("a Wan decode streams latent frames exactly; --overlap is not for it")
        backend = resolve_attention(attention, budget.device, self.dtype)
        halo = self.vae.decoder.halo()
        if tile is not None and halo is None:
            raise UsageError("this Wan decoder has attention in its levels; it decodes whole frames (drop --tile)")

        def pieces(cut: tuple[int, int | None, bool]) -> Chunks:
            c, t, columns = cut
            return Chunks(c, t, halo if t else 0, columns)

        def price(cut: tuple[int, int | None, bool]) -> int:
            return self._decode_price(frames, latent_hw, pieces(cut), backend)

        def first_fit(cuts: list) -> tuple[int, int | None, bool] | None:
            return next((cut for cut in cuts if price(cut) <= budget.activation_bytes), None)

        most = MAX_DECODE_FRAMES.get(budget.device.type, 16)
        sizes = [chunk] if chunk else list(range(min(frames, most), 0, -1))
        cuts = [(c, tile, False) for c in sizes]  # forced tiles, or whole frames: the most latent frames per call
        cut = first_fit(cuts) or cuts[-1]
        if halo is not None and price(cut) > budget.activation_bytes:  # tile-major: forced tiles, or those of the
            works = {t: tile_work(*latent_hw, t, halo) for t in TILES if t < max(latent_hw)}  # least work that fit
            sides = [tile] if tile else sorted((t for t in works if works[t] <= MAX_TILE_WORK), key=works.get)
            tiled = [(sizes[-1], t, True) for t in sides]
            cut = first_fit(tiled) or min([cut, *tiled], key=price)
        act, chosen = price(cut), pieces(cut)
        work = tile_work(*latent_hw, chosen.tile, chosen.halo) if chosen.tile else 1.0
        why = [f"budget {format_bytes(max(budget.activation_bytes, 0))} for activations on {budget.device}",
               chosen.describe() if chosen.columns else chosen.describe() + ": memory constant in the clip's length",
               f"attention {backend.name}"]
        return dataclasses.replace(self._plan("decode", budget, backend, "stream", chosen.latent, act, why, chosen),
                                   work=work)

    def plan_encode(self, frames: int, size_hw: tuple[int, int], budget: Budget, *, attention: str = "auto",
                    batch: int | None = None) -> Plan:
        backend = resolve_attention(attention, budget.device, self.dtype)
        if batch is not None and batch % 4:
            raise UsageError(f"--batch {batch}: a Wan encode takes multiples of 4 frames per call")
        most = MAX_ENCODE_FRAMES.get(budget.device.type, 32)
        sizes = [batch] if batch else range(min(most, max(4, frames - 1)) // 4 * 4, 0, -4)
        fits = (n for n in sizes if self._encode_price(frames, size_hw, n, backend) <= budget.activation_bytes)
        n = next(fits, sizes[-1])
        why = [f"budget {format_bytes(max(budget.activation_bytes, 0))} for activations on {budget.device}",
               f"the first {n + 1} frames, then {n} per call, the causal cache carried (exact)",
               f"attention {backend.name}"]
        return self._plan("encode", budget, backend, "batches", n, self._encode_price(frames, size_hw, n, backend), why)

    # -- running ------------------------------------------------------------------------------------------

    def moments(self, x: torch.Tensor, plan: Plan, clip: dict | None = None) -> torch.Tensor:
        """Frames (n, 3, H, W) of one batch -> moments (t, 2z, h, w). `clip` keeps the causal cache between the
        batches of a clip. In half precision the batch works on a copy of the cache's dict (the replaced tensors
        stay alive until it ends: one cache more) and commits it only when the moments are finite, so the
        guard's redo in a wider dtype starts from the cache before the batch; in fp32 the cache is updated in
        place."""
        clip = {} if clip is None else clip
        cache = self._take(clip)
        if self.dtype != torch.float32:
            cache = _moved(cache, lambda m: m, None, keep=True)
        video = rearrange(x.to(self.device, self.dtype), "t c h w -> 1 c t h w")
        with torch.inference_mode():
            out = self.vae.encode_chunk(video, cache, plan.attention)
        if _finite(out):  # else the guard redoes it wider
            clip.update(owner=self, cache=cache)
        if self.resident:
            release_host_memory(self.device)
        return rearrange(out, "1 c t h w -> t c h w")

    def _take(self, clip: dict) -> dict:
        """The clip's causal cache for this codec: its own, or another dtype's codec's (the precision fallback's)
        moved over, keys remapped and tensors cast, entry by entry (the other's is emptied: one tensor more at a
        time) and committed to the clip at once."""
        cache, owner = clip.setdefault("cache", {}), clip.get("owner")
        if owner is None or owner is self:
            return cache
        names = {m: n for n, m in owner.vae.named_modules()}
        mine = dict(self.vae.named_modules())
        cache = _moved(cache, lambda m: mine[names[m]], self.dtype)
        clip.update(owner=self, cache=cache)
        return cache

    def decode_steps(self, plan: Plan, frames: int) -> list[tuple[int, int]]:
        n = plan.pieces.latent if plan.pieces is not None and not plan.pieces.columns else frames
        return [(a, min(a + n, frames)) for a in range(0, frames, n)]

    def decode(self, z: torch.Tensor, plan: Plan, *, check_finite: bool = False,
               clip: dict | None = None, sample: bool = False) -> Iterator[torch.Tensor]:
        """Raw latents of a clip or of its next steps (t, z, h, w) -> frames (n, 3, H, W) in [-1, 1], one block
        per decoder call (whole frames, or the plan's tiles). `clip` carries the causal cache from step to step,
        updated in place; a step that fails (inf/NaN, raised when `check_finite`, or an error) leaves it dirty,
        and the next decode rebuilds it from the raw latents of the steps done (kept in `clip`: a latent frame
        is 1/48 of a frame or less), its frames dropped, so a redo in a wider dtype costs time, not memory.
        sample: for pricing only (`decode_tiled(sample=True)`)."""
        pieces = plan.pieces if plan.pieces is not None else Chunks(z.shape[0])
        clip = {} if clip is None else clip
        if pieces.columns:
            yield from self._decode_columns(z, pieces, plan, check_finite, sample)
            return
        with torch.inference_mode():
            if clip.get("dirty"):
                clip.update(owner=self, cache={}, dirty=False)
                for done in clip.get("history", []):
                    self._decode_part(done, clip["cache"], pieces, plan)
            state = self._take(clip)
            for start in range(0, z.shape[0], pieces.latent):
                part = z[start:start + pieces.latent]
                clip["dirty"] = True
                out = self._decode_part(part, state, pieces, plan, sample)
                if check_finite and not _finite(out):
                    raise NonFiniteActivation(f"inf/NaN in {dtype_name(self.dtype)}")
                clip["dirty"] = False
                clip.setdefault("history", []).append(part)
                if self.resident:
                    release_host_memory(self.device)  # the heap's holes between steps (counting does not see them)
                yield out

    def _decode_columns(self, z: torch.Tensor, pieces: Chunks, plan: Plan, check_finite: bool,
                        sample: bool) -> Iterator[torch.Tensor]:
        """Raw latents of a whole clip (t, z, h, w) -> its frames tile-major (`decode_columns`), all computed (and
        checked, when `check_finite`) before the first block is handed out, then one block per call's frames."""
        with torch.inference_mode():
            part = rearrange(z.to(self.device, self.dtype), "t c h w -> 1 c t h w")
            out = decode_columns(self.vae, part, plan.attention, pieces.latent, pieces.tile, pieces.halo, sample)
            del part
            if check_finite and not _finite(out):
                raise NonFiniteActivation(f"inf/NaN in {dtype_name(self.dtype)}")
            frames = rearrange(out, "1 c t h w -> t c h w")
            start, step = 0, 1 + self.config.temporal_factor * (pieces.latent - 1)
            while start < frames.shape[0]:
                yield frames[start:start + step]
                start, step = start + step, self.config.temporal_factor * pieces.latent

    def _decode_part(self, z: torch.Tensor, state: dict, pieces: Chunks, plan: Plan,
                     sample: bool = False) -> torch.Tensor:
        """Raw latents (t, z, h, w) of one decoder call -> frames (n, 3, H, W), the cache `state` updated."""
        part = rearrange(z.to(self.device, self.dtype), "t c h w -> 1 c t h w")
        if pieces.tile:
            out = decode_tiled(self.vae, part, state, plan.attention, pieces.tile, pieces.halo, sample)
        else:
            out = self.vae.decode_chunk(part, state, plan.attention)
        return rearrange(out, "1 c t h w -> t c h w")

    def in_dtype(self, dtype: torch.dtype) -> "WanCodec":
        """The same weights in `dtype`: the file read again (a bf16 redo of an fp16 model is the checkpoint in
        bf16, not the fp16 weights re-rounded); a copy cast when there is no file."""
        if dtype == self.dtype:
            return self
        if self._source is None:
            return WanCodec(copy.deepcopy(self.vae).to(dtype), self.name, self.hash, self.device)
        path, layout = self._source
        state, _, _ = wan_layout.read_state(path, layout, read_header(path)[0], {})
        return WanCodec(build_vae(self.config, state, self.device, dtype), self.name, self.hash, self.device,
                        self._source)


def build_vae(config: WanConfig, state: dict[str, torch.Tensor] | None, device, dtype) -> WanVAE:
    """The modules with `state` (strict) on `device` in `dtype`, or on the meta device without a state."""
    with torch.device("meta"):
        vae = WanVAE(config)
    if state is None:
        return channels_last_(vae.to(dtype).eval().requires_grad_(False))
    vae.load_state_dict(state, strict=True, assign=True)
    return channels_last_(vae.to(device, dtype).eval().requires_grad_(False))


def _finite(x: torch.Tensor) -> bool:
    """No inf/NaN in a half-precision result (fp32 results and shape-only tensors pass unchecked)."""
    return x.dtype == torch.float32 or x.device.type == "meta" or bool(torch.isfinite(x).all())


def _moved(cache: dict, module_of, dtype: torch.dtype | None, keep: bool = False) -> dict:
    """A causal cache {module or tile key: tensor, marker or nested cache} as a new dict, module keys mapped by
    `module_of`, tensors cast to `dtype`. Entries leave `cache` as they are moved (one cast tensor more at a time)
    unless `keep` (a copy of the dicts sharing the tensors, which the convolutions replace, never write into)."""
    out = {}
    for key in list(cache):
        value = cache[key] if keep else cache.pop(key)
        if isinstance(value, dict):
            value = _moved(value, module_of, dtype, keep)
        elif dtype is not None and isinstance(value, torch.Tensor):
            value = value.to(dtype)
        out[module_of(key) if isinstance(key, torch.nn.Module) else key] = value
    return out


class WanFamily(Family):
    name = "wan"
    title = "Wan 2.1 / 2.2 video VAE"
    layouts = wan_layout.LAYOUTS_TRIED

    def claims(self, keys: frozenset[str]):
        return wan_layout.detect_layout(keys)

    def read(self, path: Path, layout, header: dict, metadata: dict[str, str], config_json: dict, config) -> Checkpoint:
        state, inferred, dtypes = wan_layout.read_state(path, layout, header, config_json)
        return Checkpoint(path, self, layout, state, inferred, dtypes, dict(metadata))

    def build(self, ckpt: Checkpoint | None, *, device: torch.device, dtype: torch.dtype, attention: str = "auto",
              config: WanConfig | None = None, name: str | None = None, hash: str | None = None) -> WanCodec:
        if ckpt is None:
            return WanCodec(build_vae(config, None, device, dtype), name or config.name, hash or "", device)
        return WanCodec(build_vae(ckpt.config, ckpt.state, device, dtype), name or ckpt.config.name, hash or "",
                        source=(ckpt.path, ckpt.layout))

    def module(self, ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype, attention) -> WanVAE:
        return build_vae(ckpt.config, ckpt.state, device, dtype)

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
