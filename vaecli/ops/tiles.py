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
