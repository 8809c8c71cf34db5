"""Latent files: a streaming safetensors writer, a reader, the metadata schema and ComfyUI's `.latent`.

A vaecli latent file is a safetensors file with
- `latents` (T, C, h, w): the posterior mode (or a sample), normalised as the model says (`normalization`:
  × the scaling factor for SD/SVD, (μ − mean)/std per channel for others), unless `latents.space` says raw;
- optionally `mean` and `logvar` (T, C, h, w): the raw posterior moments (`--save-moments`);
- string metadata (see METADATA_KEYS and the README). Format 2 adds the model family, its frame rule and the
  normalisation (kind and values, their hash, the space of `latents`); format 1 files (scaling factor only)
  still decode.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from vaecli._version import __version__
from vaecli.errors import InputError, OutputError, UsageError, printable
from vaecli.model.family import Codec, FrameRule, Normalization
from vaecli.ops.files import make_temp, remove, write_error
from vaecli.ops.validate import (DEFAULT_MAX_PIXELS, FLOAT_DTYPES, first_nonfinite, integer, number, parse_json,
                                 safetensors_header)
from vaecli.ops.validate import fps as validate_fps
from vaecli.ops.validate import geometry as validate_geometry
from vaecli.pipeline.frames import Geometry

FORMAT_VERSION = "2"
MEDIA_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif",
                  ".tiff", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
METADATA_KEYS = (
    "vaecli.format", "vaecli.version", "model.name", "model.hash", "scaling_factor", "latent_channels",
    "time_mode", "fps", "source", "frame_start", "frame_stride", "frame_count", "geometry", "dtype",
    "latents_dtype", "posterior", "seed", "model.family", "frame_rule", "normalization", "normalization.hash",
    "latents.space", "frames_fit",
)
SPACES = ("normalized", "raw")


def latent_metadata(codec: Codec, space: str = "normalized", **facts: str) -> dict[str, str]:
    """The metadata of a latent file written by `codec` (format 2): the model, its family, frame rule and latent
    normalisation, the space the stored `latents` are in (normalised, or raw), the family's own facts, then
    `facts` (source, fps, frames, geometry, dtypes, posterior, seed, frames_fit; all strings)."""
    norm = codec.normalization
    meta = {"vaecli.format": FORMAT_VERSION, "vaecli.version": __version__, "model.name": codec.name,
            "model.hash": codec.hash, "model.family": codec.family, "latent_channels": str(codec.latent_channels),
            "frame_rule": json.dumps(codec.frame_rule.to_dict(), sort_keys=True),
            "normalization": json.dumps(norm.to_dict(), sort_keys=True), "normalization.hash": norm.hash(),
            "latents.space": space, **codec.metadata()}
    if norm.kind == "scale":
        meta["scaling_factor"] = repr(norm.factor)  # what format-1 readers use
    return {**meta, **facts}


class LatentFileWriter:
    """Collect tensors chunk by chunk along the frame axis in raw side files, then write one safetensors file.

    Memory stays constant however many frames arrive: chunks go straight to disk. `finish(path)` writes the
    header (now that the frame count is known) and copies the raw data after it. Side files live beside the
    output and are removed by `close()`.
    """

    def __init__(self, beside: Path, names: tuple[str, ...], dtype: torch.dtype):
        self.dtype = dtype
        self.names = names
        self.shapes: dict[str, list[int] | None] = {n: None for n in names}
        self.beside = beside
        self.paths: dict[str, Path] = {}
        self.files = {}
        try:
            for n in names:  # created O_EXCL under a name `clean_stale` recognises after a crash
                self.paths[n] = make_temp(beside, f".{n}.raw")
                self.files[n] = open(self.paths[n], "r+b")
        except (OSError, OutputError) as e:
            self.close()
            if isinstance(e, OutputError):
                raise
            raise write_error(beside.parent, e) from None

    def append(self, name: str, chunk: torch.Tensor) -> None:
        """chunk: (t, C, h, w); appended after the frames written so far."""
        chunk = chunk.detach().to("cpu", self.dtype).contiguous()
        flat = chunk.reshape(-1)  # 1-D and contiguous whatever the strides of size-1 axes (a width-1 latent)
        shape = self.shapes[name]
        if shape is None:
            self.shapes[name] = list(chunk.shape)
        else:
            if list(chunk.shape[1:]) != shape[1:]:
                raise InputError(f"frame size changed mid-stream: latents {list(chunk.shape[1:])} after {shape[1:]}")
            shape[0] += chunk.shape[0]
        try:
            self.files[name].write(flat.view(torch.uint8).numpy().tobytes())
        except OSError as e:
            raise write_error(self.beside, e) from None

    def finish(self, path: Path, metadata: dict[str, str], empty: tuple[str, ...] = (),
               video: bool = False) -> None:
        """Write the safetensors file at `path`; `empty` names zero-length F32 marker tensors to add. video: store
        each tensor 5-D as (1, C, T, h, w) (ComfyUI's and diffusers' layout of video latents), not (T, C, h, w)."""
        header, offset = {}, 0
        for n in self.names:
            try:
                self.files[n].flush()  # a full disk shows here first: buffered chunks are written now
            except OSError as e:
                raise write_error(self.beside, e) from None
            size = self.paths[n].stat().st_size
            t, c, h, w = self.shapes[n]
            shape = [1, c, t, h, w] if video else [t, c, h, w]
            header[n] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        for n in empty:
            header[n] = {"dtype": "F32", "shape": [0], "data_offsets": [offset, offset]}
        header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        try:
            with open(path, "wb") as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                for n in self.names:
                    if video:
                        self._copy_channels_first(n, out)
                        continue
                    with open(self.paths[n], "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
        except OSError as e:
            raise write_error(self.beside, e) from None

    def _copy_channels_first(self, name: str, out) -> None:
        """The side file's (T, C, h·w) data written channel by channel: (C, T, h·w)."""
        t, c, h, w = self.shapes[name]
        if self.paths[name].stat().st_size == 0:
            return
        data = np.memmap(self.paths[name], dtype=np.uint8, mode="r").reshape(t, c, -1)  # bytes of (h, w) per frame
        for channel in range(c):
            out.write(np.ascontiguousarray(data[:, channel]).tobytes())
        del data

    def close(self) -> None:
        """Close and remove the side files, all of them even when closing one fails (a full disk shows when
        buffered data is flushed), then report that failure."""
        failed = None
        try:
            for f in self.files.values():
                try:
                    f.close()
                except OSError as e:
                    failed = failed or e
        finally:
            for p in self.paths.values():
                remove(p)
        if failed is not None:
            raise write_error(self.beside, failed) from None


@dataclass(frozen=True)
class LatentFile:
    """A latent file opened for reading, its header and metadata validated (`open_latents`).

    key: the tensor holding latents; shape: (T, C, h, w) whatever the stored layout; video: stored 5-D as
    (1, C, T, h, w) (ComfyUI's and diffusers' video latents); scaled: True when normalised (vaecli, diffusers
    convention), False for raw latents (ComfyUI's `latent_tensor`, `latents.space` raw); space_stated: the file
    says which (metadata, or ComfyUI's format); metadata: the file's string metadata; fps, scaling_factor,
    geometry, normalization (how the stored latents were normalised), family, frame_rule: parsed from it (None
    when absent); padded: frames `--frames-fit pad` added at the end (the decode drops them again).
    """

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    scaled: bool
    metadata: dict[str, str]
    fps: Fraction | None = None
    scaling_factor: float | None = None
    geometry: Geometry | None = None
    normalization: Normalization | None = None
    family: str | None = None
    frame_rule: FrameRule | None = None
    video: bool = False
    space_stated: bool = True
    padded: int = 0

    def to_raw(self, z: torch.Tensor, codec: Codec) -> torch.Tensor:
        """Stored latents (t, C, h, w) -> the model's raw latents (fp32): undo the file's normalisation (a foreign
        or format-1 file without one: the model's)."""
        z = z.float()
        if not self.scaled:
            return z
        return (self.normalization or codec.normalization).denormalize(z)

    @property
    def frames(self) -> int:
        return self.shape[0]

    @property
    def has_vaecli_metadata(self) -> bool:
        return "vaecli.format" in self.metadata

    def output_frames(self, rule: FrameRule) -> int:
        """The frames a decode under `rule` gives back: those `--frames-fit pad` added at encode are dropped."""
        return rule.pixel_frames(self.frames) - self.padded

    def with_space(self, space: str | None, codec: Codec) -> "LatentFile":
        """This file with the space of its latents settled: `--latent-space` (normalized or raw) for files that
        do not say; a per-channel model's latents without it are refused (both spaces are common)."""
        where = printable(self.path)
        if self.space_stated:
            if space is not None and (space == "normalized") != self.scaled:
                said = "normalized" if self.scaled else "raw"
                raise InputError(f"{where}: the file says its latents are {said}, not {space}; drop --latent-space")
            return self
        if space is not None:
            return replace(self, scaled=space == "normalized", space_stated=True)
        if codec.normalization.kind == "per-channel":
            raise InputError(f"{where}: nothing says whether these latents are normalised, (x - mean) / std, or "
                             "raw; pass --latent-space normalized or --latent-space raw")
        return self

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Frames [start, stop) of the latents as stored (no rescaling), (t, C, h, w)."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if self.video:  # (1, C, T, h, w) -> (t, C, h, w)
                    return f.get_slice(self.key)[:, :, start:stop][0].transpose(0, 1).contiguous()
                return f.get_slice(self.key)[start:stop]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{printable(self.path)}: cannot read latents ({printable(e)})") from None

    def read_checked(self, start: int, stop: int, allow_nonfinite: bool = False) -> torch.Tensor:
        """`read`, refusing latents that hold NaN or inf (they decode to black or garbage), naming the first bad
        frame: each block is checked as it is read for decoding, so the file is read once."""
        z = self.read(start, stop)
        bad = None if allow_nonfinite else first_nonfinite(z)
        if bad is not None:
            raise InputError(f"{printable(self.path)}: latents hold NaN or inf (first in frame {start + bad}); "
                             "pass --allow-nonfinite to decode them anyway")
        return z


def open_latents(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> LatentFile:
    """Open a vaecli latent file, a foreign safetensors with a `latents` tensor, or a ComfyUI `.latent`.

    The header and the metadata vaecli uses are validated here (`vaecli.ops.validate`), before anything is
    sized from them: a float tensor (T, C, h, w) with no empty axis; fps, scaling_factor and geometry in range
    and consistent with the latents' size (the decoded frames at most `max_pixels`)."""
    path = Path(path)
    where = printable(path)
    if path.is_dir():
        raise InputError(f"{where}: is a folder; decode takes latent files (.latents.safetensors, .latent)")
    if path.suffix.lower() in MEDIA_SUFFIXES:
        raise InputError(f"{where}: is a video or image, not a latent file; make latents with `vaecli encode`")
    header, metadata, _ = safetensors_header(path)
    if "latents" in header:
        key, scaled = "latents", True
    elif "latent_tensor" in header:
        key, scaled = "latent_tensor", False
        if "latent_format_version_0" not in header:
            raise InputError(f"{where}: an old-format ComfyUI latent (pre latent_format_version_0); re-save it")
    else:
        some = ", ".join(printable(k) for k in sorted(header)[:4]) or "none"
        raise InputError(f"{where}: no `latents` tensor (found {some}); is it a checkpoint? try `vaecli info`")
    entry = header[key]
    shape = tuple(entry["shape"])
    video = len(shape) == 5
    if video and min(shape) >= 1 and shape[0] != 1:
        raise InputError(f"{where}: latents hold {shape[0]} clips (B, C, T, h, w); vaecli decodes one clip per "
                         "file: save each clip alone")
    if video:
        shape = (shape[2], shape[1], shape[3], shape[4])  # (1, C, T, h, w) -> (T, C, h, w)
    if len(shape) != 4 or min(shape) < 1:
        raise InputError(f"{where}: latents must be (T, C, h, w) or (1, C, T, h, w) with no empty axis, found "
                         f"shape {list(entry['shape'])}")
    if entry["dtype"] not in FLOAT_DTYPES:
        raise InputError(f"{where}: latents are {entry['dtype']}; they must be floating point")
    t, _, h, w = shape
    if "frame_count" in metadata and integer(metadata["frame_count"], where, "frame_count", 1, 1 << 40) != t:
        raise InputError(f"{where}: frame_count {metadata['frame_count']} does not match the {t} frames stored")
    geometry = None
    if metadata.get("geometry"):
        geometry = Geometry(**validate_geometry(metadata["geometry"], where, (h, w), max_pixels))
    scaling = (number(metadata["scaling_factor"], where, "scaling_factor", 1e-6, 1e6)
               if metadata.get("scaling_factor") else None)
    space_stated = bool(metadata.get("latents.space")) or not scaled
    space = metadata.get("latents.space") or ("normalized" if scaled else "raw")
    if space not in SPACES:
        raise InputError(f"{where}: latents.space must be normalized or raw, not {printable(space)[:40]!r}")
    norm = _normalization(metadata, where, shape[1]) or (Normalization("scale", scaling) if scaling else None)
    rule = _frame_rule(metadata, where)
    return LatentFile(
        path, key, shape, entry["dtype"], scaled and space == "normalized", dict(metadata),
        fps=validate_fps(metadata["fps"], where) if metadata.get("fps") else None, scaling_factor=scaling,
        geometry=geometry, normalization=norm, family=metadata.get("model.family") or None,
        frame_rule=rule, video=video, space_stated=space_stated,
        padded=_padded(metadata, where, (rule or FrameRule()).pixel_frames(t)))


def _normalization(metadata: dict[str, str], where: str, channels: int) -> Normalization | None:
    """The `normalization` metadata (format 2), validated: a known kind, finite values, one per channel."""
    if not metadata.get("normalization"):
        return None
    try:
        norm = Normalization.from_dict(parse_json(metadata["normalization"].encode(), where, InputError))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where}: bad normalization metadata ({printable(str(e))[:80]})") from None
    if norm.kind == "per-channel" and len(norm.mean) != channels:
        raise InputError(f"{where}: normalization has {len(norm.mean)} channels, the latents {channels}")
    return norm


def _frame_rule(metadata: dict[str, str], where: str) -> FrameRule | None:
    if not metadata.get("frame_rule"):
        return None
    d = parse_json(metadata["frame_rule"].encode(), where, InputError)
    if not isinstance(d, dict) or not isinstance(d.get("factor"), int) or not 1 <= d["factor"] <= 64 \
            or not isinstance(d.get("causal", False), bool):
        raise InputError(f"{where}: bad frame_rule metadata")
    return FrameRule(d["factor"], d.get("causal", False))


def _padded(metadata: dict[str, str], where: str, pixel_frames: int) -> int:
    """Frames `--frames-fit pad` added (the `frames_fit` metadata: mode, frames read, frames coded), validated."""
    if not metadata.get("frames_fit"):
        return 0
    d = parse_json(metadata["frames_fit"].encode(), where, InputError)
    if not isinstance(d, dict) or d.get("mode") not in ("pad", "trim") or \
            not all(isinstance(d.get(k), int) and not isinstance(d.get(k), bool) for k in ("read", "coded")):
        raise InputError(f"{where}: bad frames_fit metadata")
    padded = d["coded"] - d["read"] if d["mode"] == "pad" else 0
    if d["coded"] != pixel_frames or not 0 <= padded < pixel_frames:
        raise InputError(f"{where}: frames_fit metadata ({d['read']} frames read, {d['coded']} coded) does not "
                         f"match the {pixel_frames} frames the latents decode to")
    return padded


def describe_latents(path: str | os.PathLike) -> dict:
    """What `vaecli info` prints for a latent file."""
    lf = open_latents(path)
    return {"kind": "latents", "path": str(lf.path), "tensor": lf.key, "shape": list(lf.shape), "dtype": lf.dtype,
            "scaled": lf.scaled, "vaecli_metadata": lf.has_vaecli_metadata, "metadata": lf.metadata}


def comfy_path(latents_path: Path) -> Path:
    """`clip.latents.safetensors` -> `clip.latent` (ComfyUI's extension)."""
    name = latents_path.name
    stem = name[: -len(".latents.safetensors")] if name.endswith(".latents.safetensors") else latents_path.stem
    return latents_path.with_name(stem + ".latent")


def parse_fps(text: str | None) -> Fraction | None:
    """--fps: "30000/1001", "29.97" or "24" -> Fraction (positive, at most 10000)."""
    if text is None:
        return None
    try:
        return validate_fps(text, "--fps", "value")
    except InputError as e:
        raise UsageError(str(e)) from None
