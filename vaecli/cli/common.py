"""The `vaecli` command line (Typer): the app, its shared options and helpers; commands live in `describe` (info,
convert, plan) and `jobs` (encode, decode, roundtrip, demo).

Results go to stdout (`--json` for scripts), messages to stderr. Every `VaecliError` becomes one line
`error: ...` and exit code 1 (2 for usage errors); `--debug` (or VAECLI_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from vaecli._version import __version__
from vaecli.errors import InputError, UsageError, VaecliError, printable
from vaecli.ops.validate import path_text
from vaecli.pipeline.batch import Interrupted, load_model

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
    help="Encode videos into latents and decode latents into videos with video VAEs (SVD, Wan 2.1/2.2), exactly "
         "and in bounded memory.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    rich_markup_mode=None,  # Click's plain help: flags without a `<bool>` type column
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print results as JSON on stdout: one object per line, one per input of a batch.")]
ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", help="Named config (svd-vae, sd-vae, sdxl-vae) or TOML file for what shapes cannot tell.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Checkpoint file, diffusers folder, Hugging Face repo ORG/REPO or vaecli-small "
                          "(default: the bundled model, vaecli-small).")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    help="Branch, tag or commit of a Hugging Face --model (default: main).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (CUDA: bf16; CPU: fp32 to encode, bf16 to decode where the CPU has "
                                             "native bf16, else fp32), fp32, fp16 or bf16 (both stages).")]
AttentionOpt = Annotated[str, typer.Option(help="auto, math, sdpa, split, sub-quadratic or xformers.")]
OutOpt = Annotated[Optional[str], typer.Option("-o", "--out", help="Output file (one input only).")]
OutDirOpt = Annotated[Optional[str], typer.Option("--out-dir", help="Folder for the outputs of many inputs.")]
ManifestOpt = Annotated[Optional[str], typer.Option(help="A file listing inputs, one path per line.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
SkipOpt = Annotated[bool, typer.Option("--skip-existing", help="Skip inputs whose output exists (resume a batch).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary on stderr.")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    help="Memory ceiling, weights included (512MiB, 8GiB); default: what is free on CUDA; on CPU 4GiB where an "
         "exact plan fits in it, else up to 40% of the available memory.")]
ReadSpaceOpt = Annotated[Optional[str], typer.Option(
    "--latent-space", help="For files that do not say: their latents are normalized or raw.")]
MAX_COUNT = 10_000_000  # frames, strides, windows: the largest count an option takes (checked by Typer)
ChunkOpt = Annotated[Optional[int], typer.Option(
    min=0, max=MAX_COUNT, help="Force approximate windows of N frames (0 = one clip; default: an exact plan).")]
OverlapOpt = Annotated[Optional[int], typer.Option(
    min=0, max=MAX_COUNT, help="Frames shared by forced windows, cross-faded (0 = hard cuts as sgm's decoding_t).")]
TileOpt = Annotated[Optional[int], typer.Option(
    min=1, max=65536, help="Force exact streaming in square tiles of N latent pixels (default: planned).")]
FramesOpt = Annotated[Optional[int], typer.Option(
    "--frames", min=1, max=MAX_COUNT, help="How many frames to take (default: all).")]
StartOpt = Annotated[int, typer.Option(min=0, max=MAX_COUNT, help="First source frame to take.")]
StrideOpt = Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Take every K-th frame.")]
BatchOpt = Annotated[Optional[int], typer.Option(
    min=1, max=1024, help="Frames per encoder call, 1-1024 (default: planned).")]
ScratchOpt = Annotated[Optional[str], typer.Option(
    "--scratch", help="Folder for scratch files when a clip's activation fits nowhere in memory "
                                       "(default: beside the output).")]
MaxPixelsOpt = Annotated[int, typer.Option(
    min=1, max=1 << 36, show_default=False,
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
        except Interrupted:  # the batch said what it did
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; nothing partial was left behind", err=True)
            raise typer.Exit(130) from None
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


def print_result(result: dict, as_json: bool, human: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:  # names and values read from files may hold control characters: escaped
        typer.echo("\n".join(printable(line) for line in human))


def model_path(spec: str | Path, revision: str | None = None) -> Path:
    """A model argument -> a local checkpoint: a path as given, the bundled model's name (`vaecli-small`), or a
    Hugging Face repository `ORG/REPO` (from the cache, or downloaded when online; see `vaecli.model.hub`)."""
    from vaecli.model.hub import resolve_model

    return resolve_model(path_text(str(spec), "model"), revision)


def file_kind(path: Path) -> str:
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


def plan_model(source: str | None, config: str | None, device: str, dtype: str, attention: str,
               stage: str = "decode"):
    """The model `plan` prices for `stage`: loaded as encode and decode load it (so the plan is theirs), or with
    --config and no --model, built from the named config on the meta device (no weights; plans only)."""
    if source is not None or config is None:
        return load_model(source, config, device, dtype, attention, stage=stage)
    from vaecli.model.family import load_config
    from vaecli.ops.device import choose_dtype, parse_device

    family, cfg = load_config(config)
    dev = parse_device(device)
    chosen, why = choose_dtype(dtype, dev, stage)
    codec = family.build(None, device=dev, dtype=chosen, attention=attention, config=cfg)
    codec.dtype_reason = why
    return codec


def model_source(model: str | None, revision: str | None) -> str | None:
    """--model/--revision -> a local checkpoint path, or None for the bundled model (resolved once, before any
    input is read: a bad --model fails the command, not each input)."""
    if model is None:
        if revision is not None:
            raise UsageError("--revision applies to a Hugging Face --model ORG/REPO")
        return None
    return str(model_path(model, revision))


def check_batch_flags(skip_existing: bool, overwrite: bool) -> None:
    if skip_existing and overwrite:
        raise UsageError("--skip-existing and --overwrite contradict each other; pass one of them")


def given_path(text: str | None, option: str) -> Path | None:
    """A path option as given: None when absent; an empty one is refused (Path("") would be the working folder)."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError(f"{option} is empty; name a file or folder")
    return Path(text)


def check_scratch_dir(text: str | None) -> Path | None:
    """--scratch: an existing folder this process can write to."""
    import os

    folder = given_path(text, "--scratch")
    if folder is None:
        return None
    if not folder.is_dir():
        raise UsageError(f"--scratch {printable(folder)}: not a folder; create it or choose another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--scratch {printable(folder)}: cannot write there; choose another folder")
    return folder


def check_windows(chunk: int | None, overlap: int | None, tile: int | None) -> None:
    if chunk is not None and chunk < 0:
        raise UsageError("--chunk must be 0 (one clip) or more")
    if overlap is not None and (overlap < 0 or (chunk and overlap >= chunk)):
        raise UsageError(f"--overlap must be at least 0 and smaller than --chunk, not {overlap}")
    if tile is not None and tile < 4:
        raise UsageError("--tile must be at least 4 latent pixels")


def check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise UsageError(f"{option} takes {' or '.join(choices)}, not {value!r}")
