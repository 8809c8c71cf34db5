"""Temporal windows with cross-faded overlaps (pure functions): the approximate decode.

A windows plan splits the latent frames into windows of `chunk` frames that overlap by `overlap` frames; each
window is decoded as one clip, and where two windows overlap their decoded frames are cross-faded linearly, so
no output frame sees a hard cut. `overlap=0` gives sgm's `decoding_t` chunking exactly (independent clips, the
last one shorter). This changes the picture (the temporal layers of a window do not see the others), so plans use
it only when the user forces it or even the exact streaming executor cannot fit (the family's planner).
Exact tiles replaced the feathered approximate tiles (the SVD family's exact streaming executor).
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
