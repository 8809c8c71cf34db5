"""Safe outputs: checked before any work, written under unique temporary names, renamed when complete.

Rules every command follows (`Output`, `check_outputs`, `atomic_outputs`):
- An output that exists is replaced only with `overwrite`, and only by something of its own kind: a file by a
  file, a folder by a folder whose entries this command would all have written (PNG frames of its pattern, the
  files of a diffusers folder). A folder holding anything else is refused, and `.`, `..`, `/`, the home folder
  and the working folder or any of its ancestors are never replaced.
- Temporaries are created with O_EXCL semantics in the target's folder (`tempfile.mkstemp` / `mkdtemp`) under
  names that carry the creating process id: `.NAME.vaecli-PID-RANDOM.partial` (also `.raw` side files and
  `.old` copies of replaced outputs). A planted symlink cannot redirect them, and links are never followed
  when renaming or removing.
- Temporaries of processes that no longer run (killed by SIGKILL, a power cut) are removed by the next command
  that writes the same output (`clean_stale`); another live process's are left alone.
- The outputs of one command succeed or fail together: all are renamed into place at the end, and if one rename
  fails the others are rolled back (replaced outputs restored).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vaecli.errors import OutputError

TAG = "vaecli"
_TEMP = re.compile(rf"^\.(?P<name>.+)\.{TAG}-(?P<pid>\d+)-[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?\.(?:partial|raw|old|scratch)$")


@dataclass(frozen=True)
class Output:
    """One output of a command.

    kind: "file", "folder" (a folder this command fills, e.g. PNG frames or a diffusers folder), or "frames"
    (files named after `pattern` written into an existing folder `path`);
    owns: for folders and frames, whether an entry name is one this command writes (what `--overwrite` may
    replace); pattern: for "frames", a printf pattern with one integer conversion (`img_%04d.png`).
    """

    path: Path
    kind: str = "file"
    owns: Callable[[str], bool] | None = None
    pattern: str | None = None

    @property
    def display(self) -> str:
        return str(self.path / self.pattern) if self.kind == "frames" else str(self.path)


def pattern_regex(pattern: str) -> re.Pattern:
    """A printf frame pattern (`frame_%05d.png`) -> a regex matching the names it produces."""
    match = re.fullmatch(r"(?P<pre>[^%]*)%(?P<width>0?\d*)d(?P<post>[^%]*)", pattern)
    if match is None:
        raise OutputError(f"{pattern}: a frame pattern needs exactly one %d (like frame_%05d.png) and no other %")
    if len(match["width"].lstrip("0")) > 2:  # "%999999999999d" would make names of a trillion characters
        raise OutputError(f"{pattern}: a frame pattern's width is at most 99 digits (like frame_%05d.png)")
    return re.compile(re.escape(match["pre"]) + r"\d+" + re.escape(match["post"]))


def protected(path: Path) -> str | None:
    """Why `path` may never be replaced or removed by an output, or None."""
    if path.name in ("", ".", ".."):
        return "names a folder by . or .."
    try:
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError):
        return "cannot be resolved"
    if resolved == Path(resolved.anchor):
        return "is the root folder"
    if resolved == Path.home().resolve():
        return "is the home folder"
    if resolved == cwd or resolved in cwd.parents:
        return "is the working folder or one of its ancestors"
    return None


def _kind_of(path: Path) -> str | None:
    """"file", "folder", "link", "other" (FIFO, device, socket) or None, without following links."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"{path}: cannot inspect ({e.strerror})") from None
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "other"


def check_outputs(outputs: list[Output], overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or must not be replaced (see the module rules)."""
    seen = set()
    for out in outputs:
        key = os.path.abspath(out.path / out.pattern if out.kind == "frames" else out.path)
        if key in seen:
            raise OutputError(f"{out.display} is named twice as an output")
        seen.add(key)
        _check(out, overwrite)


def _check(out: Output, overwrite: bool) -> None:
    path = out.path
    if out.kind == "frames":
        if _kind_of(path) != "folder":
            raise OutputError(f"folder {path} does not exist; create it first")
        regex = pattern_regex(out.pattern or "")
        existing = sorted(n for n in os.listdir(path) if regex.fullmatch(n))
        if existing and not overwrite:
            raise OutputError(f"{path / existing[0]} exists; pass --overwrite to replace the frames of {out.pattern}")
        clashes = [n for n in existing if _kind_of(path / n) != "file"]
        if clashes:
            raise OutputError(f"{path / clashes[0]} is not a regular file; vaecli will not replace it")
        return
    why = protected(path)
    if why:
        raise OutputError(f"{path} {why}; vaecli never writes or replaces it as an output")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"folder {parent} is not writable")
    found = _kind_of(path)
    if found is None or (out.kind == "folder" and found == "folder" and not os.listdir(path)):
        return  # nothing there, or an empty folder to fill: nothing is replaced
    if not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    if found == "other":
        raise OutputError(f"{path} is not a regular file or folder; vaecli will not replace it")
    if out.kind == "file" and found == "folder":
        raise OutputError(f"{path} is a folder; name a file as the output")
    if out.kind == "folder":
        if found != "folder":
            raise OutputError(f"{path} exists and is not a folder; remove it or choose another output")
        foreign = sorted(n for n in os.listdir(path) if out.owns is None or not out.owns(n)
                         or _kind_of(path / n) != "file")
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(f"{path} holds files vaecli did not write ({foreign[0]}{more}); --overwrite replaces "
                              "only a folder of its own outputs: remove them or choose another folder")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(path: Path) -> list[str]:
    """Remove temporaries left beside `path` (same output name) by processes of this user that no longer run.

    Returns the names removed. Links are removed as links; folders only when they are real folders.
    """
    folder = path.parent if str(path.parent) else Path(".")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for name in names:
        match = _TEMP.match(name)
        if match is None or match["name"] != path.name or pid_alive(int(match["pid"])):
            continue
        entry = folder / name
        try:
            info = os.lstat(entry)
            if uid is not None and info.st_uid != uid:
                continue
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
            removed.append(name)
        except OSError:
            continue
    return removed


def make_temp(path: Path, suffix: str = ".partial", folder: bool = False) -> Path:
    """Create (O_EXCL) an empty temporary file, or folder, beside `path`, named so that `clean_stale` recognises
    it, and return its path."""
    where, prefix = str(path.parent), f".{path.name}.{TAG}-{os.getpid()}-"
    try:
        if folder:
            return Path(tempfile.mkdtemp(suffix=suffix, prefix=prefix, dir=where))
        fd, name = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=where)
        os.close(fd)
        return Path(name)
    except OSError as e:
        raise OutputError(f"folder {where}: cannot write ({e.strerror})") from None


def remove(path: Path) -> None:
    """Remove a file, link or real folder (never following a link); missing is fine."""
    kind = _kind_of(path)
    if kind == "folder":
        shutil.rmtree(path, ignore_errors=True)
    elif kind is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_outputs(outputs: list[Output], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield one temporary per output (an empty file for "file", an empty folder for "folder" and "frames");
    when the block succeeds, move them all into place together, else remove them.

    The outputs are checked first (`check_outputs`) and again at the end (one that appeared meanwhile is not
    replaced without `overwrite`). A "frames" output moves each frame file into its folder, replacing the
    pattern's old frames (with `overwrite`) and removing old frames beyond the new count.
    """
    check_outputs(outputs, overwrite)
    for out in outputs:
        clean_stale(out.path / out.pattern if out.kind == "frames" else out.path)
    temps: list[Path] = []
    try:
        for out in outputs:
            if out.kind == "frames":
                temps.append(make_temp(out.path / (out.pattern or "frames"), folder=True))
            else:
                temps.append(make_temp(out.path, folder=out.kind == "folder"))
        yield temps
        check_outputs(outputs, overwrite)
        try:
            _commit(outputs, temps)
        except OSError as e:
            raise write_error(outputs[0].display, e) from None
    finally:
        for tmp in temps:
            remove(tmp)


def _commit(outputs: list[Output], temps: list[Path]) -> None:
    """Rename every temporary into place; on failure restore what was replaced and remove what was placed."""
    mask = _umask()
    moved_aside: list[tuple[Path, Path]] = []  # (old copy, original path)
    placed: list[Path] = []
    try:
        for out, tmp in zip(outputs, temps):
            _open_permissions(tmp, mask)
            if out.kind == "frames":
                placed += _commit_frames(out, tmp)
                continue
            if out.kind == "folder" and _kind_of(out.path) == "folder":
                aside = make_temp(out.path, ".old", folder=True)
                os.rename(out.path, aside)  # replaces the empty placeholder folder
                moved_aside.append((aside, out.path))
            os.replace(tmp, out.path)  # a link at out.path is replaced, never followed
            placed.append(out.path)
    except OSError:
        for path in placed:
            remove(path)
        for aside, original in moved_aside:
            with contextlib.suppress(OSError):
                os.rename(aside, original)
        raise
    for aside, _ in moved_aside:
        remove(aside)


def _commit_frames(out: Output, tmp: Path) -> list[Path]:
    regex = pattern_regex(out.pattern or "")
    new = sorted(os.listdir(tmp))
    old = [n for n in os.listdir(out.path) if regex.fullmatch(n) and n not in new]
    placed = []
    for name in new:
        os.replace(tmp / name, out.path / name)
        placed.append(out.path / name)
    for name in old:  # frames of an earlier, longer run of the same pattern
        if _kind_of(out.path / name) == "file":
            os.unlink(out.path / name)
    return placed


def _open_permissions(tmp: Path, mask: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get what the umask gives any new file (0644 / 0755 usually)."""
    kind = _kind_of(tmp)
    if kind == "folder":
        os.chmod(tmp, 0o777 & ~mask)
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, 0o666 & ~mask)
    elif kind == "file":
        os.chmod(tmp, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, kind: str = "file",
                  owns: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """`atomic_outputs` for one file or folder output: yields its temporary path."""
    with atomic_outputs([Output(Path(path), kind, owns)], overwrite) as temps:
        yield temps[0]


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: object, error: OSError) -> OutputError:
    """The one message for a failed write: `PATH: write failed (No space left on device)`."""
    reason = error.strerror or os.strerror(error.errno or errno.EIO)
    return OutputError(f"{path}: write failed ({reason})")
