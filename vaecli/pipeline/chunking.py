"""Temporal windows with cross-faded overlaps and spatial tiles with feathered blending (pure functions).

A decode plan splits the latent frames into windows of `chunk` frames that overlap by `overlap` frames; each
window is decoded as one clip, and where two windows overlap their decoded frames are cross-faded linearly, so
no output frame sees a hard cut. `overlap=0` gives sgm's `decoding_t` chunking exactly (independent clips, the
last one shorter). Frames too large even for small windows are decoded in spatial tiles that keep all frames of
their window (the temporal layers still see the whole window), blended with feathered weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """Latent frames [start, end) decoded as one clip; the first `blend` frames overlap the previous window."""

    start: int
    end: int
    blend: int

    @property
    def frames(self) -> int:
        return self.end - self.start


def windows(total: int, chunk: int, overlap: int) -> list[Window]:
    """Cover frames [0, total) with windows of `chunk` frames overlapping by `overlap`.

    overlap 0: [0, c), [c, 2c), ... with a shorter last window (sgm). overlap K > 0: stride c - K, and the last
    window is moved back to end at `total` so that it has a full `chunk` of context (its overlap grows).
    """
    if chunk < 1 or overlap < 0 or (overlap and overlap >= chunk):
        raise ValueError(f"need chunk >= 1 and 0 <= overlap < chunk, got chunk {chunk}, overlap {overlap}")
    if chunk >= total:
        return [Window(0, total, 0)]
    out = [Window(0, chunk, 0)]
    while out[-1].end < total:
        start = out[-1].end - overlap
        end = min(start + chunk, total)
        if overlap and end - start < chunk:
            start = total - chunk
        out.append(Window(start, end, out[-1].end - start))
    return out


def crossfade_weights(length: int) -> torch.Tensor:
    """Weights (length,) of the *newer* window over an overlap: (j + 1) / (length + 1); the older gets 1 - w."""
    return torch.arange(1, length + 1, dtype=torch.float32) / (length + 1)


class WindowBlender:
    """Streams decoded windows, cross-fading overlaps; `push` returns the frames that are final.

    Holds only the frames of the current window that the next window will overlap.
    """

    def __init__(self, plan: list[Window]):
        self.plan = plan
        self.index = 0
        self.held: torch.Tensor | None = None  # (blend of next, C, H, W)

    def push(self, decoded: torch.Tensor) -> torch.Tensor:
        """decoded: the current window's frames (t, C, H, W) -> final frames (t', C, H, W)."""
        window = self.plan[self.index]
        if decoded.shape[0] != window.frames:
            raise ValueError(f"window {self.index} has {window.frames} frames, got {decoded.shape[0]}")
        x = decoded.float()
        if window.blend:
            w = crossfade_weights(window.blend).to(x.device).view(-1, 1, 1, 1)  # (blend, 1, 1, 1)
            x = torch.cat([self.held * (1 - w) + x[: window.blend] * w, x[window.blend:]])
        self.index += 1
        keep = self.plan[self.index].blend if self.index < len(self.plan) else 0
        self.held = x[x.shape[0] - keep:] if keep else None
        return x[: x.shape[0] - keep]


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles over the latent plane: `size` (h, w) latent pixels each, overlapping by `overlap`."""

    size: tuple[int, int]
    overlap: int

    def to_dict(self) -> dict:
        return {"tile_latent": list(self.size), "overlap_latent": self.overlap}


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `size` covering [0, length) with at least `overlap` in common; last aligned to the end."""
    if size >= length:
        return [0]
    step = max(1, size - overlap)
    starts = list(range(0, length - size, step))
    return starts + [length - size]


def tile_grid(h: int, w: int, tiling: Tiling) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of each latent tile."""
    th, tw = min(tiling.size[0], h), min(tiling.size[1], w)
    return [(y, y + th, x, x + tw) for y in tile_starts(h, th, tiling.overlap) for x in tile_starts(w, tw, tiling.overlap)]


def feather(height: int, width: int, ramp: int, top: bool, bottom: bool, left: bool, right: bool) -> torch.Tensor:
    """Blend weights (height, width): linear ramps of `ramp` pixels on the edges that touch another tile, 1 inside.

    Weights stay > 0 so that accumulated weights can always be divided by.
    """
    def axis(n: int, start: bool, end: bool) -> torch.Tensor:
        w = torch.ones(n)
        r = min(ramp, n // 2)
        if r > 0:
            up = (torch.arange(r, dtype=torch.float32) + 0.5) / r
            if start:
                w[:r] = up
            if end:
                w[n - r:] = up.flip(0)
        return w

    return axis(height, top, bottom)[:, None] * axis(width, left, right)[None, :]


def decode_tiled(decode, z: torch.Tensor, tiling: Tiling, factor: int) -> torch.Tensor:
    """Decode latents (t, C, h, w) tile by tile with `decode(z_tile) -> (t, 3, f·th, f·tw)`; feathered blend.

    Every tile holds all t frames, so the temporal layers see the whole window.
    """
    t, _, h, w = z.shape
    out = weight = None
    for y0, y1, x0, x1 in tile_grid(h, w, tiling):
        tile = decode(z[:, :, y0:y1, x0:x1]).float()
        if out is None:
            out = torch.zeros(t, tile.shape[1], h * factor, w * factor, device=tile.device)
            weight = torch.zeros(1, 1, h * factor, w * factor, device=tile.device)
        mask = feather(tile.shape[-2], tile.shape[-1], tiling.overlap * factor, y0 > 0, y1 < h, x0 > 0, x1 < w)
        mask = mask.to(tile.device)[None, None]
        out[:, :, y0 * factor:y1 * factor, x0 * factor:x1 * factor] += tile * mask
        weight[:, :, y0 * factor:y1 * factor, x0 * factor:x1 * factor] += mask
    return out / weight
