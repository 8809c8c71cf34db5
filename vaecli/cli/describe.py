"""`vaecli info`, `convert` and `plan`: describe inputs and models, convert layouts, show the plan that will run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import (AttentionOpt, BatchOpt, ChunkOpt, ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt,
                               MaxMemoryOpt, MaxPixelsOpt, ModelOpt, OverlapOpt, ReadSpaceOpt, RevisionOpt, ScratchOpt,
                               StartOpt, StrideOpt, TileOpt, app, check_choice, check_scratch_dir, check_windows,
                               file_kind, given_path, handle_errors, model_path, model_source, plan_model,
                               print_result)
from vaecli.errors import printable
from vaecli.ops.validate import DEFAULT_MAX_PIXELS, path_text


@app.command(short_help="Describe a video, latent file or checkpoint.")
@handle_errors
def info(
    ctx: typer.Context,
    path: Annotated[Optional[str], typer.Argument(
        help="A video, image folder, GIF, latent file, checkpoint or model name (default: the bundled model).")] = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    device: Annotated[str, typer.Option(help="Device to resolve the attention backend for: auto, cpu, cuda[:i].")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    attention: AttentionOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Describe a video (streams, frames, fps, size), a latent file (shape, metadata) or a model: a checkpoint,
    ORG/REPO on Hugging Face, or the bundled model (`vaecli info` alone: where its file lives)."""
    from vaecli.model.checkpoint import bundled_model_path

    spec = path_text(path or "vaecli-small", "input")
    path = Path(spec) if any(ch in spec for ch in "*?[") else model_path(spec, revision)  # globs: image frames
    kind = file_kind(path)
    if kind == "latents":
        from vaecli.pipeline.latents_io import describe_latents

        result = describe_latents(path)
        meta = result["metadata"]
        human = [f"file:      {result['path']}", f"latents:   {result['tensor']} {result['shape']} {result['dtype']}"
                 f" ({'scaled by the model' if result['scaled'] else 'raw, ComfyUI'})"]
        human += [f"{printable(k) + ':':<17}{printable(v)}" for k, v in sorted(meta.items()) if k != "__metadata__"]
        if not result["vaecli_metadata"]:
            human.append("no vaecli metadata: decode it with --fps (and --model)")
        return print_result(result, as_json, human)
    if kind == "video":
        from vaecli.pipeline.video_io import describe_video

        result = describe_video(path)
        human = [f"file:      {result['path']}", f"kind:      {result['kind']} ({result['codec']})",
                 f"frames:    {result['frames']}", f"fps:       {result['fps']} ({result['fps_float']})",
                 f"size:      {result['width']}x{result['height']}", f"duration:  {result['duration_s']} s"]
        return print_result(result, as_json, human)
    from vaecli.model.checkpoint import describe_checkpoint
    from vaecli.ops.attention import resolve_attention
    from vaecli.ops.device import dtype_name, parse_device, parse_dtype

    dev, dt = parse_device(device), parse_dtype(dtype)
    backend = resolve_attention(attention, dev, dt)
    result = describe_checkpoint(path, config)
    bundled = path.resolve() == bundled_model_path().resolve()
    result.update(device=str(dev), dtype=dtype_name(dt), attention=backend.name, attention_reason=backend.reason,
                  bundled=bundled)
    human = [
        f"file:        {result['path']}",
        *(["bundled:     yes: the default model (--model vaecli-small), installed with vaecli at the path above"]
          if bundled else []),
        f"family:      {result['family']} ({result['family_title']})",
        f"layout:      {result['layout_detail']}",
        *result["summary"],
        f"parameters:  {result['parameters']:,} in {result['tensors']} tensors ({', '.join(result['dtypes'])})",
        f"attention:   {backend.describe()} [{dev}, {dtype_name(dt)}]",
    ]
    print_result(result, as_json, human)


@app.command(short_help="Convert a VAE checkpoint between layouts.")
@handle_errors
def convert(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(
        help="Any supported checkpoint (full SVD file, ComfyUI, diffusers folder, ORG/REPO, vaecli-small).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output .safetensors file (or folder for diffusers).")],
    to: Annotated[str, typer.Option("--to", help="Target layout: sgm (ComfyUI/standalone SVD/SD) or diffusers; "
                                                     "original or diffusers for a Wan VAE (default: sgm, or original for Wan).")] = "",
    revision: RevisionOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as fp32, fp16 or bf16 (default: as read).")] = None,
    config: ConfigOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a VAE between layouts; extracts the VAE from a full SVD checkpoint."""
    from vaecli.model.checkpoint import convert_checkpoint

    written = convert_checkpoint(model_path(checkpoint, revision), given_path(out, "-o"), to=to, dtype=dtype, overwrite=overwrite,
                                 config=config)
    print_result({"input": str(checkpoint), "output": str(written), "layout": to or "default", "dtype": dtype},
                  as_json, [str(written)])


# ------------------------------------------------------------------------------------------ encode / decode


@app.command(short_help="Show the memory plan that encode/decode will run.")
@handle_errors
def plan(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(help="A video (plans encode and decode) or a latent file (decode).")],
    frames: Annotated[Optional[int], typer.Option("--frames", min=1, max=10_000_000,
                                                  help="Plan for this many frames.")] = None,
    start: StartOpt = 0,
    stride: StrideOpt = 1,
    max_memory: MaxMemoryOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    size: Annotated[Optional[str], typer.Option(help="Resize frames to WxH first (video input).")] = None,
    fit: Annotated[str, typer.Option(help="pad, crop or resize (video input).")] = "pad",
    chunk: ChunkOpt = None,
    overlap: OverlapOpt = None,
    tile: TileOpt = None,
    scratch: ScratchOpt = None,
    batch: BatchOpt = None,
    latent_space: ReadSpaceOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: AttentionOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Show the memory plan (attention backend, windows, tiles, predicted peak) without running the model.

    \b
    Examples:
      vaecli plan clip.mp4 --config svd-vae --max-memory 8GiB
      vaecli plan clip.latents.safetensors -m svd_xt.safetensors --frames 25 --json
    """
    from vaecli.pipeline.batch import for_stage
    from vaecli.pipeline.frames import parse_size
    from vaecli.pipeline.latents_io import SPACES
    from vaecli.pipeline.planner import decode_plan, parse_bytes
    from vaecli.pipeline.prepare import DecodeOptions, EncodeOptions, prepare_decode, prepare_encode
    from vaecli.pipeline.video_io import Selection

    check_windows(chunk, overlap, tile)
    video = file_kind(Path(input)) != "latents"
    codec = plan_model(model_source(model, revision), config, device, dtype, attention,
                       stage="encode" if video else "decode")
    limit = parse_bytes(max_memory)
    result: dict = {"input": input, "model": codec.name, "family": codec.family}
    human = []
    if not video:  # exactly what decode prepares and plans
        check_choice("--latent-space", latent_space, SPACES)
        opts = DecodeOptions(chunk=chunk, overlap=overlap, tile=tile, max_memory=limit, attention=attention,
                             allow_model_mismatch=True, max_pixels=max_pixels, scratch=check_scratch_dir(scratch),
                             latent_space=latent_space)
        job = prepare_decode(codec, input, opts)
        count, latent_hw = frames or job.latents.frames, job.latent_hw
    else:  # exactly what encode prepares and plans, then the decode of its latents
        opts = EncodeOptions(selection=Selection(start, frames, stride), size=parse_size(size), fit=fit,
                             batch=batch, max_memory=limit, attention=attention, max_pixels=max_pixels)
        job = prepare_encode(codec, input, opts)
        enc = job.plan()
        result["encode"] = enc.to_dict()
        human += enc.describe()
        f = codec.spatial_factor
        count = codec.frame_rule.latent_frames(job.frames)
        latent_hw = (job.geometry.processed[1] // f, job.geometry.processed[0] // f)
        codec = for_stage(codec, dtype, "decode")  # the decode of those latents, as roundtrip runs it
    dec = decode_plan(codec, count, latent_hw, max_memory=limit, attention=attention, chunk=chunk,
                      overlap=overlap, tile=tile, scratch=check_scratch_dir(scratch) or Path(input).parent)
    result.update(frames=count, latent_size=list(latent_hw), **dec.to_dict())
    human = [f"input:  {input}  ({count} latent frames {latent_hw[0]}x{latent_hw[1]}, model {codec.name}, "
             f"{codec.family} family)", f"device: {codec.device}, {dec.dtype}"] + human + dec.describe()
    print_result(result, as_json, human)
