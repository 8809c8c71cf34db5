"""The `vaecli` command line (Typer).

Results go to stdout (`--json` for scripts), messages to stderr. Every `VaecliError` becomes one line
`error: ...` and exit code 1 (2 for usage errors); `--debug` (or VAECLI_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from vaecli._version import __version__
from vaecli.errors import InputError, OutputError, UsageError, VaecliError, printable
from vaecli.ops.validate import DEFAULT_MAX_PIXELS, path_text
from vaecli.pipeline.progress import Progress

from typer._click.exceptions import ClickException, NoArgsIsHelpError  # Typer vendors Click (pinned in pyproject)

class Group(TyperGroup):
    """The root command group: Click/Typer usage errors (unknown options, values of the wrong type) are printed as
    the one-line `error: ...` every other error uses, with exit code 2 (`--help` is unchanged)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args[1:] and "--" not in args[: args.index("--debug")]:  # `vaecli decode x --debug` too
            args = ["--debug"] + [a for a in args if a != "--debug"]
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as e:  # `vaecli` alone: the help (Typer's rich help prints itself)
            text = e.ctx.get_help()
            if text:
                typer.echo(text)
            sys.exit(2)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = " ".join(e.format_message().split())
            typer.echo(f"error: {printable(message[:1].lower() + message[1:])}{where}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="vaecli",
    cls=Group,
    help="Encode videos into latents and decode latents into videos with the SVD temporal VAE.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    rich_markup_mode=None,  # Click's plain help: flags without a `<bool>` type column
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", help="Named config (svd-vae, sd-vae, sdxl-vae) or TOML file for what shapes cannot tell.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Checkpoint file, diffusers folder, Hugging Face repo ORG/REPO or vaecli-small "
                          "(default: the bundled model, vaecli-small).")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    help="Branch, tag or commit of a Hugging Face --model (default: main).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on CUDA), fp32, fp16 or bf16.")]
AttentionOpt = Annotated[str, typer.Option(help="auto, math, sdpa, split, sub-quadratic or xformers.")]
OutOpt = Annotated[Optional[str], typer.Option("-o", "--out", help="Output file (one input only).")]
OutDirOpt = Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for the outputs of many inputs.")]
ManifestOpt = Annotated[Optional[Path], typer.Option(help="A file listing inputs, one path per line.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
SkipOpt = Annotated[bool, typer.Option("--skip-existing", help="Skip inputs whose output exists (resume a batch).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary on stderr.")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    help="Memory ceiling, weights included (512MiB, 8GiB); default: what is free on CUDA, 40% of the "
         "available memory on CPU.")]
ChunkOpt = Annotated[Optional[int], typer.Option(
    help="Force approximate windows of N frames (0 = one clip; default: an exact plan).")]
OverlapOpt = Annotated[Optional[int], typer.Option(
    help="Frames shared by forced windows, cross-faded (0 = hard cuts as sgm's decoding_t).")]
TileOpt = Annotated[Optional[int], typer.Option(
    help="Force exact streaming in square tiles of N latent pixels (default: planned).")]
MaxPixelsOpt = Annotated[int, typer.Option(
    min=1, show_default=False,
    help="Refuse frames of more pixels than this (decompression bombs); default 8192x8192.")]


def _debug(ctx: typer.Context | None) -> bool:
    flag = bool(ctx is not None and ctx.find_root().params.get("debug"))
    return flag or os.environ.get("VAECLI_DEBUG", "") not in ("", "0")


def handle_errors(command):
    """Turn VaecliErrors into one-line messages and exit codes; keep tracebacks for --debug.

    The wrapped command takes `ctx: typer.Context` so that the root's --debug flag can be read.
    """

    @functools.wraps(command)
    def wrapper(ctx: typer.Context, *args, **kwargs):
        try:
            return command(ctx, *args, **kwargs)
        except VaecliError as e:
            if _debug(ctx):
                traceback.print_exc()
            typer.echo(f"error: {printable(e)}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vaecli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """vaecli: SVD temporal VAE encode/decode."""


def _print_result(result: dict, as_json: bool, human: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:  # names and values read from files may hold control characters: escaped
        typer.echo("\n".join(printable(line) for line in human))


@app.command()
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
    path = Path(spec) if any(ch in spec for ch in "*?[") else _model_path(spec, revision)  # globs: image frames
    kind = _file_kind(path)
    if kind == "latents":
        from vaecli.pipeline.latents_io import describe_latents

        result = describe_latents(path)
        meta = result["metadata"]
        human = [f"file:      {result['path']}", f"latents:   {result['tensor']} {result['shape']} {result['dtype']}"
                 f" ({'scaled by the model' if result['scaled'] else 'raw, ComfyUI'})"]
        human += [f"{printable(k) + ':':<17}{printable(v)}" for k, v in sorted(meta.items()) if k != "__metadata__"]
        if not result["vaecli_metadata"]:
            human.append("no vaecli metadata: decode it with --fps (and --model)")
        return _print_result(result, as_json, human)
    if kind == "video":
        from vaecli.pipeline.video_io import describe_video

        result = describe_video(path)
        human = [f"file:      {result['path']}", f"kind:      {result['kind']} ({result['codec']})",
                 f"frames:    {result['frames']}", f"fps:       {result['fps']} ({result['fps_float']})",
                 f"size:      {result['width']}x{result['height']}", f"duration:  {result['duration_s']} s"]
        return _print_result(result, as_json, human)
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
    _print_result(result, as_json, human)


def _model_path(spec: str | Path, revision: str | None = None) -> Path:
    """A model argument -> a local checkpoint: a path as given, the bundled model's name (`vaecli-small`), or a
    Hugging Face repository `ORG/REPO` (from the cache, or downloaded when online; see `vaecli.model.hub`)."""
    from vaecli.model.hub import resolve_model

    return resolve_model(path_text(str(spec), "model"), revision)


def _file_kind(path: Path) -> str:
    """"latents", "checkpoint" or "video" (videos, GIFs, images, image folders and globs)."""
    if not path.exists() and not any(ch in str(path) for ch in "*?["):
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        has_weights = any((path / sub / name).is_file() for sub in ("", "vae")
                          for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"))
        return "checkpoint" if has_weights else "video"
    if path.suffix in (".safetensors", ".latent"):
        from vaecli.model.checkpoint import read_header

        header, _ = read_header(path)
        return "latents" if "latents" in header or "latent_tensor" in header else "checkpoint"
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "checkpoint"
    return "video"


@app.command()
@handle_errors
def convert(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(
        help="Any supported checkpoint (full SVD file, ComfyUI, diffusers folder, ORG/REPO, vaecli-small).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .safetensors file (or folder for diffusers).")],
    to: Annotated[str, typer.Option("--to", help="Target layout: sgm (ComfyUI/standalone) or diffusers.")] = "sgm",
    revision: RevisionOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as fp32, fp16 or bf16 (default: as read).")] = None,
    config: ConfigOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a VAE between layouts; extracts the VAE from a full SVD checkpoint."""
    from vaecli.model.checkpoint import convert_checkpoint

    written = convert_checkpoint(_model_path(checkpoint, revision), out, to=to, dtype=dtype, overwrite=overwrite,
                                 config=config)
    _print_result({"input": str(checkpoint), "output": str(written), "layout": to, "dtype": dtype},
                  as_json, [str(written)])


# ------------------------------------------------------------------------------------------ encode / decode


def _load_model(model: str | None, config: str | None, device: str, dtype: str, attention: str,
                progress: Progress | None = None):
    """model: a local checkpoint (from `_model_path`) or None for the bundled model; progress: says so while
    it loads."""
    from vaecli.model.checkpoint import load_codec
    from vaecli.ops.device import parse_device, resolve_dtype

    if progress is not None:
        progress.stage(f"loading model {Path(model).name if model else 'vaecli-small'}")
    dev = parse_device(device)
    dt = resolve_dtype(dtype, dev)
    return load_codec(model, device=dev, dtype=dt, attention=attention, config=config)


def _plan_model(source: str | None, config: str | None, device: str, dtype: str, attention: str):
    """The model `plan` prices: loaded as encode and decode load it (so the plan is theirs), or with --config and
    no --model, built from the named config on the meta device (no weights; plans only)."""
    if source is not None or config is None:
        return _load_model(source, config, device, dtype, attention)
    from vaecli.model.family import load_config
    from vaecli.ops.device import parse_device, resolve_dtype

    family, cfg = load_config(config)
    dev = parse_device(device)
    return family.build(None, device=dev, dtype=resolve_dtype(dtype, dev), attention=attention, config=cfg)


def _model_source(model: str | None, revision: str | None) -> str | None:
    """--model/--revision -> a local checkpoint path, or None for the bundled model (resolved once, before any
    input is read: a bad --model fails the command, not each input)."""
    if model is None:
        if revision is not None:
            raise UsageError("--revision applies to a Hugging Face --model ORG/REPO")
        return None
    return str(_model_path(model, revision))


def _inputs(items: list[str] | None, manifest: Path | None) -> list[str]:
    found = list(items or [])
    if manifest is not None:
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read manifest {manifest}: {e.strerror}") from None
        for line in lines:  # paths relative to the manifest's folder; `#` starts a comment (after whitespace)
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            text = re.split(r"\s+#", text, maxsplit=1)[0].strip()
            found.append(text if os.path.isabs(text) else os.path.join(manifest.parent, text))
    if not found:
        raise UsageError("no inputs: give files on the command line or --manifest FILE")
    return [path_text(item, "input") for item in found]


def _batch(inputs: list[str], out: Path | str | None, out_dir: Path | None, default_name, worker: "_Worker", *,
           skip_existing: bool, as_json: bool, progress: Progress, verb: str) -> None:
    """Run `worker(input, output)` for every input: failures are reported and the rest go on.

    Exit code 1 if any input failed, 2 if any failed for a usage reason (e.g. latents without fps and no --fps).
    With --out-dir, every finished input is added to the batch record (`vaecli.pipeline.record`). Under torchrun
    (`worker.workers`), inputs are claimed dynamically by the workers and rank 0 prints the summary.

    `out` is passed to `work` as given (a str keeps the trailing "/" that asks decode for a PNG folder).
    """
    import time

    from vaecli.pipeline.distributed import by_size
    from vaecli.pipeline.record import RECORD_NAME, BatchRecord

    if out is not None and len(inputs) > 1:
        raise UsageError(f"-o takes one input, {len(inputs)} were given; use --out-dir")
    for where in (out, out_dir):
        if where is not None:
            path_text(where, "output")
    if out_dir is not None and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is not a folder; create it first")

    def target_of(item: str):
        target = out if out is not None else (out_dir or Path(item).parent) / default_name(Path(item))
        if isinstance(target, Path) and default_name(Path(item)).endswith("/"):
            target = f"{target}/"
        return target

    targets = {}
    for item in inputs:  # two inputs with the same name would share one output: refused before any work
        key = os.path.abspath(str(target_of(item)))
        if key in targets and targets[key] != item:
            raise UsageError(f"{printable(targets[key])} and {printable(item)} would both write "
                             f"{printable(target_of(item))}; give them different --out-dir folders or names")
        targets[key] = item
    workers = worker.workers
    record = BatchRecord(out_dir / RECORD_NAME) if out_dir is not None else None
    started = time.perf_counter()
    stats = {"rank": workers.rank if workers else 0, "done": 0, "skipped": 0, "failed": 0, "frames": 0,
             "usage_failed": False}
    order = by_size(inputs) if workers else inputs
    progress.start_files(len(inputs), verb)
    try:
        for index in (workers.claims(len(order)) if workers else range(len(order))):
            item = order[index]
            target = target_of(item)
            try:
                why = _skip(worker, record, target, skip_existing)
                if why is not None:
                    result, outcome = {"input": item, "output": str(target), "skipped": True, "reason": why}, "skipped"
                else:
                    result, outcome = worker(item, target), "done"
                    stats["frames"] += int(result.get("frames", 0))
            except VaecliError as e:
                stats["usage_failed"] = stats["usage_failed"] or e.exit_code == 2
                result, outcome = {"input": item, "output": str(target), "error": str(e)}, "failed"
                text = str(e) if printable(item) in str(e) else f"{item}: {e}"
                progress.error(f"error: {printable(text)}")
            stats[outcome] += 1
            if workers is not None:
                result["rank"] = workers.rank
            if record is not None and outcome != "skipped":
                record.append(_record_entry(worker, result, outcome))
            progress.file_finished(outcome)
            if as_json:
                progress.result(json.dumps(result, sort_keys=True))
            elif outcome != "failed":
                progress.result(printable(result["output"]))
    finally:
        progress.close()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    ranks = workers.gather(stats) if workers else [stats]
    if ranks is None:  # under torchrun, not rank 0: rank 0 reports for everyone
        return
    total = {k: sum(r[k] for r in ranks) for k in ("done", "skipped", "failed", "frames")}
    seconds = time.perf_counter() - started
    if workers is not None:
        summary = {**total, "seconds": round(seconds, 3), "frames_per_second": round(total["frames"] / seconds, 3),
                   "workers": len(ranks), "ranks": ranks}
        if as_json:
            progress.result(json.dumps({"summary": summary}, sort_keys=True))
        if progress.notes:
            typer.echo(f"{verb}: {total['done']} done, {total['skipped']} skipped, {total['failed']} failed in "
                       f"{seconds:.1f} s on {len(ranks)} workers ({summary['frames_per_second']:.1f} frames/s); "
                       "per rank: " + ", ".join(f"{r['rank']}: {r['done']} done/{r['frames']} frames" for r in ranks),
                       err=True)
    elif progress.notes and len(inputs) > 1:  # the summary: on stderr unless --quiet, terminal or not
        typer.echo(f"{verb}: {total['done']} done, {total['skipped']} skipped, {total['failed']} failed in "
                   f"{seconds:.1f} s", err=True)
    if total["failed"]:
        raise typer.Exit(2 if any(r["usage_failed"] for r in ranks) else 1)


def _batch_progress(quiet: bool) -> Progress:
    """Bars on a terminal, except under torchrun: its workers share one terminal (notes and errors stay)."""
    from vaecli.pipeline.distributed import under_torchrun

    if under_torchrun():
        return Progress(bars=False, notes=not quiet)
    return Progress.terminal(quiet)


def _skip(worker: "_Worker", record, target, skip_existing: bool) -> str | None:
    """Why `target` needs no work (None: do it). Raises when an existing output was made with another model or
    dtype and --skip-existing would otherwise keep it."""
    from vaecli.pipeline.record import stale_reason

    if not Path(target).exists():
        return None
    entry = record.last(target) if record is not None else None
    workers = worker.workers
    if (workers is not None and workers.attempt > 0 and entry is not None and entry.get("status") == "done"
            and entry.get("run_id") == workers.run_id):
        return "done by an earlier attempt of this run"
    if not skip_existing:
        return None
    model = worker.model()
    metadata = None
    if (entry is None or entry.get("status") != "done") and str(target).endswith(".safetensors"):
        from vaecli.ops.validate import safetensors_header

        try:
            metadata = safetensors_header(Path(target))[1]
        except InputError:
            metadata = None
    stale = stale_reason(entry, model.hash, _dtype_name(model.dtype), metadata)
    if stale is not None:
        raise OutputError(f"{printable(target)} exists, but {stale}; pass --overwrite to redo it")
    return "exists"


def _record_entry(worker: "_Worker", result: dict, outcome: str) -> dict:
    entry = {"input": result["input"], "output": result["output"], "status": outcome,
             "run_id": worker.workers.run_id if worker.workers else None,
             "rank": worker.workers.rank if worker.workers else 0}
    if outcome == "failed":
        return {**entry, "error": result.get("error")}
    return {**entry, "model": result.get("model"), "model_hash": result.get("model_hash"), "dtype": result.get("dtype"),
            "plan": result.get("plan"), "frames": result.get("frames"), "seconds": result.get("seconds")}


def _latents_name(path: Path) -> str:
    stem = path.name.rstrip("/*?") or "frames"
    stem = Path(stem).stem if "*" not in str(path) else path.parent.name
    return f"{stem}.latents.safetensors"


def _decoded_name(fmt: str | None):
    def name(path: Path) -> str:
        stem = path.name
        for suffix in (".latents.safetensors", ".safetensors", ".latent"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return f"{stem}.decoded/" if fmt == "png" else f"{stem}.decoded.{fmt or 'mp4'}"

    return name


@app.command()
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
    start: Annotated[int, typer.Option(help="First source frame to take.")] = 0,
    frames: Annotated[Optional[int], typer.Option("--frames", help="How many frames to take (default: all).")] = None,
    stride: Annotated[int, typer.Option(help="Take every K-th frame.")] = 1,
    size: Annotated[Optional[str], typer.Option(help="Resize frames to WxH first.")] = None,
    fit: Annotated[str, typer.Option(help="Sizes not multiple of 8: pad (reflect), crop or resize.")] = "pad",
    sample: Annotated[bool, typer.Option("--sample",
                                         help="Sample the posterior instead of taking its mode.")] = False,
    seed: Annotated[Optional[int], typer.Option(
        min=0, help="Seed for --sample (per frame, independent of batching; default 0).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Frames per encoder call (default: planned).")] = None,
    max_memory: MaxMemoryOpt = None,
    save_moments: Annotated[bool, typer.Option("--save-moments",
                                               help="Also store the posterior mean and logvar.")] = False,
    export: Annotated[Optional[str], typer.Option(help="Also write another format: comfy (.latent).")] = None,
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
    from vaecli.pipeline.runner import EncodeOptions, encode_file
    from vaecli.pipeline.video_io import Selection

    if seed is not None and not sample:
        raise UsageError("--seed only applies with --sample (the posterior mode needs no noise)")
    _check_batch_flags(skip_existing, overwrite)
    if export not in (None, "comfy"):
        raise UsageError(f"--export takes comfy, not {export!r}")
    if batch is not None and batch < 1:
        raise UsageError("--batch must be at least 1")
    opts = EncodeOptions(selection=Selection(start, frames, stride), size=parse_size(size), fit=fit, sample=sample,
                         seed=seed or 0, batch=batch, max_memory=parse_bytes(max_memory), attention=attention,
                         save_moments=save_moments, export_comfy=export == "comfy",
                         latent_dtype=parse_dtype(latent_dtype), overwrite=overwrite, max_pixels=max_pixels)
    if fit not in ("pad", "crop", "resize"):
        raise UsageError(f"--fit must be pad, crop or resize, not {fit!r}")
    progress = _batch_progress(quiet)
    work = _Worker(_model_source(model, revision), config, device, dtype, attention, progress,
                   lambda m, item, target, guard: encode_file(m, item, target, opts, progress, guard=guard))
    _batch(_inputs(inputs, manifest), out, out_dir, _latents_name, work, skip_existing=skip_existing,
           as_json=as_json, progress=progress, verb="encode")


def _check_batch_flags(skip_existing: bool, overwrite: bool) -> None:
    if skip_existing and overwrite:
        raise UsageError("--skip-existing and --overwrite contradict each other; pass one of them")


def _check_windows(chunk: int | None, overlap: int | None, tile: int | None) -> None:
    if chunk is not None and chunk < 0:
        raise UsageError("--chunk must be 0 (one clip) or more")
    if overlap is not None and (overlap < 0 or (chunk and overlap >= chunk)):
        raise UsageError(f"--overlap must be at least 0 and smaller than --chunk, not {overlap}")
    if tile is not None and tile < 4:
        raise UsageError("--tile must be at least 4 latent pixels")


def _dtype_name(dtype) -> str:
    from vaecli.ops.device import dtype_name

    return dtype_name(dtype)


class _Worker:
    """The work of a batch: loads the model on first need (not at all if every input is skipped), runs
    `run(model, input, target, guard)` (one precision guard for the batch) and adds what ran (device, dtype, attention backend, model) to the result.

    Under torchrun (`workers`), each worker computes on its own GPU (`--device auto` -> cuda:LOCAL_RANK)."""

    def __init__(self, source: str | None, config: str | None, device: str, dtype: str, attention: str,
                 progress: Progress, run):
        from vaecli.pipeline.distributed import Workers

        self.workers = Workers.detect()
        self.source, self.config, self.dtype, self.attention = source, config, dtype, attention
        self.device = self.workers.device(device) if self.workers else device
        self.progress, self.run = progress, run
        self._model = None

    def model(self):
        if self._model is None:
            from vaecli.pipeline.precision import PrecisionGuard

            self._model = _load_model(self.source, self.config, self.device, self.dtype, self.attention,
                                      self.progress)
            self.guard = PrecisionGuard(self._model, self.progress)  # one per batch: its wider copies are kept
        return self._model

    def __call__(self, item: str, target) -> dict:
        m = self.model()
        result = self.run(m, item, target, self.guard)
        result.update(device=str(m.device), dtype=_dtype_name(m.dtype), model=m.name, model_hash=m.hash,
                      family=m.family)
        return result


@app.command()
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
    native_size: Annotated[bool, typer.Option(
        "--native-size", help="Keep the model's size; do not undo padding/cropping/resizing.")] = False,
    allow_model_mismatch: Annotated[bool, typer.Option(
        "--allow-model-mismatch", help="Decode with another model than the encoding one.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite",
        help="Decode latents holding NaN/inf anyway (refused by default: they decode to black).")] = False,
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
    from vaecli.pipeline.latents_io import parse_fps
    from vaecli.pipeline.planner import parse_bytes
    from vaecli.pipeline.runner import DecodeOptions, decode_file

    if fmt is not None and fmt not in ("mp4", "webm", "gif", "png"):
        raise UsageError(f"--format must be mp4, webm, gif or png, not {fmt!r}")
    _check_batch_flags(skip_existing, overwrite)
    _check_windows(chunk, overlap, tile)
    opts = DecodeOptions(fmt=fmt, crf=crf, fps=parse_fps(fps), chunk=chunk, overlap=overlap, tile=tile,
                         max_memory=parse_bytes(max_memory), attention=attention, native_size=native_size,
                         allow_model_mismatch=allow_model_mismatch, overwrite=overwrite,
                         allow_nonfinite=allow_nonfinite, max_pixels=max_pixels)
    # target stays a str when it ends in "/" (a PNG folder)
    progress = _batch_progress(quiet)
    work = _Worker(_model_source(model, revision), config, device, dtype, attention, progress,
                   lambda m, item, target, guard: decode_file(m, Path(item), target, opts, progress,
                                                                guard=guard))
    _batch(_inputs(inputs, manifest), out, out_dir, _decoded_name(fmt), work, skip_existing=skip_existing,
           as_json=as_json, progress=progress, verb="decode")


@app.command()
@handle_errors
def roundtrip(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(help="A video, GIF, image folder or glob.")],
    out: Annotated[str, typer.Option("-o", "--out", help="Reconstructed video (or folder/ for PNGs).")],
    report: Annotated[Optional[Path], typer.Option(help="Write the metrics as JSON here.")] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    start: Annotated[int, typer.Option(help="First source frame to take.")] = 0,
    frames: Annotated[Optional[int], typer.Option("--frames", help="How many frames to take.")] = None,
    stride: Annotated[int, typer.Option(help="Take every K-th frame.")] = 1,
    fit: Annotated[str, typer.Option(help="pad, crop or resize.")] = "pad",
    chunk: ChunkOpt = None,
    overlap: OverlapOpt = None,
    tile: TileOpt = None,
    max_memory: MaxMemoryOpt = None,
    clip_frames: Annotated[Optional[int], typer.Option(help="Report metrics per clip of N frames (default: all).")] = None,
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

    from vaecli.ops.files import Output, atomic_output, check_outputs, remove, write_error
    from vaecli.pipeline.planner import parse_bytes
    from vaecli.pipeline.metrics import RoundtripMeter
    from vaecli.pipeline.outputs import output_kind
    from vaecli.pipeline.runner import DecodeOptions, EncodeOptions, decode_file, encode_file
    from vaecli.pipeline.video_io import FrameSource, Selection

    _check_windows(chunk, overlap, tile)
    budget = parse_bytes(max_memory)
    video = output_kind(out, None)[1]
    if report is not None and not report.name.endswith(".json"):
        raise UsageError(f"{report}: the report is JSON; end its name in .json")
    check_outputs([video] + ([Output(report)] if report is not None else []), overwrite)  # all before any work
    progress = Progress.terminal(quiet)
    m = _load_model(_model_source(model, revision), config, device, dtype, attention, progress)
    selection = Selection(start, frames, stride)
    with tempfile.TemporaryDirectory(prefix="vaecli-roundtrip-") as tmp:
        latents = Path(tmp) / "roundtrip.latents.safetensors"
        enc = encode_file(m, input, latents, EncodeOptions(selection=selection, fit=fit, max_memory=budget,
                                                           attention=attention, max_pixels=max_pixels), progress)
        meter = RoundtripMeter(FrameSource(input, max_pixels).frames(selection), clip_frames)
        dec = decode_file(m, latents, out, DecodeOptions(chunk=chunk, overlap=overlap, tile=tile, crf=crf,
                                                         max_memory=budget, attention=attention, overwrite=overwrite,
                                                         max_pixels=max_pixels), progress, observer=meter)
    progress.close()
    result = {"input": input, "output": dec["output"], "model": m.name, "device": str(m.device),
              "dtype": _dtype_name(m.dtype), "encode_seconds": enc["seconds"], "decode_seconds": dec["seconds"],
              "plan": dec["plan"], **meter.summary()}
    if report is not None:
        try:
            with atomic_output(report, overwrite) as tmp_report:
                tmp_report.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except (OSError, VaecliError) as e:
            if video.kind != "frames":  # the outputs fail together
                remove(video.path)
            raise write_error(report, e) if isinstance(e, OSError) else e from None
    def line(name: str, c: dict) -> str:
        text = f"{name}: {c['frames']} frames  PSNR {c['psnr']:.2f} dB  SSIM {c['ssim']:.4f}"
        return text + (f"  flicker {c['flicker']:.2f}" if c.get("flicker") is not None else "")

    human = [line(f"clip {c['clip']}", c) for c in result["clips"]]
    human.append(line("all   ", result) + f"  -> {result['output']}")
    _print_result(result, as_json, human)


@app.command()
@handle_errors
def plan(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(help="A video (plans encode and decode) or a latent file (decode).")],
    frames: Annotated[Optional[int], typer.Option("--frames", min=1, max=10_000_000,
                                                  help="Plan for this many frames.")] = None,
    start: Annotated[int, typer.Option(min=0, help="First source frame to take (video input).")] = 0,
    stride: Annotated[int, typer.Option(min=1, help="Take every K-th frame (video input).")] = 1,
    max_memory: MaxMemoryOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: ConfigOpt = None,
    size: Annotated[Optional[str], typer.Option(help="Resize frames to WxH first (video input).")] = None,
    fit: Annotated[str, typer.Option(help="pad, crop or resize (video input).")] = "pad",
    chunk: ChunkOpt = None,
    overlap: OverlapOpt = None,
    tile: TileOpt = None,
    batch: Annotated[Optional[int], typer.Option(min=1, help="Force the encode batch size.")] = None,
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
    from vaecli.pipeline.frames import parse_size
    from vaecli.pipeline.planner import parse_bytes
    from vaecli.pipeline.runner import (DecodeOptions, EncodeOptions, decode_plan, prepare_decode,
                                        prepare_encode)
    from vaecli.pipeline.video_io import Selection

    _check_windows(chunk, overlap, tile)
    codec = _plan_model(_model_source(model, revision), config, device, dtype, attention)
    limit = parse_bytes(max_memory)
    result: dict = {"input": input, "model": codec.name, "family": codec.family}
    human = []
    if _file_kind(Path(input)) == "latents":  # exactly what decode prepares and plans
        opts = DecodeOptions(chunk=chunk, overlap=overlap, tile=tile, max_memory=limit, attention=attention,
                             allow_model_mismatch=True, max_pixels=max_pixels)
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
    dec = decode_plan(codec, count, latent_hw, max_memory=limit, attention=attention, chunk=chunk,
                      overlap=overlap, tile=tile)
    result.update(frames=count, latent_size=list(latent_hw), **dec.to_dict())
    human = [f"input:  {input}  ({count} latent frames {latent_hw[0]}x{latent_hw[1]}, model {codec.name}, "
             f"{codec.family} family)", f"device: {codec.device}, {dec.dtype}"] + human + dec.describe()
    _print_result(result, as_json, human)


@app.command()
@handle_errors
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder for the demo's files.")] = Path("vaecli-demo"),
    frames: Annotated[int, typer.Option("--frames", help="Frames of the sample clip.")] = 16,
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
    from vaecli.pipeline.runner import DecodeOptions, EncodeOptions, decode_file, encode_file
    from vaecli.pipeline.synthetic import synthetic_clip
    from vaecli.pipeline.video_io import FrameSource, VideoWriter

    width, height = parse_size(size)
    if frames < 2:
        raise UsageError("--frames must be at least 2")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = Progress.terminal(quiet)
    m = _load_model(_model_source(model, revision), None, device, dtype, "auto", progress)
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
    dec = decode_file(m, latents, decoded, DecodeOptions(overwrite=overwrite), progress, observer=meter)
    progress.close()
    metrics = meter.summary()
    pairs = zip(FrameSource(sample).frames(), FrameSource(decoded).frames())
    write_video(side, (np.concatenate([a, b], axis=1) for (_, a), (_, b) in pairs))
    result = {"model": m.name, "device": str(m.device), "dtype": _dtype_name(m.dtype), "frames": frames,
              "size": [width, height], "psnr": metrics["psnr"], "ssim": metrics["ssim"], "flicker": metrics["flicker"],
              "load_seconds": round(load_seconds, 3), "encode_seconds": enc["seconds"], "decode_seconds": dec["seconds"],
              "outputs": [str(p) for p in (sample, latents, decoded, side)], "decode_plan": dec["plan"]}
    human = [f"model:   {m.name} on {m.device} ({_dtype_name(m.dtype)}), loaded in {load_seconds:.2f} s",
             f"clip:    {frames} frames of {width}x{height} -> latents {enc['shape']}",
             f"quality: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, flicker {metrics['flicker']:.2f}",
             f"time:    encode {enc['seconds']:.2f} s, decode {dec['seconds']:.2f} s",
             *[f"wrote:   {p}" for p in result["outputs"]]]
    _print_result(result, as_json, human)


def main() -> None:
    """Console entry point.

    When the command has finished, the process exits without the interpreter's teardown: torch's finalizers (and
    those of torch._dynamo, which meta tracing imports) take 0.3-0.6 s on 2 cores, after every output is already
    written and closed. Streams are flushed first; nothing else is pending (worker threads are joined by then).
    """
    try:
        app(prog_name="vaecli")  # the same name (and completion variable) under `python -m vaecli`
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`vaecli ... | head`): the reader wanted no more
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
