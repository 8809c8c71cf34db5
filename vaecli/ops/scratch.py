"""Scratch files on disk for frames that do not fit in memory (the streaming executor's disk tier).

A `Scratch` is a private folder (mode 0700, created O_EXCL under a name `vaecli.ops.files.clean_stale` recognises,
so a killed run's folder is removed by the next run in the same place) holding one file per frame. A
`DiskFrame` is one frame `(1, C, H, W)`, stored channels-last (rows of W·C values, so a band of whole rows is one
contiguous read), its space reserved when it is made (a full disk fails there, not half-way through a write) and
its file removed when the last reference to it goes. Files are read and written with pread/pwrite, not mapped:
the data lives in the page cache, which the kernel can drop, never in the process's resident set.

`CountedScratch` is the same interface for counting execution (`vaecli.ops.counting`): no file, the frame's bytes
on the ledger's "disk" account, reads answered with data-free tensors.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
from pathlib import Path

import torch

from vaecli.errors import OutputError
from vaecli.ops.files import clean_stale, make_temp

NAME = "vaecli-scratch"  # the folder's stem: `.vaecli-scratch.vaecli-<pid>-<random>.scratch`


def _span(s: slice, length: int) -> tuple[int, int]:
    start, stop, step = s.indices(length)
    if step != 1:
        raise ValueError("scratch frames are read in contiguous spans")
    return start, max(start, stop)


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the filesystem of `folder` (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


class Scratch:
    """A private folder of frame files under `parent`; `close()` (or leaving the `with`) removes it."""

    def __init__(self, parent: str | os.PathLike):
        self.parent = Path(parent)
        clean_stale(self.parent / NAME)  # folders of runs that were killed
        self.folder = make_temp(self.parent / NAME, suffix=".scratch", folder=True)
        os.chmod(self.folder, 0o700)
        self._names = itertools.count()
        self.live = self.peak = 0

    def frame(self, shape: tuple[int, int, int], dtype: torch.dtype) -> "DiskFrame":
        return DiskFrame(self, shape, dtype)

    def error(self, e: OSError) -> OutputError:
        if e.errno == errno.ENOSPC:
            return OutputError(f"scratch folder {self.parent}: write failed (No space left on device); free "
                               f"space there or give --scratch DIR on a larger disk")
        return OutputError(f"scratch folder {self.parent}: {e.strerror or e}")

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DiskFrame:
    """One frame (1, C, H, W) in a file of its scratch folder, stored (H, W, C)."""

    def __init__(self, scratch: Scratch, shape: tuple[int, int, int], dtype: torch.dtype):
        self.scratch, self.shape, self.dtype = scratch, (1, *shape), dtype
        c, h, w = shape
        self.row_bytes = w * c * torch.empty((), dtype=dtype).element_size()
        self.nbytes = h * self.row_bytes
        self.path = scratch.folder / f"{next(scratch._names)}.frame"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise scratch.error(e) from None
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(1, self.nbytes))
            else:
                os.ftruncate(fd, self.nbytes)
        except OSError as e:
            os.close(fd)
            self._remove()
            raise scratch.error(e) from None
        os.close(fd)
        scratch.live += self.nbytes
        scratch.peak = max(scratch.peak, scratch.live)

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def __del__(self) -> None:
        self._remove()
        self.scratch.live -= self.nbytes

    def _io(self, rows: slice, cols: slice, buffer: torch.Tensor, write: bool) -> None:
        """Transfer region rows × cols between the file and `buffer` ((h, w, C) contiguous, uint8-viewable):
        whole rows in one call, narrower regions row by row."""
        _, c, height, width = self.shape
        (y0, y1), (x0, x1) = _span(rows, height), _span(cols, width)
        data = buffer.view(torch.uint8).numpy().reshape(y1 - y0, -1)
        element = self.row_bytes // width
        flags = os.O_WRONLY if write else os.O_RDONLY
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            raise self.scratch.error(e) from None
        try:
            if x0 == 0 and x1 == width:
                self._transfer(fd, memoryview(data).cast("B"), y0 * self.row_bytes, write)
            else:
                for r in range(y1 - y0):
                    self._transfer(fd, memoryview(data[r]).cast("B"), (y0 + r) * self.row_bytes + x0 * element, write)
        except OSError as e:
            raise self.scratch.error(e) from None
        finally:
            os.close(fd)

    @staticmethod
    def _transfer(fd: int, view: memoryview, offset: int, write: bool) -> None:
        done = 0
        while done < len(view):
            n = (os.pwrite(fd, view[done:], offset + done) if write
                 else os.preadv(fd, [view[done:]], offset + done))
            if n <= 0:
                raise OSError(errno.EIO, "short read or write in a scratch file")
            done += n

    def read(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """Region rows × cols as a (1, C, h, w) channels-last tensor in host memory."""
        _, c, height, width = self.shape
        (y0, y1), (x0, x1) = _span(rows, height), _span(cols, width)
        out = torch.empty((y1 - y0, x1 - x0, c), dtype=self.dtype)
        if out.numel():
            self._io(rows, cols, out, write=False)
        return out.permute(2, 0, 1)[None]

    def write(self, block: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None)) -> None:
        """Write `block` (1, C, h, w) (any device and layout) into region rows × cols."""
        data = block[0].permute(1, 2, 0).to("cpu", self.dtype).contiguous()
        if data.numel():
            self._io(rows, cols, data, write=True)


class CountedScratch:
    """`Scratch` for counting execution: frames are ledger entries on the "disk" account; reads are data-free
    tensors in host memory (counted where the ledger counts host tensors), writes cost nothing."""

    def __init__(self, ledger, device: str = "cpu"):
        """ledger: None for a meta-device trace (reads are then meta tensors on `device` "meta")."""
        self.ledger, self.device = ledger, device

    def frame(self, shape: tuple[int, int, int], dtype: torch.dtype) -> "CountedFrame":
        return CountedFrame(self, shape, dtype)


class CountedFrame:
    def __init__(self, scratch: CountedScratch, shape: tuple[int, int, int], dtype: torch.dtype):
        from vaecli.ops.counting import Storage
        from vaecli.ops.shapes import element_size

        c, h, w = shape
        self.shape, self.dtype, self.device = (1, *shape), dtype, scratch.device
        self.storage = Storage(scratch.ledger, "disk", c * h * w * element_size(dtype))

    def read(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        _, c, height, width = self.shape
        (y0, y1), (x0, x1) = _span(rows, height), _span(cols, width)
        return torch.empty((y1 - y0, x1 - x0, c), dtype=self.dtype, device=self.device).permute(2, 0, 1)[None]

    def write(self, block: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None)) -> None:
        return None
