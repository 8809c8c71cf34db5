"""Cutting a length into pieces: the tile geometry every family's exact tiles share."""

from __future__ import annotations


def spans(length: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) pieces of `size` covering [0, length) without overlap (the whole length when size is None)."""
    if size is None or size >= length:
        return [(0, length)]
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def grown(start: int, end: int, halo: int, length: int) -> tuple[int, int]:
    """[start - halo, end + halo) clipped to [0, length)."""
    return max(0, start - halo), min(length, end + halo)


def region(y0: int, y1: int, x0: int, x1: int, halo: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The input rows and columns (y0, y1, x0, x1) for output [y0, y1) × [x0, x1) of a stride-1 stage, grown by
    `halo` pixels and clipped to the height × width frame."""
    ry0, ry1 = grown(y0, y1, halo, height)
    rx0, rx1 = grown(x0, x1, halo, width)
    return ry0, ry1, rx0, rx1
