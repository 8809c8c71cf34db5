"""The `vaecli` command line (Typer).

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

from vaecli._version import __version__
from vaecli.errors import UsageError, VaecliError

app = typer.Typer(
    name="vaecli",
    help="Encode videos into latents and decode latents into videos with the SVD temporal VAE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", help="Named config (svd-vae, sd-vae, sdxl-vae) or TOML file for what shapes cannot tell.")]


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
            typer.echo(f"error: {e}", err=True)
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
    else:
        typer.echo("\n".join(human))


@app.command()
@handle_errors
def info(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A checkpoint: safetensors file or diffusers folder.")],
    config: ConfigOpt = None,
    device: Annotated[str, typer.Option(help="Device to resolve the attention backend for: auto, cpu, cuda[:i].")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    attention: Annotated[str, typer.Option(help="auto, math, sdpa, split, sub-quadratic or xformers.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Show a checkpoint's layout, configuration, parameter count and dtypes, and the attention backend."""
    from vaecli.model.checkpoint import describe_checkpoint
    from vaecli.ops.attention import resolve_attention
    from vaecli.ops.device import dtype_name, parse_device, parse_dtype

    dev, dt = parse_device(device), parse_dtype(dtype)
    backend = resolve_attention(attention, dev, dt)
    result = describe_checkpoint(path, config)
    result.update(device=str(dev), dtype=dtype_name(dt), attention=backend.name, attention_reason=backend.reason)
    cfg = result["config"]
    human = [
        f"file:        {result['path']}",
        f"layout:      {result['layout_detail']}",
        f"config:      {cfg['name']}  (time_mode {cfg['time_mode']}, ch {cfg['ch']}, ch_mult {cfg['ch_mult']}, "
        f"{cfg['num_res_blocks']} res blocks, attention levels {cfg['attn_levels'] or 'mid only'})",
        f"latents:     {result['latent_channels']} channels, 1/{2 ** (len(cfg['ch_mult']) - 1)} size, "
        f"scaling factor {result['scaling_factor']}",
        f"temporal:    kernel {cfg['video_kernel_size']}, merge {cfg['merge_strategy']}" if cfg["time_mode"] != "image"
        else "temporal:    none (frames coded independently)",
        f"quant convs: quant_conv {'yes' if cfg['quant_conv'] else 'no'}, "
        f"post_quant_conv {'yes' if cfg['post_quant_conv'] else 'no'}",
        f"parameters:  {result['parameters']:,} in {result['tensors']} tensors ({', '.join(result['dtypes'])})",
        f"attention:   {backend.describe()} [{dev}, {dtype_name(dt)}]",
    ]
    _print_result(result, as_json, human)


@app.command()
@handle_errors
def convert(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Any supported checkpoint (full SVD file, ComfyUI, diffusers).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .safetensors file (or folder for diffusers).")],
    to: Annotated[str, typer.Option("--to", help="Target layout: sgm (ComfyUI/standalone) or diffusers.")] = "sgm",
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as fp32, fp16 or bf16 (default: as read).")] = None,
    config: ConfigOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a VAE between layouts; extracts the VAE from a full SVD checkpoint."""
    from vaecli.model.checkpoint import convert_checkpoint

    if to not in ("sgm", "diffusers"):
        raise UsageError(f"--to must be sgm or diffusers, not {to!r}")
    written = convert_checkpoint(checkpoint, out, to=to, dtype=dtype, overwrite=overwrite, config=config)
    _print_result({"input": str(checkpoint), "output": str(written), "layout": to, "dtype": dtype},
                  as_json, [str(written)])


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
