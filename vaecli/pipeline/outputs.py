"""What a command writes, decided from `-o` before any work: decode's video, PNG folder or pattern; encode's latent file."""

from __future__ import annotations

import os
from pathlib import Path

from vaecli.errors import OutputError, UsageError
from vaecli.ops.files import Output, pattern_regex
from vaecli.pipeline.latents_io import comfy_path
from vaecli.pipeline.video_io import FORMATS

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
