"""The seam between the pipeline and the model families: what a family tells, what a loaded model offers.

A **family** (the SVD temporal VAE with the SD/SDXL image VAEs is the first; `vaecli.model.svd`) is a package
under `vaecli/model/` with one `Family` object. It says which checkpoint layouts are its own (from header keys
only), reads its tensors and config, builds a model, describes it for `info` and converts between its layouts.

A loaded model is a `Codec`: the one interface the pipeline (`vaecli.pipeline`) and the CLI use. It says its
spatial and temporal factors, latent channels, the frame rule (pixel frames <-> latent frames), the latent
normalisation, checks input sizes, offers candidate plans with their price (`plan_decode`, `plan_encode`) and
runs encode/decode as a `Plan` says. Nothing in the pipeline imports a family by name; `families()` lists them.

Layouts: frames are `(T, C_in, H, W)` in [-1, 1]; latents `(t, C, h, w)` with h = H / spatial_factor; moments
`(t, 2C, h, w)` (mean, then log-variance). Latents handed to and from a codec are *raw* (the model's own space);
files store them normalised (`Normalization`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vaecli.errors import CheckpointError, InputError, UsageError

BUILTIN_FAMILIES = ("vaecli.model.svd", "vaecli.model.wan")  # module paths, each with a `FAMILY` object; imported on first need


class NonFiniteActivation(ArithmeticError):
    """A piece computed in half precision holds inf/NaN (the caller redoes the work in a wider dtype)."""


# ------------------------------------------------------------------------------------------ frames and latents


@dataclass(frozen=True)
class FrameRule:
    """How pixel frames map to latent frames.

    factor: temporal compression. causal: the first latent frame codes one frame alone (Wan: t latent frames
    <-> 1 + factor·(t - 1) frames); else t latent frames <-> factor·t frames (SVD: factor 1).
    """

    factor: int = 1
    causal: bool = False

    def pixel_frames(self, latent: int) -> int:
        if latent < 1:
            return 0
        return 1 + self.factor * (latent - 1) if self.causal else self.factor * latent

    def valid(self, frames: int) -> bool:
        if frames < 1:
            return False
        return (frames - 1) % self.factor == 0 if self.causal else frames % self.factor == 0

    def latent_frames(self, frames: int) -> int:
        """Latent frames of `frames` pixel frames (a valid length; see `check`)."""
        return (frames - 1) // self.factor + 1 if self.causal else frames // self.factor

    def nearest(self, frames: int) -> tuple[int | None, int]:
        """The valid lengths just below (None if there is none) and at or above `frames`."""
        above = next(n for n in range(max(1, frames), frames + self.factor + 1) if self.valid(n))
        below = next((n for n in range(min(frames, above) - 1, 0, -1) if self.valid(n)), None)
        return below, above

    def check(self, frames: int, where: str) -> int:
        """Latent frames of `frames`, or a one-line refusal naming the nearest valid lengths."""
        if self.valid(frames):
            return self.latent_frames(frames)
        below, above = self.nearest(frames)
        near = f"{below} or {above}" if below else str(above)
        raise InputError(f"{where}: {frames} frames do not fit the model's frame rule ({self.describe()}); take "
                         f"{near} frames (--frames), or pass --frames-fit trim|pad")

    def fit(self, frames: int, mode: str, where: str) -> int:
        """The valid length `--frames-fit mode` makes of `frames` frames: "trim" the one below, "pad" the one
        above (the input's last frame repeated)."""
        if self.valid(frames):
            return frames
        below, above = self.nearest(frames)
        if mode == "pad":
            return above
        if below is None:
            raise InputError(f"{where}: {frames} frames are fewer than the model's frame rule takes "
                             f"({self.describe()}); pass --frames-fit pad")
        return below

    def anchors(self, frames: int, starts_clip: bool = True) -> list[int]:
        """For a batch of `frames` frames (1 + factor·k at a causal clip's start, else factor·k), the position of
        the first frame of each latent frame's group."""
        if self.causal and starts_clip:
            return [0] + list(range(1, frames, self.factor))
        return list(range(0, frames, self.factor))

    def describe(self) -> str:
        if self.factor == 1:
            return "one latent frame per frame"
        if self.causal:
            return f"1 + {self.factor}k frames -> 1 + k latent frames"
        return f"{self.factor}k frames -> k latent frames"

    def to_dict(self) -> dict:
        return {"factor": self.factor, "causal": self.causal}


@dataclass(frozen=True)
class Normalization:
    """How stored latents relate to the model's raw latents.

    kind "scale": stored = raw · factor (SD/SVD `scaling_factor`); kind "per-channel": stored = (raw − mean) / std
    with one mean and std per latent channel (Wan, LTX).
    """

    kind: str = "scale"
    factor: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("scale", "per-channel"):
            raise ValueError(f"unknown normalisation kind {self.kind!r}")
        values = (self.factor,) if self.kind == "scale" else self.mean + self.std
        if self.kind == "per-channel" and (not self.mean or len(self.mean) != len(self.std)):
            raise ValueError("per-channel normalisation needs one mean and one std per channel")
        if not all(math.isfinite(v) for v in values) or (self.kind == "scale" and self.factor <= 0) or \
                any(s <= 0 for s in self.std):
            raise ValueError("normalisation values must be finite, factors and stds positive")

    def _vectors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.mean), 1, 1)  # (t, C, h, w) latents: one value per channel
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (t, C, h, w) -> the stored space."""
        if self.kind == "scale":
            return raw * self.factor
        mean, std = self._vectors(raw)
        return (raw - mean) / std

    def denormalize(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored latents (t, C, h, w) -> raw."""
        if self.kind == "scale":
            return stored / self.factor
        mean, std = self._vectors(stored)
        return stored * std + mean

    def to_dict(self) -> dict:
        if self.kind == "scale":
            return {"kind": "scale", "factor": self.factor}
        return {"kind": "per-channel", "mean": list(self.mean), "std": list(self.std)}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        """From `to_dict`'s form (validated: a bad value is a ValueError)."""
        if not isinstance(d, dict):
            raise ValueError("normalisation must be an object")
        if d.get("kind") == "scale":
            return cls("scale", float(d["factor"]))
        if d.get("kind") == "per-channel":
            return cls("per-channel", mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))
        raise ValueError(f"unknown normalisation kind {d.get('kind')!r}")


# ------------------------------------------------------------------------------------------ the loaded model


class Codec:
    """A loaded model as the pipeline sees it (subclassed by each family).

    Attributes: family (its name), name (the model's), hash (of the stored weights), config (the family's frozen
    config; only the family reads it), device (the compute device, also for a model priced on the meta device),
    dtype, spatial_factor, frame_rule, latent_channels, in_channels, normalization, resident, video_latents.
    """

    family: str
    name: str
    hash: str
    config: Any
    device: torch.device
    dtype: torch.dtype
    spatial_factor: int
    frame_rule: FrameRule
    latent_channels: int
    in_channels: int
    normalization: Normalization
    resident: bool = True  # False for a model built on the meta device to price plans (its weights not in memory)
    video_latents: bool = False  # ComfyUI and diffusers hold this family's latents 5-D, (1, C, T, h, w)
    dtype_reason: str = ""  # why the loader chose `dtype` (`vaecli.ops.device.choose_dtype`), for the plan

    def check_size(self, width: int, height: int, where: str) -> None:
        """Refuse frames of width x height (the model's processed size) it cannot code, with one line."""
        f = self.spatial_factor
        if width % f or height % f:
            raise InputError(f"{where}: {width}x{height} is not a multiple of {f} (use --fit)")

    def weights_bytes(self) -> int:
        raise NotImplementedError

    def input_device(self, plan) -> torch.device:
        """Where `moments` wants its frames for `plan` (the device, or the host for work parked there)."""
        return self.device

    def metadata(self) -> dict[str, str]:
        """Family facts stored in a latent file (strings), beside the generic ones."""
        return {}

    def plan_decode(self, frames: int, latent_hw: tuple[int, int], budget, *, attention: str = "auto",
                    chunk: int | None = None, overlap: int | None = None, tile: int | None = None):
        """The plan (`vaecli.model.plan.Plan`) to decode `frames` latent frames of latent_hw within `budget`
        (`vaecli.model.plan.Budget`): the first of the family's candidates that fits, exact ones first."""
        raise NotImplementedError

    def plan_encode(self, frames: int, size_hw: tuple[int, int], budget, *, attention: str = "auto",
                    batch: int | None = None):
        """The plan to encode `frames` frames of size_hw (pixels) within `budget`; `chunk_frames` of the plan
        is a multiple of what the frame rule needs per call."""
        raise NotImplementedError

    def moments(self, x: torch.Tensor, plan, clip: dict | None = None) -> torch.Tensor:
        """Frames (n, C_in, H, W) in [-1, 1] -> moments (t, 2C, h, w). n: a multiple of the frame rule's factor, or
        for a causal rule 1 + factor·k at the clip's start and factor·k after. clip: a dict the runner makes per
        clip and passes to every batch of it in order (where a causal model keeps what later batches need)."""
        raise NotImplementedError

    def decode_steps(self, plan, frames: int) -> list[tuple[int, int]]:
        """The latent frame ranges [a, b) of a clip of `frames` latent frames that `decode` takes one call at a
        time, in order, with the clip's state carried in `clip` (default: the whole clip in one call). Each step is
        checked and, in half precision, redone wider on its own."""
        return [(0, frames)]

    def decode(self, z: torch.Tensor, plan, *, check_finite: bool = False,
               clip: dict | None = None) -> Iterator[torch.Tensor]:
        """Raw latents of one clip, or of one of its `decode_steps` (t, C, h, w) -> its frames (n, C_out, H, W),
        ≈[-1, 1], a block at a time in order. check_finite: raise `NonFiniteActivation` as soon as a
        half-precision piece holds inf/NaN. clip: a dict the runner makes per clip and passes to every step of it
        in order (where a causal model keeps what later steps need; updated only by a step that succeeded)."""
        raise NotImplementedError

    def in_dtype(self, dtype: torch.dtype) -> "Codec":
        """The same model computing in `dtype` (for the precision fallback; built from the stored weights)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class Checkpoint:
    """A model read from a file: its family, layout (the family's value, with `describe()`), tensors in the
    family's own naming, config and file facts."""

    path: Path
    family: "Family"
    layout: Any
    state: dict[str, torch.Tensor]
    config: Any
    file_dtypes: tuple[str, ...]
    metadata: dict[str, str]

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


class Family:
    """What a model family tells the rest of vaecli (one object per family package, `FAMILY`)."""

    name: str = ""
    title: str = ""
    layouts: str = ""  # the layouts it reads, for "no model found" messages

    def claims(self, keys: frozenset[str]) -> Any | None:
        """The layout of a file whose tensor names are `keys`, if it is this family's (never another's), else None."""
        raise NotImplementedError

    def read(self, path: Path, layout: Any, header: dict, metadata: dict[str, str], config_json: dict,
             config: Any | str | None) -> Checkpoint:
        """Read this family's tensors of the file and work out its config (`config`: what the user named)."""
        raise NotImplementedError

    def load_config(self, name_or_path: str) -> Any | None:
        """A named config (or TOML file) of this family, or None when it is not this family's."""
        return None

    def build(self, ckpt: Checkpoint | None, *, device: torch.device, dtype: torch.dtype, attention: str = "auto",
              config: Any = None, name: str | None = None, hash: str | None = None) -> Codec:
        """A `Codec` of the checkpoint's weights; with ckpt None, of `config` on the meta device (plans only)."""
        raise NotImplementedError

    def module(self, ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype, attention: Any) -> torch.nn.Module:
        """The plain `nn.Module` of the public API (`vaecli.load_vae`)."""
        raise NotImplementedError

    def describe(self, ckpt: Checkpoint) -> tuple[dict, list[str]]:
        """What `info` prints: (JSON fields, human lines about the architecture)."""
        raise NotImplementedError

    def named(self) -> list[str]:
        """The names of this family's named configs."""
        return []

    def convert(self, ckpt: Checkpoint, out: Path, *, to: str, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
        """Write the checkpoint in layout `to` (`vaecli.model.checkpoint.write_checkpoint`); returns the output."""
        raise CheckpointError(f"the {self.name} family has no layout conversion")


_registered: list[Family] = []


def register(family: Family) -> None:
    """Add a family (tests, plugins) after the built-in ones; registering one twice replaces it."""
    _registered[:] = [f for f in _registered if f.name != family.name] + [family]


def unregister(name: str) -> None:
    _registered[:] = [f for f in _registered if f.name != name]


def families() -> list[Family]:
    """Every family: the built-in ones (imported here, on first need), then the registered ones."""
    found = [importlib.import_module(path).FAMILY for path in BUILTIN_FAMILIES]
    return found + [f for f in _registered if f.name not in {g.name for g in found}]


def detect(keys) -> tuple[Family, Any]:
    """The family and layout of a file from its tensor names; a CheckpointError names what was tried."""
    keys = frozenset(keys)
    for family in families():
        layout = family.claims(keys)
        if layout is not None:
            return family, layout
    sample = ", ".join(sorted(keys)[:5]) or "none"
    tried = "; ".join(f"{f.layouts} ({f.name} family)" for f in families())
    raise CheckpointError(f"no VAE found; layouts tried: {tried}; {len(keys)} keys, e.g. {sample}")


def load_config(name_or_path: str) -> tuple[Family, Any]:
    """A named config or TOML file -> (its family, the config)."""
    for family in families():
        config = family.load_config(name_or_path)
        if config is not None:
            return family, config
    names = sorted(n for f in families() for n in f.named())
    raise UsageError(f"unknown config {name_or_path!r}; named configs: {', '.join(names)}")
