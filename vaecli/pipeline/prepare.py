"""One preparation for each job, shared by `vaecli plan`, `encode` and `decode`: the options, the source or latent
file opened and checked against the model (family, channels, frame rule, hash, geometry, sizes), and the planning
call. Nothing here touches the model's weights; the runner (`vaecli.pipeline.runner`) executes what is prepared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from vaecli.errors import InputError, printable
from vaecli.model.family import Codec
from vaecli.model.plan import Budget, Plan
from vaecli.ops.validate import DEFAULT_MAX_PIXELS, pixels
from vaecli.pipeline.frames import Geometry, plan_geometry
from vaecli.pipeline.latents_io import LatentFile, open_latents
from vaecli.pipeline.planner import decode_plan, encode_plan
from vaecli.pipeline.video_io import FrameSource, Selection


@dataclass(frozen=True)
class EncodeOptions:
    selection: Selection = field(default_factory=Selection)
    size: tuple[int, int] | None = None
    fit: str = "pad"
    sample: bool = False
    seed: int = 0
    batch: int | None = None  # frames per encoder call; None = planned from free memory
    max_memory: int | None = None
    attention: str = "auto"
    save_moments: bool = False
    export_comfy: bool = False
    frames_fit: str | None = None  # "trim" or "pad" a length off the model's frame rule; None: refuse it
    latent_space: str = "normalized"  # or "raw": what the `latents` tensor stores
    latent_dtype: torch.dtype = torch.float32
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # per source frame


@dataclass(frozen=True)
class DecodeOptions:
    fmt: str | None = None
    crf: int = 18
    fps: Fraction | None = None
    chunk: int | None = None  # frames per window; None = planned, 0 = one clip
    overlap: int | None = None  # frames shared by neighbouring windows; None = planned
    tile: int | None = None  # force square tiles of this many latent pixels
    max_memory: int | None = None
    attention: str = "auto"
    native_size: bool = False
    allow_model_mismatch: bool = False
    allow_nonfinite: bool = False  # decode latents holding NaN/inf anyway (they come out black)
    latent_space: str | None = None  # "normalized" or "raw" for files that do not say
    max_pixels: int = DEFAULT_MAX_PIXELS  # per decoded frame
    overwrite: bool = False
    scratch: Path | None = None  # folder for a clip kept on disk (default: beside the output)


@dataclass
class EncodeJob:
    """One encode, prepared before any model work (also what `vaecli plan` prints for a video):
    the source, its geometry, the expected frame count and the planning function."""

    codec: Codec
    source: FrameSource
    spec: str
    geometry: Geometry
    frames: int
    opts: EncodeOptions

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.geometry.processed[1], self.geometry.processed[0]

    def plan(self, budget: Budget | None = None) -> Plan:
        """The plan within --max-memory as forced (budget None), or within `budget` (OOM recovery)."""
        o = self.opts
        return encode_plan(self.codec, self.frames, self.size_hw, max_memory=o.max_memory, attention=o.attention,
                           batch=o.batch, budget=budget)


def prepare_encode(codec: Codec, source_spec: str, opts: EncodeOptions) -> EncodeJob:
    """Open the source, fit its size to the model, check sizes and the frame count against the model."""
    source = FrameSource(source_spec, opts.max_pixels)
    probe = source.frames(opts.selection)
    try:
        _, first = next(probe)
    finally:
        probe.close()
    source_size = (first.shape[1], first.shape[0])
    geometry = plan_geometry(source_size, codec.spatial_factor, opts.fit, opts.size)
    for size in (geometry.resized, geometry.processed):  # --size may ask for more than the source holds
        pixels(*size, printable(source_spec), opts.max_pixels)
    codec.check_size(*geometry.processed, printable(source_spec))
    frames = expected_frames(opts.selection, source.count)
    if frames is not None and opts.frames_fit:
        frames = codec.frame_rule.fit(frames, opts.frames_fit, printable(source_spec))
    elif frames is not None:
        codec.frame_rule.check(frames, printable(source_spec))
    return EncodeJob(codec, source, source_spec, geometry, frames or 16, opts)


def expected_frames(selection: Selection, source_count: int | None) -> int | None:
    """Frames a selection takes from a source of `source_count` frames (None: not known before reading)."""
    if source_count is None:
        return selection.count
    available = max(0, -(-(source_count - selection.start) // selection.stride))
    return min(available, selection.count) if selection.count else available


def check_model(lf: LatentFile, model: Codec, allow_mismatch: bool) -> None:
    if lf.family is not None and lf.family != model.family:
        raise InputError(f"{lf.path}: latents were made by a {lf.family} model, not a {model.family} one like "
                         f"{model.name}; pass the model they were made with (--model)")
    if lf.shape[1] != model.latent_channels:
        raise InputError(f"{lf.path}: latents have {lf.shape[1]} channels but model {model.name} takes "
                         f"{model.latent_channels}; pass the model they were made with (--model)")
    if lf.frame_rule is not None and lf.frame_rule != model.frame_rule:
        raise InputError(f"{lf.path}: latents follow the frame rule {lf.frame_rule.describe()}, model {model.name} "
                         f"{model.frame_rule.describe()}; pass the model they were made with (--model)")
    made_with = lf.metadata.get("model.hash")
    if made_with and made_with != model.hash and not allow_mismatch:
        raise InputError(f"{lf.path}: latents were made with model {lf.metadata.get('model.name')} "
                         f"({made_with}), not {model.name} ({model.hash}); pass that model with --model, "
                         "or --allow-model-mismatch to decode anyway")


@dataclass
class DecodeJob:
    """One decode, prepared before any model work (also what `vaecli plan` prints for a latent file)."""

    codec: Codec
    latents: LatentFile
    opts: DecodeOptions
    scratch: Path | None = None  # where a clip that fits nowhere in memory is kept on disk

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.latents.shape[2], self.latents.shape[3]

    @property
    def frames(self) -> int:
        """Output frames (those `--frames-fit pad` added at encode are dropped again)."""
        return self.latents.output_frames(self.codec.frame_rule)

    def plan(self, budget: Budget | None = None) -> Plan:
        o = self.opts
        return decode_plan(self.codec, self.latents.frames, self.latent_hw, max_memory=o.max_memory,
                           attention=o.attention, chunk=o.chunk, overlap=o.overlap, tile=o.tile, budget=budget,
                           scratch=self.scratch)


def prepare_decode(codec: Codec, latents_path: Path | str, opts: DecodeOptions) -> DecodeJob:
    """Open and validate the latent file against the model (family, channels, frame rule, hash, geometry, size)."""
    lf = open_latents(latents_path, opts.max_pixels).with_space(opts.latent_space, codec)
    check_model(lf, codec, opts.allow_model_mismatch)
    h, w = lf.shape[2], lf.shape[3]
    f = codec.spatial_factor
    if lf.geometry is not None and lf.geometry.processed != (w * f, h * f):
        raise InputError(f"{printable(latents_path)}: geometry says frames of {lf.geometry.processed[0]}x"
                         f"{lf.geometry.processed[1]}, but model {codec.name} decodes these latents to "
                         f"{w * f}x{h * f}; pass the model they were made with")
    pixels(w * f, h * f, printable(latents_path), opts.max_pixels)
    codec.check_size(w * f, h * f, printable(latents_path))
    return DecodeJob(codec, lf, opts, opts.scratch or Path(latents_path).parent)
