"""Running encode and decode jobs: streaming frames through the model with reading and writing overlapped.

Encode: a reader thread decodes frames from the container into a bounded queue; the main thread fits them,
runs the encoder in batches and streams latents to disk. Decode: the main thread reads latents clip by clip and
runs the decoder; a writer thread encodes the frames into the output video. Stages talk through bounded
queues, so a long job is bounded by its slowest stage and memory does not grow with the video's length.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from vaecli._version import __version__
from vaecli.errors import InputError, OutOfMemory, OutputError, UsageError, printable
from vaecli.model.encoder import DiagonalGaussian
from vaecli.model.streaming import NonFiniteActivation
from vaecli.model.vae import VAE
from vaecli.ops.device import dtype_name, free_memory, process_rss
from vaecli.ops.files import Output, atomic_outputs, check_outputs, pattern_regex, write_error
from vaecli.ops.validate import DEFAULT_MAX_PIXELS, first_nonfinite, pixels
from vaecli.pipeline.chunking import WindowBlender, windows
from vaecli.pipeline.frames import from_model, plan_geometry, ssim, to_model
from vaecli.pipeline.progress import Progress
from vaecli.pipeline.planner import Estimator, Plan, format_bytes, plan_decode, plan_encode
from vaecli.pipeline.latents_io import FORMAT_VERSION, LatentFile, LatentFileWriter, comfy_path, open_latents
from vaecli.pipeline.video_io import FORMATS, FrameSource, GifWriter, PngWriter, Selection, VideoWriter

_DONE = object()


@dataclass(frozen=True)
class Model:
    """A loaded VAE plus what the pipeline reports about it.

    rebuild: makes the same model in another dtype from the stored weights (the precision fallback uses it, so a
    bf16 redo of an fp16 model is the checkpoint in bf16, not the fp16 weights re-rounded); None: cast a copy.
    """

    vae: VAE
    name: str
    hash: str
    device: torch.device
    dtype: torch.dtype
    rebuild: Callable[[torch.dtype], VAE] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def wrap(cls, vae: VAE, name: str, hash: str | None = None,
             rebuild: Callable[[torch.dtype], VAE] | None = None) -> "Model":
        """`hash`: the stored weights' hash (`weights_hash` of the checkpoint); default: of vae's weights."""
        param = next(vae.parameters())
        return cls(vae, name, hash or weights_hash(vae.state_dict()), param.device, param.dtype, rebuild)

    @classmethod
    def load(cls, source: str | None, *, device: torch.device, dtype: torch.dtype, attention: str = "auto",
             config: str | None = None) -> "Model":
        """Load a checkpoint (None: the bundled model) for a job; the hash is of the weights as stored, so latent
        files made with any --dtype of the same checkpoint match."""
        from vaecli.model.checkpoint import build_vae, bundled_model_path, read_checkpoint
        from vaecli.ops.attention import resolve_attention

        path = bundled_model_path() if source is None else source
        ckpt = read_checkpoint(path, config)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a job runs one frame size: autotuned convolutions pay off
        backend = resolve_attention(attention, device, dtype)
        vae = build_vae(ckpt.config, ckpt.state, device=device, dtype=dtype, attention=backend)

        def rebuild(other: torch.dtype) -> VAE:  # read again: the state is not kept in memory meanwhile
            again = read_checkpoint(path, config)
            return build_vae(again.config, again.state, device=device, dtype=other, attention=vae.attention)

        return cls.wrap(vae, ckpt.config.name, weights_hash(ckpt.state), rebuild)


class PrecisionGuard:
    """Redo work whose half-precision result holds inf/NaN in a wider dtype, and say so.

    fp16 activations overflow on some checkpoints and inputs (black or speckled frames in SVD decodes). Every
    chunk computed in fp16/bf16 is checked (one pass over its result); a chunk with inf/NaN is recomputed in
    bf16 (from fp16, where the device has it), then fp32, with a copy of the model made on first need. Each
    redo is logged to stderr and listed in the job's JSON result (`precision_fallbacks`).
    """

    def __init__(self, model: "Model", progress: Progress | None = None):
        self.model = model
        self.progress = progress or Progress()
        self.events: list[dict] = []
        self._copies: dict[torch.dtype, VAE] = {}

    def wider(self) -> list[torch.dtype]:
        dtype, device = self.model.dtype, self.model.device
        if dtype == torch.float16:
            bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
            return ([torch.bfloat16] if bf16_ok else []) + [torch.float32]
        return [torch.float32] if dtype == torch.bfloat16 else []

    def model_in(self, dtype: torch.dtype) -> VAE:
        if dtype == self.model.dtype:
            return self.model.vae
        if dtype not in self._copies:
            rebuild = self.model.rebuild
            vae = rebuild(dtype) if rebuild is not None else copy.deepcopy(self.model.vae).to(dtype)
            vae.set_attention(self.model.vae.attention)
            self._copies[dtype] = vae
        return self._copies[dtype]

    def note(self, what: str, tried: torch.dtype, dtype: torch.dtype) -> None:
        """Record (and unless quiet, say) that work in `tried` gave inf/NaN and is redone in `dtype`."""
        self.progress.note(f"vaecli: {dtype_name(tried)} gave inf/NaN in {what}; redoing it in {dtype_name(dtype)}")
        self.events.append({"where": what, "from": dtype_name(tried), "to": dtype_name(dtype)})

    def __call__(self, compute: Callable[[VAE, torch.dtype], torch.Tensor], what: str) -> torch.Tensor:
        """compute(vae, dtype) -> result; returns the first result without inf/NaN (or the fp32 one)."""
        out = compute(self.model.vae, self.model.dtype)
        tried = self.model.dtype
        for dtype in self.wider():
            if bool(torch.isfinite(out).all()):
                break
            self.note(what, tried, dtype)
            out, tried = compute(self.model_in(dtype), dtype), dtype
        return out


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the weights cast to fp16, keys sorted: equal for an fp32 checkpoint and its fp16
    copy, whatever dtype the model then computes in."""
    h = hashlib.sha256()
    for key, tensor in sorted(state.items()):
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
    batch: int | None = None  # frames per encoder call; None = planned from free memory
    max_memory: int | None = None
    attention: str = "auto"
    save_moments: bool = False
    export_comfy: bool = False
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
    max_pixels: int = DEFAULT_MAX_PIXELS  # per decoded frame
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
                except OSError as e:  # a writer that let one through (Pillow, PyAV): the one message
                    self.error = write_error(getattr(self.writer, "path", "output"), e)
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
        try:
            self.writer.close()
        except OSError as e:
            raise write_error(getattr(self.writer, "path", "output"), e) from None

    def abort(self) -> None:
        self.error = self.error or InputError("aborted")
        self.queue.put(_DONE)
        self.thread.join(timeout=10)
        self.writer.abort()


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


def encode_file(model: Model, source_spec: str, out: Path | str, opts: EncodeOptions,
                progress: Progress | None = None) -> dict:
    """Encode one video (or image sequence) into a latent file; returns the JSON result.

    The batch size (frames per encoder call) and attention backend come from the memory planner unless forced.
    progress: what to show on stderr (default: nothing).
    """
    started = time.perf_counter()
    progress = progress or Progress()
    name = Path(source_spec).name
    progress.stage(f"encode {name}: opening")
    cfg = model.vae.config
    outputs = latents_output(out, opts.export_comfy)  # a str keeps the "/" that names a folder
    out = outputs[0].path
    check_outputs(outputs, opts.overwrite)
    source = FrameSource(source_spec, opts.max_pixels)
    fps = source.fps / opts.selection.stride  # every stride-th frame: the rate that plays them at the source's speed
    probe = source.frames(opts.selection)
    _, first = next(probe)
    probe.close()
    source_size = (first.shape[1], first.shape[0])
    geometry = plan_geometry(source_size, cfg.downscale, opts.fit, opts.size)
    for size in (geometry.resized, geometry.processed):  # --size may ask for more than the source holds
        pixels(*size, printable(source_spec), opts.max_pixels)
    check_frame_size(cfg, *geometry.processed, printable(source_spec))
    expected = opts.selection.count or source.count or 16
    enforce_max_memory(model.device, opts.max_memory)
    estimator = Estimator(cfg, model.dtype, device_type=model.device.type)

    def plan_for(budget: int | None) -> Plan:
        forced = budget is None
        progress.stage(f"encode {name}: planning")
        plan = plan_encode(cfg, expected, (geometry.processed[1], geometry.processed[0]), device=model.device,
                           dtype=model.dtype, attention=opts.attention, batch=opts.batch if forced else None,
                           available_bytes=available_memory(model, opts.max_memory) if forced else budget,
                           estimator=estimator, host_bytes=host_memory(model.device))
        return check_ceiling(plan, opts.max_memory if forced else None)

    def run(plan: Plan) -> dict:
        model.vae.set_attention(plan.attention)
        frames = background(source.frames(opts.selection))
        names = ("latents", "mean", "logvar") if opts.save_moments else ("latents",)
        writer = LatentFileWriter(out, names, opts.latent_dtype)
        comfy = LatentFileWriter(comfy_path(out), ("latent_tensor",), torch.float32) if opts.export_comfy else None
        indices: list[int] = []
        guard = PrecisionGuard(model, progress)
        bar = progress.frames(opts.selection.count or source.count,
                              f"encode {name} ({plan.chunk_frames} at a time)")
        try:
            for batch in batches(frames, plan.chunk_frames):
                for _, image in batch:
                    if (image.shape[1], image.shape[0]) != source_size:
                        raise InputError(f"{source_spec}: frame size changes from {source_size[0]}x{source_size[1]} "
                                         f"to {image.shape[1]}x{image.shape[0]}")
                z, posterior = encode_batch(model, batch, geometry, opts, guard, plan.pieces)
                checked = (z, posterior.mean, posterior.logvar) if opts.save_moments else (z,)
                for bad in (first_nonfinite(t) for t in checked):
                    if bad is not None:  # even in fp32: never written
                        raise InputError(f"{printable(source_spec)}: the encoder gave NaN or inf for source frame "
                                         f"{batch[bad][0]} (in fp32 too); the checkpoint is broken")
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
                "fps": f"{fps.numerator}/{fps.denominator}", "source": Path(source_spec).name,
                "frame_start": str(indices[0]), "frame_stride": str(opts.selection.stride),
                "frame_count": str(len(indices)), "geometry": geometry.to_json(), "dtype": dtype_name(model.dtype),
                "latents_dtype": dtype_name(opts.latent_dtype), "posterior": "sample" if opts.sample else "mode",
                "seed": str(opts.seed) if opts.sample else "",
            }
            with atomic_outputs(outputs, opts.overwrite) as temps:  # both files or neither
                writer.finish(temps[0], metadata)
                if comfy is not None:
                    # ComfyUI's .latent: raw (unscaled) `latent_tensor` plus an empty `latent_format_version_0`
                    comfy.finish(temps[1], {"format": "pt"}, empty=("latent_format_version_0",))
        finally:
            bar.close()
            writer.close()
            if comfy is not None:
                comfy.close()
            frames.close()
        shape = [len(indices), cfg.latent_channels, geometry.processed[1] // cfg.downscale,
                 geometry.processed[0] // cfg.downscale]
        return {"input": source_spec, "output": str(out), "outputs": [str(o.path) for o in outputs],
                "frames": len(indices),
                "shape": shape, "fps": f"{fps.numerator}/{fps.denominator}",
                "geometry": {"source": list(geometry.source), "processed": list(geometry.processed),
                             "fit": geometry.fit}, "precision_fallbacks": guard.events}

    result = with_oom_recovery(plan_for, run, model.device, progress)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def encode_batch(model: Model, batch: list[tuple[int, np.ndarray]], geometry, opts: EncodeOptions,
                 guard: PrecisionGuard | None = None, pieces=None):
    """Source frames [(index, uint8 (H, W, 3))] -> (latents (B, C, h, w) unscaled, posterior).

    pieces: encode in exact tiles (a plan for frames too large to encode whole); the frames stay on the host
    when the plan parks them."""
    where = torch.device("cpu") if pieces is not None and pieces.park else model.device
    x = to_model([image for _, image in batch], geometry, where, torch.float32)
    guard = guard or PrecisionGuard(model)
    with torch.inference_mode():
        moments = guard(lambda vae, dtype: vae.moments(x.to(dtype), pieces=pieces).to(model.device),
                        f"frames {batch[0][0]}-{batch[-1][0]}")
        posterior = DiagonalGaussian(moments)
        z = posterior.mode()
        if opts.sample:
            noise = torch.stack([frame_noise(tuple(z.shape[1:]), opts.seed, i) for i, _ in batch])
            z = z + posterior.std * noise.to(z.device, z.dtype)
    return z, posterior


PNG_PATTERN = "frame_%05d.png"


def output_kind(out: Path | str, fmt: str | None, frames: int | None = None) -> tuple[str, Output, bool]:
    """Decide what a decode writes from `-o` and `--format`: (format, output, single PNG image).

    - `folder/`, an existing folder, or a name without suffix with `--format png`: PNG frames `frame_%05d.png` in
      that folder (created by the decode);
    - a name with one `%d` (`img_%04d.png`): PNG frames after that pattern (in a new folder, or among the other
      files of an existing one, replacing only the pattern's frames);
    - `one.png`: one image (the latents must hold one frame);
    - `clip.mp4`, `clip.webm`, `clip.gif`: a video; a suffix that says another format than `--format` is refused.
    """
    text = str(out)
    path = Path(text)
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    suffix = path.suffix.lower().lstrip(".")
    if "%" in path.name:
        if fmt not in (None, "png") or suffix != "png":
            raise UsageError(f"{out}: a frame pattern writes PNG frames; end it in .png (like img_%05d.png)")
        try:
            regex = pattern_regex(path.name)
        except OutputError as e:
            raise UsageError(str(e)) from None
        if not path.parent.exists():  # a new folder, filled and renamed into place as a whole
            return "png", Output(path.parent, "folder", owns=regex.fullmatch, pattern=path.name), False
        return "png", Output(path.parent, "frames", pattern=path.name), False
    folder = text.endswith(("/", os.sep)) or path.is_dir() or (fmt == "png" and not suffix)
    if folder:
        if fmt not in (None, "png"):
            raise UsageError(f"{out} is a folder; a folder output holds PNG frames, not {fmt}")
        if path.exists() and not path.is_dir():
            raise UsageError(f"{out} is not a folder")
        return "png", Output(path, "folder", owns=pattern_regex(PNG_PATTERN).fullmatch), False
    if not suffix:
        if fmt is None:
            raise UsageError(f"{out}: cannot tell the format from the name; add a suffix (.mp4, .webm, .gif, .png), "
                             "end it in / for PNG frames, or pass --format")
        return fmt, Output(path), False
    said = suffix if suffix in FORMATS else None
    if said is None:
        raise UsageError(f"{out}: a decode writes {', '.join('.' + f for f in FORMATS)} or PNG frames, not "
                         f".{suffix}; rename the output")
    if fmt is not None and fmt != said:
        raise UsageError(f"{out}: the name says {said} but --format says {fmt}; make them agree")
    if said == "png":
        if frames is not None and frames != 1:
            raise UsageError(f"{out} names one image but the latents hold {frames} frames; use a pattern "
                             f"({path.stem}_%05d.png) or a folder ({path.stem}/)")
        return "png", Output(path), True
    return said, Output(path), False


def latents_output(out: Path | str, export_comfy: bool) -> list[Output]:
    """The outputs of an encode: the latent file (a .safetensors name), and the ComfyUI `.latent` when exported."""
    text = str(out)
    out = Path(text)
    if text.endswith(("/", os.sep)) or out.is_dir():
        raise UsageError(f"{out} is a folder; -o names the latent file (use --out-dir for a folder)")
    if not out.name.endswith(".safetensors"):
        raise UsageError(f"{out}: an encode writes a safetensors latent file; end the name in .latents.safetensors")
    return [Output(out)] + ([Output(comfy_path(out))] if export_comfy else [])


def check_frame_size(cfg, width: int, height: int, where: str) -> None:
    """Refuse frames so small that a GroupNorm of the model would normalise single values (torch refuses that:
    every group needs two values; only tiny models at a few pixels get there, SVD's 512 channels never do)."""
    for level, mult in enumerate(cfg.ch_mult):
        channels, pixels_at = cfg.ch * mult, max(1, width >> level) * max(1, height >> level)
        if channels // 32 * pixels_at < 2:
            raise InputError(f"{where}: frames of {width}x{height} are too small for model {cfg.name} "
                             "(a normalisation would see one value); use larger frames or --size")


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


MAX_OOM_RETRIES = 4


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA OOM, or the CPU allocator failing."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


CPU_SHARE = 0.4  # on CPU, plan within this share of the available memory: an OOM there is a SIGKILL


def available_memory(model: Model, max_memory: int | None) -> int:
    """Bytes left for activations on the model's device (the weights are already resident).

    CUDA: the device's free memory, capped by `max_memory` (a total that includes the weights). CPU:
    `CPU_SHARE` of the available memory (the kernel kills a process that runs out; nothing can catch it), and with `max_memory`
    the ceiling less what the process already holds (its resident set: Python, torch, the weights), so the
    measured peak RSS stays under it."""
    free = free_memory(model.device)
    if max_memory is None:
        return default_budget(model.device)
    if model.device.type == "cpu":
        return max(0, min(free, max_memory - process_rss()))
    weights = sum(t.numel() * t.element_size() for t in model.vae.state_dict().values())
    return max(0, min(free, max_memory - weights))


def default_budget(device: torch.device) -> int:
    """Memory a plan may use on `device` without --max-memory: what is free on CUDA, `CPU_SHARE` of it on CPU."""
    free = free_memory(device)
    return int(free * CPU_SHARE) if device.type == "cpu" else free


def host_memory(device: torch.device) -> int | None:
    """Host memory a parked clip may take (CUDA only: on a CPU device the host is the device)."""
    if device.type == "cpu":
        return None
    return default_budget(torch.device("cpu"))


def enforce_max_memory(device: torch.device, max_memory: int | None) -> None:
    """On CUDA, make torch's allocator refuse to go past `max_memory` for this process."""
    if max_memory is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory / total), device)


def check_ceiling(plan: Plan, max_memory: int | None) -> Plan:
    """On CPU a `--max-memory` ceiling that even the smallest plan exceeds is refused before any work: going over
    it would break the promise, and running out there is a SIGKILL (on CUDA torch's memory fraction enforces it)."""
    if max_memory is not None and plan.device == "cpu" and not plan.fits:
        raise OutOfMemory(f"--max-memory {format_bytes(max_memory)} is too small: the smallest plan needs about "
                          f"{format_bytes(plan.activation_bytes - plan.budget_bytes + max_memory)}; raise it")
    return plan


def with_oom_recovery(plan_for: Callable[[int | None], Plan], run: Callable[[Plan], dict], device: torch.device,
                      progress: Progress | None = None) -> dict:
    """Run `run(plan_for(None))`; on out-of-memory free the cache, re-plan with half the failed plan's predicted
    activations and start the job again (outputs are atomic, so nothing is lost or duplicated).

    The first retry drops what the user forced (`plan_for` receives a budget instead of None).
    """
    budget, failed = None, []
    while True:
        plan = plan_for(budget)
        try:
            result = run(plan)
            result["plan"] = plan.to_dict()
            if failed:
                result["oom_retries"] = failed
            return result
        except BaseException as e:
            if not is_out_of_memory(e):
                raise
            message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        failed.append({"plan": plan.to_dict(), "error": message})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(failed) > MAX_OOM_RETRIES:
            raise OutOfMemory(f"out of memory on {device} after {len(failed)} attempts (last: {plan.strategy}, "
                              f"{plan.chunk_frames} frames); lower --max-memory, --chunk or the frame size")
        budget = plan.activation_bytes // 2
        (progress or Progress()).note(f"vaecli: out of memory ({message}); re-planning within {format_bytes(budget)}")


def decode_file(model: Model, latents_path: Path, out: Path | str, opts: DecodeOptions,
                progress: Progress | None = None, observer: Callable[[np.ndarray], None] | None = None) -> dict:
    """Decode one latent file into a video or PNG sequence; returns the JSON result.

    The plan (windows, overlap, tiles, attention backend) comes from the memory planner unless forced;
    observer: called with each block of final frames, uint8 (t, H, W, 3), before they are written;
    progress: what to show on stderr (default: nothing).
    """
    started = time.perf_counter()
    progress = progress or Progress()
    name = Path(latents_path).name
    progress.stage(f"decode {name}: reading latents")
    cfg = model.vae.config
    lf = open_latents(latents_path, opts.max_pixels)
    check_model(lf, model, opts.allow_model_mismatch)
    h, w = lf.shape[2], lf.shape[3]
    if lf.geometry is not None and lf.geometry.processed != (w * cfg.downscale, h * cfg.downscale):
        raise InputError(f"{printable(latents_path)}: geometry says frames of {lf.geometry.processed[0]}x"
                         f"{lf.geometry.processed[1]}, but model {model.name} decodes these latents to "
                         f"{w * cfg.downscale}x{h * cfg.downscale}; pass the model they were made with")
    pixels(w * cfg.downscale, h * cfg.downscale, printable(latents_path), opts.max_pixels)
    check_frame_size(cfg, w * cfg.downscale, h * cfg.downscale, printable(latents_path))
    if not opts.allow_nonfinite:
        lf.check_finite()
    fps = opts.fps or lf.fps
    if fps is None:
        raise UsageError(f"{latents_path}: no vaecli metadata to take the frame rate from; pass --fps")
    fmt, target, single = output_kind(out, opts.fmt, lf.frames)
    crf_max = {"mp4": 51, "webm": 63}.get(fmt)
    if crf_max is not None and not 0 <= opts.crf <= crf_max:
        raise UsageError(f"--crf {opts.crf} is out of range for {fmt} (0-{crf_max})")
    check_outputs([target], opts.overwrite)
    geometry = None if opts.native_size else lf.geometry
    size = geometry.source if geometry else (lf.shape[3] * cfg.downscale, lf.shape[2] * cfg.downscale)
    scaling = (lf.scaling_factor or cfg.scaling_factor) if lf.scaled else 1.0
    enforce_max_memory(model.device, opts.max_memory)
    estimator = Estimator(cfg, model.dtype, device_type=model.device.type)

    def plan_for(budget: int | None) -> Plan:
        forced = budget is None
        progress.stage(f"decode {name}: planning")
        plan = plan_decode(cfg, lf.frames, (lf.shape[2], lf.shape[3]), device=model.device, dtype=model.dtype,
                           available_bytes=available_memory(model, opts.max_memory) if forced else budget,
                           attention=opts.attention, chunk=opts.chunk if forced else None,
                           overlap=opts.overlap if forced else None, tile=opts.tile if forced else None,
                           estimator=estimator, host_bytes=host_memory(model.device))
        return check_ceiling(plan, opts.max_memory if forced else None)

    def run(plan: Plan) -> dict:
        model.vae.set_attention(plan.attention)
        guard = PrecisionGuard(model, progress)
        how = {"one-clip": "one clip", "stream": "streamed", "windows": f"windows of {plan.chunk_frames}"}
        bar = progress.frames(lf.frames, f"decode {name} ({how.get(plan.strategy, plan.strategy)})")
        with atomic_outputs([target], opts.overwrite) as (tmp,):
            if fmt == "png":
                sink = PngWriter(tmp, target.pattern or PNG_PATTERN, single=tmp if single else None)
            elif fmt == "gif":
                sink = GifWriter(tmp, fps)
            else:
                sink = VideoWriter(tmp, fmt, fps, size, opts.crf)
            writer = BackgroundWriter(sink)
            try:
                for images in decode_frames(model, lf, plan, scaling, geometry, guard, opts.allow_nonfinite):
                    if observer is not None:
                        observer(images)
                    for image in images:
                        writer.put(image)
                        bar.update(1)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
        return {"input": str(latents_path), "output": target.display, "format": fmt, "frames": lf.frames,
                "shape": [lf.frames, 3, size[1], size[0]], "fps": f"{fps.numerator}/{fps.denominator}",
                "precision_fallbacks": guard.events}

    result = with_oom_recovery(plan_for, run, model.device, progress)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def decode_frames(model: Model, lf: LatentFile, plan: Plan, scaling: float, geometry,
                  guard: PrecisionGuard | None = None, allow_nonfinite: bool = False) -> Iterator[np.ndarray]:
    """Decode the latents as the plan says and yield final uint8 frames (t, H, W, 3) in order, each frame once.

    "one-clip" and "stream" decode the whole clip exactly (streamed: layer by layer in pieces, the clip's
    activations on the device or parked on the host); "windows" decodes cross-faded windows, each one-clip or
    streamed. Work whose half-precision result holds inf/NaN is redone wider (`PrecisionGuard`)."""
    count = lf.frames if plan.strategy != "windows" else plan.chunk_frames
    plan_windows = windows(lf.frames, count, plan.overlap if plan.strategy == "windows" else 0)
    blender = WindowBlender(plan_windows)
    guard = guard or PrecisionGuard(model)

    def final(x: torch.Tensor, start: int) -> np.ndarray:
        bad = None if allow_nonfinite else first_nonfinite(x)
        if bad is not None:  # even in fp32: never written as black frames
            raise InputError(f"{printable(lf.path)}: the model gave NaN or inf for frame {start + bad} (in fp32 too); "
                             "the checkpoint or the latents are broken")
        return from_model(x, geometry)

    done = 0
    for window in plan_windows:
        z = lf.read(window.start, window.end)
        z = (z if plan.pieces is not None and plan.pieces.park else z.to(model.device)).float() / scaling
        what = f"frames {window.start}-{window.end - 1}"
        if plan.pieces is None:
            with torch.inference_mode():
                x = guard(lambda vae, dtype: vae.decode(z.to(dtype), num_frames=z.shape[0],
                                                        frame_batch=plan.frame_batch), what)
            parts = [x]
        else:
            parts = streamed(guard, z, plan, what)
            if len(plan_windows) == 1:  # one clip, streamed: its frames are final as they come
                for x in parts:
                    yield final(x, done)
                    done += x.shape[0]
                return
            parts = [torch.cat(list(parts))]  # a window is cross-faded whole
        for x in parts:
            with torch.inference_mode():
                blended = blender.push(x)
            if blended.shape[0]:
                yield final(blended, done)
                done += blended.shape[0]


def streamed(guard: PrecisionGuard, z: torch.Tensor, plan: Plan, what: str) -> Iterator[torch.Tensor]:
    """Decode one clip z (T, C, h, w) with the streaming executor, yielding its frames a few at a time.

    Half-precision pieces are checked as they are computed, and every check happens before the first frame is
    handed out, so a clip that overflows is redone in a wider dtype from the start (logged like any fallback)."""
    dtypes = [guard.model.dtype] + guard.wider()
    for i, dtype in enumerate(dtypes):
        vae = guard.model_in(dtype)
        with torch.inference_mode():
            frames = vae.decode_stream(z.to(dtype), plan.pieces, check_finite=i + 1 < len(dtypes),
                                       out_chunk=FRAME_OUT)
            try:
                first = next(frames, None)
            except NonFiniteActivation:
                guard.note(what, dtype, dtypes[i + 1])
                continue
        if first is not None:
            yield first[1]
        while True:
            with torch.inference_mode():
                item = next(frames, None)
            if item is None:
                return
            yield item[1]


FRAME_OUT = 4  # frames per block handed from a streamed decode to the writer


def flicker(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean |Δ reconstruction - Δ source| over consecutive frames, in 0-255 units: how much the frame-to-frame
    change of a reconstruction differs from the source's (0 = the same motion, no added flicker).
    reference, reconstruction: uint8 (T, H, W, 3), T >= 2."""
    ref, rec = reference.astype(np.float32), reconstruction.astype(np.float32)
    return float(np.abs((rec[1:] - rec[:-1]) - (ref[1:] - ref[:-1])).mean())


class RoundtripMeter:
    """Compares decoded frames with the same source frames as they arrive: PSNR, SSIM and flicker per clip.

    reference: the selected source frames, uint8 (H, W, 3), in order (streamed, not stored);
    clip_frames: frames per reported clip (None = one clip for the whole video).
    """

    def __init__(self, reference: Iterator[tuple[int, np.ndarray]], clip_frames: int | None = None):
        self.reference = reference
        self.clip_frames = clip_frames
        self.clips: list[dict] = []
        self._squared, self._ssim, self._flicker = [], [], []
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, decoded: np.ndarray) -> None:
        for image in decoded:
            _, ref = next(self.reference)
            if ref.shape != image.shape:
                raise InputError(f"reconstruction is {image.shape[1]}x{image.shape[0]}, source {ref.shape[1]}x{ref.shape[0]}")
            self._squared.append(float(np.mean((ref.astype(np.float64) - image.astype(np.float64)) ** 2)))
            self._ssim.append(ssim(ref[None], image[None]))
            if self._previous is not None:
                self._flicker.append(flicker(np.stack([self._previous[0], ref]), np.stack([self._previous[1], image])))
            self._previous = (ref, image)
            if self.clip_frames and len(self._squared) == self.clip_frames:
                self._flush()

    def _flush(self) -> None:
        if not self._squared:
            return
        mse = float(np.mean(self._squared))
        value = float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
        self.clips.append({"clip": len(self.clips), "frames": len(self._squared), "psnr": round(value, 3),
                           "ssim": round(float(np.mean(self._ssim)), 5),
                           "flicker": round(float(np.mean(self._flicker)), 4) if self._flicker else None})
        self._squared, self._ssim, self._flicker = [], [], []

    def summary(self) -> dict:
        self._flush()
        frames = sum(c["frames"] for c in self.clips)
        weights = [c["frames"] / frames for c in self.clips]
        flickers = [(w, c["flicker"]) for w, c in zip(weights, self.clips) if c["flicker"] is not None]
        total = sum(w for w, _ in flickers)
        return {"frames": frames, "psnr": round(sum(w * c["psnr"] for w, c in zip(weights, self.clips)), 3),
                "ssim": round(sum(w * c["ssim"] for w, c in zip(weights, self.clips)), 5),
                "flicker": round(sum(w * f for w, f in flickers) / total, 4) if total else None, "clips": self.clips}
