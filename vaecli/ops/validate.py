"""The one validation layer for what comes from files: nothing read from a file is trusted before it passes here.

Safetensors headers (checkpoints and latent files), their string metadata (frame rate, scaling factor,
geometry, counts), diffusers `config.json`, declared shapes against the bytes present, input file kinds and
pixel counts. Every check turns a bad value into an `InputError` (a `CheckpointError` for checkpoints) that names
the file, the field and the value, before anything is allocated or sized from it. Values that reach a message are
escaped (`printable`), so a file cannot write control characters to the terminal.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from vaecli.errors import InputError, printable

if TYPE_CHECKING:
    import torch

# bytes per element of every dtype safetensors defines
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
MAX_DIM = 1 << 40
DEFAULT_MAX_PIXELS = 8192 * 8192  # per frame; --max-pixels raises it
MAX_FPS = Fraction(10_000)
MIN_FPS = Fraction(1, 100)  # one frame per 100 s: GIF delays (16-bit centiseconds) and MP4 time bases hold it


def path_text(text: str | os.PathLike, what: str = "path") -> str:
    """A path given on the command line or in a manifest: no NUL byte, no name longer than the file system takes
    (`Path.exists()` raises on those instead of answering)."""
    text = os.fspath(text)
    if "\0" in text:
        raise InputError(f"{what} {printable(text)} holds a NUL byte")
    encoded = os.fsencode(text) if isinstance(text, str) else text
    if len(encoded) > 4096 or any(len(part) > 255 for part in encoded.split(b"/")):
        raise InputError(f"{what} {printable(text[:80])}... is longer than a file name can be")
    return text


def regular_file(path: str | os.PathLike, error: type[InputError] = InputError) -> Path:
    """`path` must be an existing regular file (a FIFO, device or socket would block or never end)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{printable(path)}: no such file") from None
    except OSError as e:
        raise error(f"{printable(path)}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{printable(path)}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise error(f"{printable(path)}: {kind}, not a regular file; vaecli reads only regular files")
    return path


def parse_json(raw: bytes | str, where: str, error: type[InputError] = InputError) -> object:
    """JSON from a file: no NaN/Infinity constants, bounded nesting (a deep document is refused, not a crash)."""
    def no_constants(name: str):
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise error(f"{where}: JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{where}: invalid JSON ({printable(e)})") from None


def _nonneg_int(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_DIM


def safetensors_header(path: Path, error: type[InputError] = InputError) -> tuple[dict, dict[str, str], int]:
    """Read and validate a safetensors header -> (tensor entries, `__metadata__`, data offset).

    Every entry has a known dtype, a shape of non-negative integers and `data_offsets` [begin, end] of exactly
    dtype size x element count bytes; entries lie inside the file and do not overlap; metadata maps strings to
    strings. A header that declares more data than the file holds is refused (no read runs past the end).
    """
    where = printable(path)
    regular_file(path, error)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{where}: not a safetensors file (only {size} bytes)")
            header_len = struct.unpack("<Q", head)[0]
            if header_len > min(size - 8, MAX_HEADER):
                raise error(f"{where}: not a safetensors file, or truncated (header of {header_len} bytes in a "
                            f"{size}-byte file)")
            raw = f.read(header_len)
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror})") from None
    header = parse_json(raw, f"{where}: corrupt safetensors header", error)
    if not isinstance(header, dict):
        raise error(f"{where}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        bad = f"{where}: corrupt safetensors header (tensor {printable(name)!r}"
        if not isinstance(entry, dict):
            raise error(f"{bad} is not an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise error(f"{bad}: unknown dtype {printable(dtype)!r})")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_nonneg_int(d) for d in shape):
            raise error(f"{bad}: shape {printable(shape)} is not a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise error(f"{bad}: data_offsets {printable(offsets)} are not two ordered non-negative integers)")
        need = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != need:
            raise error(f"{bad}: shape {shape} of {dtype} needs {need} bytes, data_offsets give "
                        f"{offsets[1] - offsets[0]})")
        if offsets[1] > data:
            raise error(f"{where}: truncated: tensor {printable(name)!r} needs bytes up to {8 + header_len + offsets[1]}, "
                        f"the file has {size}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise error(f"{where}: corrupt safetensors header (tensors {printable(a)!r} and {printable(b)!r} overlap)")
    return header, metadata, 8 + header_len


def fps(text: object, where: str, field: str = "fps") -> Fraction:
    """A frame rate from metadata ("30000/1001", "24", "29.97"): in [MIN_FPS, MAX_FPS] = [0.01, 10000]."""
    try:
        value = Fraction(str(text)).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise InputError(f"{where}: {field} {printable(text)!r} is not a frame rate") from None
    if not MIN_FPS <= value <= MAX_FPS:
        raise InputError(f"{where}: {field} {printable(text)!r} is out of range [{float(MIN_FPS):g}, {MAX_FPS}]")
    return value


def number(text: object, where: str, field: str, low: float, high: float) -> float:
    """A finite float in [low, high] from metadata or config (decimal text or a JSON number)."""
    if isinstance(text, bool):
        raise InputError(f"{where}: {field} {text!r} is not a number")
    try:
        value = float(text) if isinstance(text, (int, float)) else float(str(text).strip())
    except (ValueError, OverflowError):
        raise InputError(f"{where}: {field} {printable(text)!r} is not a number") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{where}: {field} {printable(text)!r} is out of range [{low:g}, {high:g}]")
    return value


def integer(text: object, where: str, field: str, low: int, high: int) -> int:
    """An integer in [low, high] from metadata (decimal text)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise InputError(f"{where}: {field} {printable(text)!r} is not an integer") from None
    if not low <= value <= high:
        raise InputError(f"{where}: {field} {printable(text)!r} is out of range [{low}, {high}]")
    return value


def geometry(text: object, where: str, latent_hw: tuple[int, int], max_pixels: int) -> dict:
    """The `geometry` metadata of a latent file, checked against the latents' size -> a dict of int tuples.

    `processed` must be the latent size times one power-of-two factor (what the model gave the encoder);
    `source` and `resized` are positive sizes of at most `max_pixels`; the box lies inside the frame it
    describes; `fit` is pad, crop or resize."""
    bad = f"{where}: geometry"
    d = parse_json(str(text), bad) if isinstance(text, str) else text
    if not isinstance(d, dict):
        raise InputError(f"{bad} {printable(text)[:80]!r} is not a JSON object")

    def size(key: str) -> tuple[int, int]:
        v = d.get(key)
        if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int and 1 <= x <= MAX_DIM for x in v)):
            raise InputError(f"{bad}: {key} {printable(v)[:80]} is not [width, height] of positive integers")
        if v[0] * v[1] > max_pixels:
            raise InputError(f"{bad}: {key} {v[0]}x{v[1]} is more than --max-pixels {max_pixels}")
        return v[0], v[1]

    fit = d.get("fit")
    if fit not in ("pad", "crop", "resize"):
        raise InputError(f"{bad}: fit {printable(fit)[:40]!r} is not pad, crop or resize")
    source, resized, processed = size("source"), size("resized"), size("processed")
    h, w = latent_hw
    factor = processed[0] // w if w else 0
    if factor < 1 or factor & (factor - 1) or processed != (w * factor, h * factor):
        raise InputError(f"{bad}: processed {list(processed)} is not the latent size {w}x{h} times one factor")
    box = d.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(type(x) is int for x in box)):
        raise InputError(f"{bad}: box {printable(box)[:80]} is not four integers")
    left, top, right, bottom = box
    if fit == "pad":
        inside, content = processed, resized
    elif fit == "crop":
        inside, content = resized, processed
    else:
        inside = content = None
    if inside is not None and not (0 <= left <= right <= inside[0] and 0 <= top <= bottom <= inside[1]
                                   and (right - left, bottom - top) == content):
        raise InputError(f"{bad}: box {box} does not place {content[0]}x{content[1]} inside {inside[0]}x{inside[1]}")
    return {"source": source, "resized": resized, "processed": processed, "fit": fit, "box": tuple(box)}


def pixels(width: int, height: int, where: str, max_pixels: int) -> None:
    """Refuse frames larger than `max_pixels` before they are decoded (decompression bombs)."""
    if width < 1 or height < 1:
        raise InputError(f"{where}: frames of {width}x{height} pixels")
    if width * height > max_pixels:
        raise InputError(f"{where}: frames of {width}x{height} = {width * height:,} pixels are more than "
                         f"--max-pixels {max_pixels:,}; raise --max-pixels to read them")


def first_nonfinite(x: "torch.Tensor") -> int | None:
    """Index along the first axis of the first slice holding NaN or inf, or None when all are finite."""
    import torch

    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1) if x.numel() else None
    if ok is None or bool(ok.all()):
        return None
    return int((~ok).nonzero()[0, 0])
