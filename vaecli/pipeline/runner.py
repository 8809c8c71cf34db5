"""Running encode and decode jobs on any model family's `Codec`, with reading and writing overlapped.

Encode: a reader thread decodes frames from the container into a bounded queue; the main thread fits them,
runs the encoder in batches of the plan's size (a multiple of the frame rule's factor) and streams latents to
disk. Decode: the main thread reads latents clip by clip (window by window) and runs the decoder as the plan
says; a writer thread encodes the frames into the output video. Jobs are prepared and planned by
`vaecli.pipeline.prepare`, the same calls `vaecli plan` prints; the runner only re-plans after an out-of-memory.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vaecli.errors import InputError, OutOfMemory, UsageError, printable
from vaecli.model.family import Codec
from vaecli.model.plan import Budget, Plan, format_bytes
from vaecli.model.posterior import DiagonalGaussian
from vaecli.ops.device import dtype_name
from vaecli.ops.files import atomic_outputs, check_outputs
from vaecli.ops.validate import first_nonfinite
from vaecli.pipeline.chunking import WindowBlender, windows
from vaecli.pipeline.frames import from_model, to_model
from vaecli.pipeline.latents_io import LatentFile, LatentFileWriter, comfy_path, latent_metadata
from vaecli.pipeline.outputs import PNG_PATTERN, latents_output, output_kind
from vaecli.pipeline.planner import check_scratch, enforce_max_memory, host_memory
from vaecli.pipeline.precision import PrecisionGuard
from vaecli.pipeline.prepare import DecodeOptions, EncodeJob, EncodeOptions, prepare_decode, prepare_encode
from vaecli.pipeline.progress import Progress
from vaecli.pipeline.threads import BackgroundWriter, background
from vaecli.pipeline.video_io import GifWriter, PngWriter, VideoWriter


def batches(frames: Iterator[tuple[int, np.ndarray]], size: int,
            first: int | None = None) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Consecutive lists of `size` frames (the first of `first`, when given), the last one possibly shorter."""
    batch, want = [], first or size
    for item in frames:
        batch.append(item)
        if len(batch) == want:
            yield batch
            batch, want = [], size
    if batch:
        yield batch


def fit_frames(frames: Iterator[tuple[int, np.ndarray]], rule, mode: str, where: str,
               report: dict) -> Iterator[tuple[int, np.ndarray]]:
    """The frames, the last few dropped ("trim") or the last one repeated ("pad") so that their count is valid
    for the frame rule (`FrameRule.fit`); `report` gets mode, frames read and coded once the source ends."""
    tail: list[tuple[int, np.ndarray]] = []  # the last `factor` frames: all that a fit can change
    read = 0
    for item in frames:
        read += 1
        tail.append(item)
        if len(tail) > rule.factor:
            yield tail.pop(0)
    if not read:
        return
    coded = rule.fit(read, mode, where)
    report.update(mode=mode, read=read, coded=coded)
    yield from tail[:len(tail) - max(0, read - coded)]
    for _ in range(coded - read):
        yield tail[-1]


def frame_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """N(0, 1) noise for one latent frame, from (seed, the index of its first source frame): the same whatever the
    batch size or device."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn(shape, generator=gen)


def encode_file(model: Codec, source_spec: str, out: Path | str, opts: EncodeOptions,
                progress: Progress | None = None, guard: PrecisionGuard | None = None) -> dict:
    """Encode one video (or image sequence) into a latent file; returns the JSON result.

    The batch size (frames per encoder call) and attention backend come from the memory planner unless forced.
    progress: what to show on stderr (default: nothing); guard: the batch's precision guard (default: a new one).
    """
    started = time.perf_counter()
    progress = progress or Progress()
    guard = guard or PrecisionGuard(model, progress)
    name = Path(source_spec).name
    progress.stage(f"encode {name}: opening")
    outputs = latents_output(out, opts.export_comfy)  # a str keeps the "/" that names a folder
    out = outputs[0].path
    check_outputs(outputs, opts.overwrite)
    job = prepare_encode(model, source_spec, opts)
    enforce_max_memory(model.device, opts.max_memory)

    def plan_for(budget: Budget | None) -> Plan:
        progress.stage(f"encode {name}: planning")
        return job.plan(budget)

    def run(plan: Plan) -> dict:
        return _encode_run(job, out, outputs, plan, progress, guard)

    result = with_oom_recovery(plan_for, run, model.device, progress)
    result["precision_fallbacks"] = guard.take_events()
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _encode_run(job: EncodeJob, out: Path, outputs, plan: Plan, progress: Progress, guard: PrecisionGuard) -> dict:
    codec, opts, geometry, spec = job.codec, job.opts, job.geometry, job.spec
    source_size = geometry.source
    fps = job.source.fps / opts.selection.stride  # every stride-th frame: plays them at the source's speed
    frames = background(job.source.frames(opts.selection))
    fitted: dict = {}  # what --frames-fit did
    stream = fit_frames(frames, codec.frame_rule, opts.frames_fit, printable(spec), fitted) if opts.frames_fit \
        else frames
    names = ("latents", "mean", "logvar") if opts.save_moments else ("latents",)
    writer = LatentFileWriter(out, names, opts.latent_dtype)
    comfy = LatentFileWriter(comfy_path(out), ("latent_tensor",), torch.float32) if opts.export_comfy else None
    indices: list[int] = []
    latent_count = 0
    bar = progress.frames(opts.selection.count or job.source.count, f"encode {Path(spec).name} "
                                                                     f"({plan.chunk_frames} at a time)")
    try:
        clip: dict = {}  # what a causal model carries from one batch of this clip to the next
        rule = codec.frame_rule
        for batch in batches(stream, plan.chunk_frames, 1 + plan.chunk_frames if rule.causal else None):
            for _, image in batch:
                if (image.shape[1], image.shape[0]) != source_size:
                    raise InputError(f"{spec}: frame size changes from {source_size[0]}x{source_size[1]} "
                                     f"to {image.shape[1]}x{image.shape[0]}")
            if not codec.frame_rule.valid(len(batch)):  # the last batch of a source whose length was not known
                codec.frame_rule.check(len(indices) + len(batch), printable(spec))
            z, posterior = encode_batch(codec, batch, geometry, opts, guard, plan, clip, starts_clip=not indices)
            checked = (z, posterior.mean, posterior.logvar) if opts.save_moments else (z,)
            for bad in (first_nonfinite(t) for t in checked):
                if bad is not None:  # even in fp32: never written
                    raise InputError(f"{printable(spec)}: the encoder gave NaN or inf for latent frame "
                                     f"{latent_count + bad} (in fp32 too); the checkpoint is broken")
            writer.append("latents", codec.normalization.normalize(z.float()) if opts.latent_space == "normalized"
                          else z.float())
            if opts.save_moments:
                writer.append("mean", posterior.mean.float())
                writer.append("logvar", posterior.logvar.float())
            if comfy is not None:
                comfy.append("latent_tensor", z.float())
            indices.extend(i for i, _ in batch)
            latent_count += z.shape[0]
            bar.update(len(batch))
        fit_note(fitted, spec, progress)
        metadata = latent_metadata(
            codec, opts.latent_space, fps=f"{fps.numerator}/{fps.denominator}",
            source=Path(spec).name, frame_start=str(indices[0]), frame_stride=str(opts.selection.stride),
            frame_count=str(latent_count), source_frames=str(len(indices)), geometry=geometry.to_json(),
            dtype=dtype_name(codec.dtype), latents_dtype=dtype_name(opts.latent_dtype),
            posterior="sample" if opts.sample else "mode", seed=str(opts.seed) if opts.sample else "",
            frames_fit=json.dumps(fitted, sort_keys=True) if fitted.get("read", 0) != fitted.get("coded", 0) else "")
        with atomic_outputs(outputs, opts.overwrite) as temps:  # both files or neither
            writer.finish(temps[0], metadata)
            if comfy is not None:
                # ComfyUI's .latent: raw `latent_tensor` plus an empty `latent_format_version_0`
                comfy.finish(temps[1], {"format": "pt"}, empty=("latent_format_version_0",), video=codec.video_latents)
    finally:  # every side file goes, even when closing one fails (a full disk)
        bar.close()
        try:
            writer.close()
        finally:
            try:
                if comfy is not None:
                    comfy.close()
            finally:
                frames.close()
    f = codec.spatial_factor
    shape = [latent_count, codec.latent_channels, geometry.processed[1] // f, geometry.processed[0] // f]
    return {"input": spec, "output": str(out), "outputs": [str(o.path) for o in outputs], "frames": len(indices),
            "frames_fit": fitted or None, "latent_space": opts.latent_space, "latent_frames": latent_count,
            "shape": shape, "fps": f"{fps.numerator}/{fps.denominator}",
            "family": codec.family, "attention": plan.attention.name,
            "geometry": {"source": list(geometry.source), "processed": list(geometry.processed), "fit": geometry.fit}}


def fit_note(fitted: dict, spec: str, progress: Progress) -> None:
    """Say on stderr what --frames-fit did (frames are never dropped or added silently)."""
    read, coded = fitted.get("read", 0), fitted.get("coded", 0)
    if read > coded:
        progress.note(f"vaecli: {printable(spec)}: {read} frames trimmed to {coded} (--frames-fit trim dropped the "
                      f"last {read - coded})")
    elif coded > read:
        progress.note(f"vaecli: {printable(spec)}: {read} frames padded to {coded} (the last frame repeated; the "
                      f"decode gives back {read})")


def encode_batch(model: Codec, batch: list[tuple[int, np.ndarray]], geometry, opts: EncodeOptions,
                 guard: PrecisionGuard | None, plan: Plan, clip: dict | None = None, starts_clip: bool = True):
    """Source frames [(index, uint8 (H, W, 3))] -> (raw latents (t, C, h, w), posterior), t latent frames by the
    frame rule. The frames go where the plan computes them (`Codec.input_device`). clip: the state a causal
    model carries between the batches of one clip (a dict per clip, passed to every batch in order)."""
    x = to_model([image for _, image in batch], geometry, model.input_device(plan), torch.float32)
    guard = guard or PrecisionGuard(model)
    moments = guard(lambda codec: codec.moments(x, plan, clip=clip), f"frames {batch[0][0]}-{batch[-1][0]}")
    with torch.inference_mode():
        posterior = DiagonalGaussian(moments)
        z = posterior.mode()
        if opts.sample:
            anchors = model.frame_rule.anchors(len(batch), starts_clip)
            noise = torch.stack([frame_noise(tuple(z.shape[1:]), opts.seed, batch[a][0]) for a in anchors])
            z = z + posterior.std * noise.to(z.device, z.dtype)
    return z, posterior


MAX_OOM_RETRIES = 4


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA OOM, or the CPU allocator failing."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def with_oom_recovery(plan_for: Callable[[Budget | None], Plan], run: Callable[[Plan], dict], device: torch.device,
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
        budget = Budget(device, plan.activation_bytes // 2, host_memory(device))
        (progress or Progress()).note(f"vaecli: out of memory ({message}); re-planning within "
                                      f"{format_bytes(budget.activation_bytes)}")


def decode_file(model: Codec, latents_path: Path, out: Path | str, opts: DecodeOptions,
                progress: Progress | None = None, observer: Callable[[np.ndarray], None] | None = None,
                guard: PrecisionGuard | None = None) -> dict:
    """Decode one latent file into a video or PNG sequence; returns the JSON result.

    The plan (windows, overlap, tiles, attention backend) comes from the memory planner unless forced;
    observer: called with each block of final frames, uint8 (t, H, W, 3), before they are written;
    progress: what to show on stderr (default: nothing); guard: the batch's precision guard.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    guard = guard or PrecisionGuard(model, progress)
    name = Path(latents_path).name
    progress.stage(f"decode {name}: reading latents")
    job = prepare_decode(model, latents_path, opts)
    lf = job.latents
    fps = opts.fps or lf.fps
    if fps is None:
        raise UsageError(f"{latents_path}: no vaecli metadata to take the frame rate from; pass --fps")
    fmt, target, single = output_kind(out, opts.fmt, job.frames)
    crf_max = {"mp4": 51, "webm": 63}.get(fmt)
    if crf_max is not None and not 0 <= opts.crf <= crf_max:
        raise UsageError(f"--crf {opts.crf} is out of range for {fmt} (0-{crf_max})")
    check_outputs([target], opts.overwrite)
    job.scratch = opts.scratch or target.path.parent  # a clip kept on disk goes beside the output
    geometry = None if opts.native_size else lf.geometry
    f = model.spatial_factor
    size = geometry.source if geometry else (lf.shape[3] * f, lf.shape[2] * f)
    enforce_max_memory(model.device, opts.max_memory)

    def plan_for(budget: Budget | None) -> Plan:
        progress.stage(f"decode {name}: planning")
        return job.plan(budget)

    def run(plan: Plan) -> dict:
        check_scratch(plan)
        if not plan.exact:  # said on stderr, not only in --json: the frames will differ from the exact decode
            why = "forced by --chunk" if opts.chunk is not None else "nothing exact fits (see `vaecli plan`)"
            progress.note(f"vaecli: note: {name}: APPROXIMATE decode in windows of {plan.chunk_frames} frames "
                          f"overlapping by {plan.overlap}, cross-faded; {why}")
        if plan.work > 1:  # exact, but slower: said before the wait
            why = "forced by --tile" if opts.tile is not None else "whole frames do not fit the memory budget"
            progress.note(f"vaecli: note: {name}: {plan.pieces.describe()}; about {plan.work:.1f}x the work of "
                          f"whole frames; {why}")
        how = {"one-clip": "one clip", "stream": "streamed", "windows": f"windows of {plan.chunk_frames}"}
        bar = progress.frames(job.frames, f"decode {name} ({how.get(plan.strategy, plan.strategy)})")
        with atomic_outputs([target], opts.overwrite) as (tmp,):
            if fmt == "png":
                sink = PngWriter(tmp, target.pattern or PNG_PATTERN, single=tmp if single else None)
            elif fmt == "gif":
                sink = GifWriter(tmp, fps)
            else:
                sink = VideoWriter(tmp, fmt, fps, size, opts.crf)
            writer = BackgroundWriter(sink)
            try:
                for images in decode_frames(model, lf, plan, geometry, guard, opts.allow_nonfinite):
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
        return {"input": str(latents_path), "output": target.display, "format": fmt, "frames": job.frames,
                "latent_frames": lf.frames, "shape": [job.frames, 3, size[1], size[0]],
                "fps": f"{fps.numerator}/{fps.denominator}", "family": model.family, "attention": plan.attention.name}

    result = with_oom_recovery(plan_for, run, model.device, progress)
    result["precision_fallbacks"] = guard.take_events()
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def decode_frames(model: Codec, lf: LatentFile, plan: Plan, geometry, guard: PrecisionGuard | None = None,
                  allow_nonfinite: bool = False) -> Iterator[np.ndarray]:
    """Decode the latents as the plan says and yield final uint8 frames (t, H, W, 3) in order, each frame once.

    "one-clip" and "stream" decode the whole clip exactly; "windows" (one latent frame per frame only) decodes
    cross-faded windows, each exactly. The latents are read once, a window at a time, and checked for NaN/inf as
    they are read. Work whose half-precision result holds inf/NaN is redone wider (`PrecisionGuard`)."""
    count = lf.frames if plan.strategy != "windows" else plan.chunk_frames
    plan_windows = windows(lf.frames, count, plan.overlap if plan.strategy == "windows" else 0)
    blender = WindowBlender(plan_windows)
    guard = guard or PrecisionGuard(model)
    done = 0
    keep = lf.output_frames(model.frame_rule)

    def final(x: torch.Tensor) -> np.ndarray:
        x = x[:keep - done]
        bad = None if allow_nonfinite else first_nonfinite(x)
        if bad is not None:  # even in fp32: never written as black frames
            raise InputError(f"{printable(lf.path)}: the model gave NaN or inf for frame {done + bad} (in fp32 too); "
                             "the checkpoint or the latents are broken")
        return from_model(x, geometry)

    if len(plan_windows) == 1:  # one clip: its frames are final as they come, step by step
        clip: dict = {}
        unit = "frames" if model.frame_rule.factor == 1 else "latent frames"
        for a, b in model.decode_steps(plan, lf.frames):
            z = lf.to_raw(lf.read_checked(a, b, allow_nonfinite), model)
            step = guard.run(lambda codec, check: codec.decode(z, plan, check_finite=check, clip=clip),
                             f"{unit} {a}-{b - 1}")
            for x in step:
                if done < keep:
                    yield final(x)
                done += x.shape[0]
        return
    for window in plan_windows:
        z = lf.to_raw(lf.read_checked(window.start, window.end, allow_nonfinite), model)
        parts = guard.run(lambda codec, check: codec.decode(z, plan, check_finite=check),
                          f"frames {window.start}-{window.end - 1}")
        with torch.inference_mode():
            blended = blender.push(torch.cat(list(parts)))  # a window is cross-faded whole
        if blended.shape[0] and done < keep:
            yield final(blended)
        done += blended.shape[0]
