"""Running encode and decode jobs: streaming frames through the model with reading and writing overlapped.

Encode: a reader thread decodes frames from the container into a bounded queue; the main thread fits them,
runs the encoder in batches and streams latents to disk. Decode: the main thread reads latents clip by clip and
runs the decoder; a writer thread encodes the frames into the output video. Stages talk through bounded
queues, so a long job is bounded by its slowest stage and memory does not grow with the video's length.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from vaecli._version import __version__
from vaecli.errors import InputError, OutputError, UsageError
from vaecli.model.vae import VAE
from vaecli.ops.device import dtype_name
from vaecli.ops.files import atomic_output, check_writable
from vaecli.pipeline.frames import from_model, plan_geometry, ssim, to_model
from vaecli.pipeline.latents_io import FORMAT_VERSION, LatentFile, LatentFileWriter, comfy_path, open_latents
from vaecli.pipeline.video_io import FORMATS, FrameSource, GifWriter, PngWriter, Selection, VideoWriter

_DONE = object()


@dataclass(frozen=True)
class Model:
    """A loaded VAE plus what the pipeline reports about it."""

    vae: VAE
    name: str
    hash: str
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def wrap(cls, vae: VAE, name: str) -> "Model":
        param = next(vae.parameters())
        return cls(vae, name, weights_hash(vae), param.device, param.dtype)


def weights_hash(vae: VAE) -> str:
    """sha256 (16 hex digits) of the weights cast to fp16, in key order: equal for fp32 and fp16 copies."""
    h = hashlib.sha256()
    for key, tensor in vae.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class EncodeOptions:
    selection: Selection = field(default_factory=Selection)
    size: tuple[int, int] | None = None
    fit: str = "pad"
    sample: bool = False
    seed: int = 0
    batch: int = 8
    save_moments: bool = False
    export_comfy: bool = False
    latent_dtype: torch.dtype = torch.float32
    overwrite: bool = False


@dataclass(frozen=True)
class DecodeOptions:
    fmt: str | None = None
    crf: int = 18
    fps: Fraction | None = None
    chunk: int | None = None
    native_size: bool = False
    allow_model_mismatch: bool = False
    overwrite: bool = False


def background(items: Iterable, depth: int = 8) -> Iterator:
    """Iterate `items` in a producer thread, `depth` items ahead; its exceptions re-raise here.

    When the consumer stops early (an error, Ctrl-C, or closing this generator), the producer stops too and
    closes its iterator in its own thread (which releases, e.g., an open video container).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(("error", e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, daemon=True, name="vaecli-reader")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


class BackgroundWriter:
    """Feed frames to a writer (`write`, `close`) in a thread through a bounded queue."""

    def __init__(self, writer, depth: int = 16):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="vaecli-writer")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if self.error is None:
                try:
                    self.writer.write(item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self.error = e

    def put(self, frame: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(frame)

    def close(self) -> None:
        self.queue.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.writer.close()

    def abort(self) -> None:
        self.error = self.error or InputError("aborted")
        self.queue.put(_DONE)
        self.thread.join(timeout=10)
        self.writer.abort()


def progress(total: int | None, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def batches(frames: Iterator[tuple[int, np.ndarray]], size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    batch = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def frame_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """N(0, 1) noise for one frame, from (seed, source frame index): the same whatever the batch size or device."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn(shape, generator=gen)


def encode_file(model: Model, source_spec: str, out: Path, opts: EncodeOptions, quiet: bool = True) -> dict:
    """Encode one video (or image sequence) into a latent file; returns the JSON result."""
    started = time.perf_counter()
    vae, cfg = model.vae, model.vae.config
    check_writable(out, opts.overwrite)
    if opts.export_comfy:
        check_writable(comfy_path(out), opts.overwrite)
    source = FrameSource(source_spec)
    frames = background(source.frames(opts.selection))
    first = next(frames)
    source_size = (first[1].shape[1], first[1].shape[0])
    geometry = plan_geometry(source_size, cfg.downscale, opts.fit, opts.size)
    names = ("latents", "mean", "logvar") if opts.save_moments else ("latents",)
    writer = LatentFileWriter(out, names, opts.latent_dtype)
    comfy = LatentFileWriter(comfy_path(out), ("latent_tensor",), torch.float32) if opts.export_comfy else None
    indices: list[int] = []
    bar = progress(opts.selection.count or source.count, f"encode {Path(source_spec).name}", quiet)
    try:
        stream = _chain([first], frames)
        for batch in batches(stream, opts.batch):
            for _, image in batch:
                if (image.shape[1], image.shape[0]) != source_size:
                    raise InputError(f"{source_spec}: frame size changes from {source_size[0]}x{source_size[1]} "
                                     f"to {image.shape[1]}x{image.shape[0]}")
            x = to_model([image for _, image in batch], geometry, model.device, model.dtype)
            with torch.inference_mode():
                posterior = vae.encode_moments(x)
                z = posterior.mode()
                if opts.sample:
                    noise = torch.stack([frame_noise(tuple(z.shape[1:]), opts.seed, i) for i, _ in batch])
                    z = z + posterior.std * noise.to(z.device, z.dtype)
            writer.append("latents", z.float() * cfg.scaling_factor)
            if opts.save_moments:
                writer.append("mean", posterior.mean.float())
                writer.append("logvar", posterior.logvar.float())
            if comfy is not None:
                comfy.append("latent_tensor", z.float())
            indices.extend(i for i, _ in batch)
            bar.update(len(batch))
        metadata = {
            "vaecli.format": FORMAT_VERSION, "vaecli.version": __version__, "model.name": model.name,
            "model.hash": model.hash, "scaling_factor": repr(cfg.scaling_factor),
            "latent_channels": str(cfg.latent_channels), "time_mode": cfg.time_mode,
            "fps": f"{source.fps.numerator}/{source.fps.denominator}", "source": Path(source_spec).name,
            "frame_start": str(indices[0]), "frame_stride": str(opts.selection.stride),
            "frame_count": str(len(indices)), "geometry": geometry.to_json(), "dtype": dtype_name(model.dtype),
            "latents_dtype": dtype_name(opts.latent_dtype), "posterior": "sample" if opts.sample else "mode",
            "seed": str(opts.seed) if opts.sample else "",
        }
        with atomic_output(out, opts.overwrite) as tmp:
            writer.finish(tmp, metadata)
        outputs = [str(out)]
        if comfy is not None:
            with atomic_output(comfy_path(out), opts.overwrite) as tmp:
                # ComfyUI's .latent: raw (unscaled) `latent_tensor` plus an empty `latent_format_version_0`
                comfy.finish(tmp, {"format": "pt"}, empty=("latent_format_version_0",))
            outputs.append(str(comfy_path(out)))
    finally:
        bar.close()
        writer.close()
        if comfy is not None:
            comfy.close()
        frames.close()
    shape = [len(indices), cfg.latent_channels, geometry.processed[1] // cfg.downscale,
             geometry.processed[0] // cfg.downscale]
    return {"input": source_spec, "output": str(out), "outputs": outputs, "frames": len(indices), "shape": shape,
            "fps": f"{source.fps.numerator}/{source.fps.denominator}", "seconds": round(time.perf_counter() - started, 3),
            "plan": {"strategy": "batches", "batch_frames": opts.batch, "chunk_frames": None, "overlap": 0, "tiles": None},
            "geometry": {"source": list(geometry.source), "processed": list(geometry.processed), "fit": geometry.fit}}


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def output_kind(out: Path | str, fmt: str | None) -> tuple[str, Path, str | None]:
    """Decide the output format: (format, target path, PNG name pattern or None)."""
    text = str(out)
    if "%" in Path(text).name:
        return "png", Path(text).parent, Path(text).name
    if text.endswith(("/", os.sep)) or fmt == "png":
        return "png", Path(text), "frame_%05d.png"
    suffix = Path(text).suffix.lower().lstrip(".")
    fmt = fmt or (suffix if suffix in FORMATS else None)
    if fmt is None:
        raise UsageError(f"{out}: cannot tell the format from the name; pass --format ({', '.join(FORMATS)})")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt, Path(text), None


def check_model(lf: LatentFile, model: Model, allow_mismatch: bool) -> None:
    cfg = model.vae.config
    if lf.shape[1] != cfg.latent_channels:
        raise InputError(f"{lf.path}: latents have {lf.shape[1]} channels but model {model.name} takes "
                         f"{cfg.latent_channels}; pass the model they were made with (--model)")
    made_with = lf.metadata.get("model.hash")
    if made_with and made_with != model.hash and not allow_mismatch:
        raise InputError(f"{lf.path}: latents were made with model {lf.metadata.get('model.name')} "
                         f"({made_with}), not {model.name} ({model.hash}); pass that model with --model, "
                         "or --allow-model-mismatch to decode anyway")


def decode_file(model: Model, latents_path: Path, out: Path, opts: DecodeOptions, quiet: bool = True,
                observer: Callable[[np.ndarray], None] | None = None) -> dict:
    """Decode one latent file into a video or PNG sequence; returns the JSON result.

    observer: called with each decoded clip, uint8 (t, H, W, 3), before it is written (roundtrip metrics).
    """
    started = time.perf_counter()
    vae, cfg = model.vae, model.vae.config
    lf = open_latents(latents_path)
    check_model(lf, model, opts.allow_model_mismatch)
    fps = opts.fps or lf.fps
    if fps is None:
        raise UsageError(f"{latents_path}: no vaecli metadata to take the frame rate from; pass --fps")
    geometry = lf.geometry
    if lf.scaled:
        scaling = lf.scaling_factor or cfg.scaling_factor
    else:
        scaling = 1.0
    fmt, target, pattern = output_kind(out, opts.fmt)
    total = lf.frames
    clip = min(opts.chunk or total, total)
    if geometry is None or opts.native_size:
        size = (lf.shape[3] * cfg.downscale, lf.shape[2] * cfg.downscale)
    else:
        size = geometry.source
    bar = progress(total, f"decode {latents_path.name}", quiet)
    with atomic_output(target, opts.overwrite) as tmp:
        if fmt == "png":
            tmp.mkdir()
            sink = PngWriter(tmp, pattern)
        elif fmt == "gif":
            sink = GifWriter(tmp, fps)
        else:
            sink = VideoWriter(tmp, fmt, fps, size, opts.crf)
        writer = BackgroundWriter(sink)
        try:
            for start in range(0, total, clip):
                z = lf.read(start, min(total, start + clip)).to(model.device, torch.float32) / scaling
                with torch.inference_mode():
                    x = vae.decode(z.to(model.dtype), num_frames=z.shape[0])
                images = from_model(x, geometry, opts.native_size)
                if observer is not None:
                    observer(images)
                for image in images:
                    writer.put(image)
                bar.update(z.shape[0])
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
    plan = {"strategy": "one-clip" if clip >= total else "chunks", "chunk_frames": clip, "overlap": 0, "tiles": None}
    return {"input": str(latents_path), "output": str(target), "format": fmt, "frames": total,
            "shape": [total, 3, size[1], size[0]], "fps": f"{fps.numerator}/{fps.denominator}",
            "seconds": round(time.perf_counter() - started, 3), "plan": plan}


class RoundtripMeter:
    """Compares each decoded clip with the same source frames as it arrives: PSNR and SSIM per clip.

    reference: the selected source frames, uint8 (H, W, 3), in order (streamed, not stored).
    """

    def __init__(self, reference: Iterator[tuple[int, np.ndarray]]):
        self.reference = reference
        self.clips: list[dict] = []

    def __call__(self, decoded: np.ndarray) -> None:
        squared_error, ssims = 0.0, []
        for image in decoded:
            _, ref = next(self.reference)
            if ref.shape != image.shape:
                raise InputError(f"reconstruction is {image.shape[1]}x{image.shape[0]}, source {ref.shape[1]}x{ref.shape[0]}")
            squared_error += float(np.mean((ref.astype(np.float64) - image.astype(np.float64)) ** 2))
            ssims.append(ssim(ref[None], image[None]))
        mse = squared_error / len(decoded)
        value = float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
        self.clips.append({"clip": len(self.clips), "frames": len(decoded), "psnr": round(value, 3),
                           "ssim": round(float(np.mean(ssims)), 5)})

    def summary(self) -> dict:
        frames = sum(c["frames"] for c in self.clips)
        weights = [c["frames"] / frames for c in self.clips]
        return {"frames": frames, "psnr": round(sum(w * c["psnr"] for w, c in zip(weights, self.clips)), 3),
                "ssim": round(sum(w * c["ssim"] for w, c in zip(weights, self.clips)), 5), "clips": self.clips}
