"""`vaecli encode`, `decode`, `roundtrip` and `demo`: the jobs, one input or a batch (`vaecli.pipeline.batch`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import (MAX_COUNT, AttentionOpt, BatchOpt, ChunkOpt, ConfigOpt, DeviceOpt, DtypeOpt,
                               FramesOpt, JsonOpt, ManifestOpt, MaxMemoryOpt, MaxPixelsOpt, ModelOpt, OutDirOpt, OutOpt,
                               OverlapOpt, OverwriteOpt, QuietOpt, ReadSpaceOpt, RevisionOpt, ScratchOpt, SkipOpt,
                               StartOpt, StrideOpt, TileOpt, app, check_batch_flags, check_choice, check_scratch_dir,
                               check_windows, given_path, handle_errors, model_source, print_result)
from vaecli.errors import UsageError, VaecliError
from vaecli.ops.device import dtype_name
from vaecli.ops.validate import DEFAULT_MAX_PIXELS
from vaecli.pipeline.batch import (Worker, batch_progress, decoded_name, for_stage, latents_name, load_model,
                                   read_inputs, run_batch)
from vaecli.pipeline.progress import Progress

FramesFitOpt = Annotated[Optional[str], typer.Option(
    "--frames-fit", help="Lengths off the model's frame rule (Wan: 1 + 4k): trim the last frames, or pad by "
                         "repeating the last one (the decode gives back the input's length). Default: refuse.")]
FRAMES_FIT = ("trim", "pad")


@app.command(short_help="Encode videos into latent files.")
@handle_errors
def encode(
    ctx: typer.Context,
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Videos, GIFs, images, image folders or globs.")] = None,
    out: OutOpt = None,
    out_dir: OutDirOpt = None,
    manifest: ManifestOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    start: StartOpt = 0,
    frames: FramesOpt = None,
    stride: StrideOpt = 1,
    size: Annotated[Optional[str], typer.Option(help="Resize frames to WxH first.")] = None,
    fit: Annotated[str, typer.Option(help="Sizes not multiple of 8: pad (reflect), crop or resize.")] = "pad",
    sample: Annotated[bool, typer.Option("--sample",
                                         help="Sample the posterior instead of taking its mode.")] = False,
    seed: Annotated[Optional[int], typer.Option(
        min=0, max=2**63 - 1, help="Seed for --sample (per frame, independent of batching; default 0).")] = None,
    batch: BatchOpt = None,
    max_memory: MaxMemoryOpt = None,
    save_moments: Annotated[bool, typer.Option("--save-moments",
                                               help="Also store the posterior mean and logvar.")] = False,
    frames_fit: FramesFitOpt = None,
    export: Annotated[Optional[str], typer.Option(
        help="Also write another format: comfy (.latent, raw latents; 5-D (1, C, T, h, w) for video VAEs).")] = None,
    latent_space: Annotated[str, typer.Option(
        help="What `latents` stores: normalized (what the diffusion model takes) or raw (the VAE's own).")
    ] = "normalized",
    latent_dtype: Annotated[str, typer.Option(help="Stored dtype of the latents: fp32, fp16 or bf16.")] = "fp32",
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: AttentionOpt = "auto",
    overwrite: OverwriteOpt = False,
    skip_existing: SkipOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode videos into latent files (INPUT -> INPUT.latents.safetensors).

    \b
    Examples:
      vaecli encode clip.mp4
      vaecli encode clip.mp4 -o clip.latents.safetensors --frames 25 --size 1024x576
      vaecli encode *.mp4 --out-dir latents/ --skip-existing --json > log.jsonl
    """
    from vaecli.ops.device import parse_dtype
    from vaecli.pipeline.frames import parse_size
    from vaecli.pipeline.planner import parse_bytes
    from vaecli.pipeline.latents_io import SPACES
    from vaecli.pipeline.prepare import EncodeOptions
    from vaecli.pipeline.runner import encode_file
    from vaecli.pipeline.video_io import Selection

    if seed is not None and not sample:
        raise UsageError("--seed only applies with --sample (the posterior mode needs no noise)")
    check_batch_flags(skip_existing, overwrite)
    check_choice("--export", export, ("comfy",))
    check_choice("--frames-fit", frames_fit, FRAMES_FIT)
    check_choice("--latent-space", latent_space, SPACES)
    if batch is not None and batch < 1:
        raise UsageError("--batch must be at least 1")
    opts = EncodeOptions(selection=Selection(start, frames, stride), size=parse_size(size), fit=fit, sample=sample,
                         seed=seed or 0, batch=batch, max_memory=parse_bytes(max_memory), attention=attention,
                         save_moments=save_moments, export_comfy=export == "comfy", frames_fit=frames_fit,
                         latent_space=latent_space,
                         latent_dtype=parse_dtype(latent_dtype), overwrite=overwrite, max_pixels=max_pixels)
    if fit not in ("pad", "crop", "resize"):
        raise UsageError(f"--fit must be pad, crop or resize, not {fit!r}")
    progress = batch_progress(quiet)
    work = Worker(model_source(model, revision), config, device, dtype, attention, progress,
                   lambda m, item, target, guard: encode_file(m, item, target, opts, progress, guard=guard),
                   stage="encode")
    code = run_batch(read_inputs(inputs, given_path(manifest, "--manifest")), out, given_path(out_dir, "--out-dir"),
                     latents_name, work, skip_existing=skip_existing,
                     as_json=as_json, progress=progress, verb="encode")
    if code:
        raise typer.Exit(code)


@app.command(short_help="Decode latent files into videos.")
@handle_errors
def decode(
    ctx: typer.Context,
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Latent files (.latents.safetensors or .latent).")] = None,
    out: Annotated[Optional[str], typer.Option("-o", "--out", help="Output video, folder/ or %05d pattern for PNGs.")] = None,
    out_dir: OutDirOpt = None,
    manifest: ManifestOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="mp4 (H.264), webm (VP9), gif or png.")] = None,
    crf: Annotated[int, typer.Option(
        min=0, max=63, help="Quality for mp4 (H.264, 0-51) and webm (VP9, 0-63): lower is better; 0 is lossless "
                            "H.264.")] = 18,
    fps: Annotated[Optional[str], typer.Option(help="Frame rate (default: from the latents' metadata).")] = None,
    chunk: ChunkOpt = None,
    overlap: OverlapOpt = None,
    tile: TileOpt = None,
    max_memory: MaxMemoryOpt = None,
    scratch: ScratchOpt = None,
    native_size: Annotated[bool, typer.Option(
        "--native-size", help="Keep the model's size; do not undo padding/cropping/resizing.")] = False,
    allow_model_mismatch: Annotated[bool, typer.Option(
        "--allow-model-mismatch", help="Decode with another model than the encoding one.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite",
        help="Decode latents holding NaN/inf anyway (refused by default: they decode to black).")] = False,
    latent_space: ReadSpaceOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: AttentionOpt = "auto",
    overwrite: OverwriteOpt = False,
    skip_existing: SkipOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Decode latent files into videos (X.latents.safetensors -> X.decoded.mp4).

    \b
    Examples:
      vaecli decode clip.latents.safetensors
      vaecli decode clip.latents.safetensors -o clip.webm --crf 30
      vaecli decode clip.latents.safetensors -o frames/          # lossless PNG sequence
      vaecli decode generated.safetensors --fps 7 -o out.mp4     # latents without vaecli metadata
    """
    from vaecli.pipeline.latents_io import SPACES, parse_fps
    from vaecli.pipeline.planner import parse_bytes
    from vaecli.pipeline.prepare import DecodeOptions
    from vaecli.pipeline.runner import decode_file

    if fmt is not None and fmt not in ("mp4", "webm", "gif", "png"):
        raise UsageError(f"--format must be mp4, webm, gif or png, not {fmt!r}")
    check_batch_flags(skip_existing, overwrite)
    check_windows(chunk, overlap, tile)
    check_choice("--latent-space", latent_space, SPACES)
    opts = DecodeOptions(fmt=fmt, crf=crf, fps=parse_fps(fps), chunk=chunk, overlap=overlap, tile=tile,
                         max_memory=parse_bytes(max_memory), attention=attention, native_size=native_size,
                         allow_model_mismatch=allow_model_mismatch, overwrite=overwrite,
                         allow_nonfinite=allow_nonfinite, max_pixels=max_pixels, latent_space=latent_space,
                         scratch=check_scratch_dir(scratch))
    # target stays a str when it ends in "/" (a PNG folder)
    progress = batch_progress(quiet)
    work = Worker(model_source(model, revision), config, device, dtype, attention, progress,
                   lambda m, item, target, guard: decode_file(m, Path(item), target, opts, progress,
                                                                guard=guard), stage="decode")
    code = run_batch(read_inputs(inputs, given_path(manifest, "--manifest")), out, given_path(out_dir, "--out-dir"),
                     decoded_name(fmt), work,
                     skip_existing=skip_existing, as_json=as_json, progress=progress, verb="decode")
    if code:
        raise typer.Exit(code)


@app.command(short_help="Encode and decode a video; print PSNR, SSIM, flicker.")
@handle_errors
def roundtrip(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(help="A video, GIF, image folder or glob.")],
    out: Annotated[str, typer.Option("-o", "--out", help="Reconstructed video (or folder/ for PNGs).")],
    report: Annotated[Optional[Path], typer.Option(help="Write the metrics as JSON here.")] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    start: StartOpt = 0,
    frames: FramesOpt = None,
    stride: StrideOpt = 1,
    fit: Annotated[str, typer.Option(help="pad, crop or resize.")] = "pad",
    frames_fit: FramesFitOpt = None,
    chunk: ChunkOpt = None,
    overlap: OverlapOpt = None,
    tile: TileOpt = None,
    max_memory: MaxMemoryOpt = None,
    scratch: ScratchOpt = None,
    clip_frames: Annotated[Optional[int], typer.Option(
        min=1, max=MAX_COUNT, help="Report metrics per clip of N frames (default: all).")] = None,
    crf: Annotated[int, typer.Option(min=0, max=63, help="Quality of the written video (H.264 0-51, VP9 0-63).")] = 18,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: AttentionOpt = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode and decode a video; print PSNR, SSIM and flicker per clip (measured before the output is compressed).

    Flicker is the mean |Δ reconstruction - Δ source| between consecutive frames, in 0-255 units.
    """
    import tempfile

    from vaecli.ops.files import Output, check_outputs
    from vaecli.pipeline.planner import parse_bytes
    from vaecli.pipeline.metrics import RoundtripMeter
    from vaecli.pipeline.outputs import output_kind
    from vaecli.pipeline.prepare import DecodeOptions, EncodeOptions
    from vaecli.pipeline.runner import decode_file, encode_file
    from vaecli.pipeline.video_io import FrameSource, Selection

    check_windows(chunk, overlap, tile)
    check_choice("--frames-fit", frames_fit, FRAMES_FIT)
    given_path(out, "-o")
    budget = parse_bytes(max_memory)
    video = output_kind(out, None)[1]
    if report is not None and not report.name.endswith(".json"):
        raise UsageError(f"{report}: the report is JSON; end its name in .json")
    check_outputs([video] + ([Output(report)] if report is not None else []), overwrite)  # all before any work
    progress = Progress.terminal(quiet)
    m = load_model(model_source(model, revision), config, device, dtype, attention, progress, stage="encode")
    dm = for_stage(m, dtype, "decode")
    selection = Selection(start, frames, stride)
    with tempfile.TemporaryDirectory(prefix="vaecli-roundtrip-") as tmp:
        latents = Path(tmp) / "roundtrip.latents.safetensors"
        enc = encode_file(m, input, latents, EncodeOptions(selection=selection, fit=fit, max_memory=budget,
                                                           attention=attention, max_pixels=max_pixels,
                                                           frames_fit=frames_fit), progress)
        if (enc["frames_fit"] or {}).get("mode") == "trim":  # measured on the frames that were coded
            selection = Selection(start, enc["frames_fit"]["coded"], stride)
        meter = RoundtripMeter(FrameSource(input, max_pixels).frames(selection), clip_frames)
        dec = decode_file(dm, latents, out, DecodeOptions(chunk=chunk, overlap=overlap, tile=tile, crf=crf,
                                                         max_memory=budget, attention=attention, overwrite=overwrite,
                                                         max_pixels=max_pixels, scratch=check_scratch_dir(scratch)),
                          progress, observer=meter)
    progress.close()
    result = {"input": input, "output": dec["output"], "model": m.name, "family": m.family, "device": str(m.device),
              "dtype": dtype_name(m.dtype), "decode_dtype": dtype_name(dm.dtype), "encode_seconds": enc["seconds"],
              "decode_seconds": dec["seconds"], "plan": dec["plan"], **meter.summary()}
    if report is not None:
        write_report(report, result, overwrite, video)

    def line(name: str, c: dict) -> str:
        text = f"{name}: {c['frames']} frames  PSNR {c['psnr']:.2f} dB  SSIM {c['ssim']:.4f}"
        return text + (f"  flicker {c['flicker']:.2f}" if c.get("flicker") is not None else "")

    human = [line(f"clip {c['clip']}", c) for c in result["clips"]]
    human.append(line("all   ", result) + f"  -> {result['output']}")
    print_result(result, as_json, human)


def write_report(report: Path, result: dict, overwrite: bool, video) -> None:
    """The roundtrip's metrics as JSON; on failure the reconstructed video goes too (the outputs fail together)."""
    from vaecli.ops.files import atomic_output, remove, write_error

    try:
        with atomic_output(report, overwrite) as tmp_report:
            tmp_report.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except (OSError, VaecliError) as e:
        if video.kind != "frames":
            remove(video.path)
        raise write_error(report, e) if isinstance(e, OSError) else e from None


@app.command(short_help="Encode and decode a sample clip with the bundled model.")
@handle_errors
def demo(
    ctx: typer.Context,
    out_dir: Annotated[str, typer.Option("--out-dir", "-o", help="Folder for the demo's files.")] = "vaecli-demo",
    frames: Annotated[int, typer.Option("--frames", min=2, max=10_000, help="Frames of the sample clip.")] = 16,
    size: Annotated[str, typer.Option(help="Size of the sample clip, WxH.")] = "192x128",
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite/--keep", help="Replace the demo's files from an earlier run, or refuse to.")] = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make a sample clip, encode and decode it (bundled model by default) and show how close it came.

    Writes sample.mp4, sample.latents.safetensors, sample.decoded.mp4 and side_by_side.mp4 (source left,
    reconstruction right) to --out-dir and prints PSNR, SSIM, flicker and timings.
    """
    import time
    from fractions import Fraction

    import numpy as np

    from vaecli.ops.files import atomic_output
    from vaecli.pipeline.frames import parse_size
    from vaecli.pipeline.metrics import RoundtripMeter
    from vaecli.pipeline.prepare import DecodeOptions, EncodeOptions
    from vaecli.pipeline.runner import decode_file, encode_file
    from vaecli.pipeline.synthetic import synthetic_clip
    from vaecli.pipeline.video_io import FrameSource, VideoWriter

    out_dir = given_path(out_dir, "--out-dir")
    width, height = parse_size(size)
    if frames < 2:
        raise UsageError("--frames must be at least 2")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = Progress.terminal(quiet)
    m = load_model(model_source(model, revision), None, device, dtype, "auto", progress, stage="encode")
    dm = for_stage(m, dtype, "decode")
    load_seconds = time.perf_counter() - started
    fps = Fraction(24)
    sample, latents = out_dir / "sample.mp4", out_dir / "sample.latents.safetensors"
    decoded, side = out_dir / "sample.decoded.mp4", out_dir / "side_by_side.mp4"

    def write_video(path: Path, images) -> None:
        with atomic_output(path, overwrite) as tmp:
            writer = None
            for image in images:
                writer = writer or VideoWriter(tmp, "mp4", fps, (image.shape[1], image.shape[0]), crf=12)
                writer.write(image)
            writer.close()

    write_video(sample, synthetic_clip(frames, height, width, seed=7, text="vaecli demo"))
    enc = encode_file(m, str(sample), latents, EncodeOptions(overwrite=overwrite), progress)
    meter = RoundtripMeter(FrameSource(sample).frames())
    dec = decode_file(dm, latents, decoded, DecodeOptions(overwrite=overwrite), progress, observer=meter)
    progress.close()
    metrics = meter.summary()
    pairs = zip(FrameSource(sample).frames(), FrameSource(decoded).frames())
    write_video(side, (np.concatenate([a, b], axis=1) for (_, a), (_, b) in pairs))
    result = {"model": m.name, "family": m.family, "device": str(m.device), "dtype": dtype_name(m.dtype),
              "decode_dtype": dtype_name(dm.dtype),
              "frames": frames, "size": [width, height], "psnr": metrics["psnr"], "ssim": metrics["ssim"], "flicker": metrics["flicker"],
              "load_seconds": round(load_seconds, 3), "encode_seconds": enc["seconds"], "decode_seconds": dec["seconds"],
              "outputs": [str(p) for p in (sample, latents, decoded, side)], "decode_plan": dec["plan"]}
    human = [f"model:   {m.name} on {m.device} (encode {dtype_name(m.dtype)}, decode {dtype_name(dm.dtype)}), "
             f"loaded in {load_seconds:.2f} s",
             f"clip:    {frames} frames of {width}x{height} -> latents {enc['shape']}",
             f"quality: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, flicker {metrics['flicker']:.2f}",
             f"time:    encode {enc['seconds']:.2f} s, decode {dec['seconds']:.2f} s",
             *[f"wrote:   {p}" for p in result["outputs"]]]
    print_result(result, as_json, human)
