"""Atomic file output: write beside the target under a temporary name, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from vaecli.errors import OutputError


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an existing output without `overwrite`, and a missing parent directory."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"directory {path.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any failure delete it.

    The caller may create a file or a folder at the temporary path.

    A crash or Ctrl-C inside the block never leaves a partial file at `path` (nor the temporary one).
    """
    path = Path(path)
    check_writable(path, overwrite)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputError(f"{path} appeared while writing; pass --overwrite to replace it")
        if tmp.is_file():  # some writers (safetensors) create files readable by the owner only
            os.chmod(tmp, 0o666 & ~_umask())
        if tmp.is_dir() and path.exists():  # a folder output (diffusers layout) replaces the old folder
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
