"""What the exact streaming executor (`vaecli.model.svd.streaming`) keeps between stages and gathers across pieces.

- `FrameStore`: a clip's activation between two stages, frame by frame (`(1, C, H, W)` channels-last), on the device,
  parked in host memory, or in scratch files on disk (`vaecli.ops.scratch`); reads of frames written together
  are views.
- `Moments`: GroupNorm statistics gathered piece by piece (count, mean, M2; fp64), merged exactly (Chan et al.),
  per frame (spatial norms) or over the clip (temporal norms); `affine_silu` applies them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CL = torch.channels_last


# ----------------------------------------------------------------------------------------------- storage


class FrameStore:
    """The activation of a clip between two stages: `count` frames, each `(1, C, H, W)` channels-last.

    Frames live on `device`, or in host memory when `park` (pinned for CUDA), or on disk when `scratch` (a
    `vaecli.ops.scratch.Scratch` or its counting twin: one `DiskFrame` per frame, read and written by region).
    Frames written together in memory are kept as one tensor (`blocks`), so reading them back whole is a view.
    """

    def __init__(self, count: int, device: torch.device, park: bool = False, scratch=None):
        self.count = count
        self.device = device
        self.park = park  # on a CPU device parked frames are separate host copies (the planner never asks for it)
        self.scratch = scratch
        self.frames: list[torch.Tensor | None] = [None] * count
        self._block_of: list[tuple[int, torch.Tensor] | None] = [None] * count

    def __len__(self) -> int:
        return self.count

    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the stored frames."""
        return tuple(self.frames[0].shape[-3:])  # a tensor's or a DiskFrame's

    def dtype(self) -> torch.dtype:
        return self._dtype

    def put(self, start: int, block: torch.Tensor) -> None:
        """Store frames [start, start + n) from `block` (n, C, H, W) (any device; copied to the store's place)."""
        n = block.shape[0]
        self._dtype = block.dtype
        if self.scratch is not None:
            for i in range(n):
                frame = self.scratch.frame(tuple(block.shape[1:]), block.dtype)
                frame.write(block[i:i + 1])
                self.frames[start + i] = frame
                self._block_of[start + i] = None
            return
        if self.park:
            block = self._host_empty(tuple(block.shape), block.dtype).copy_(block)
        else:
            block = block.to(self.device).contiguous(memory_format=CL)
        for i in range(n):
            self.frames[start + i] = block[i:i + 1]
            self._block_of[start + i] = (start, block)

    def allocate(self, channels: int, height: int, width: int, dtype: torch.dtype) -> None:
        """Empty frames of (C, H, W), one tensor per frame, to be filled region by region with `write`."""
        self._dtype = dtype
        for i in range(self.count):
            if self.scratch is not None:
                self.frames[i] = self.scratch.frame((channels, height, width), dtype)
                self._block_of[i] = None
                continue
            if self.park:
                frame = self._host_empty((1, channels, height, width), dtype)
            else:
                frame = torch.empty((1, channels, height, width), dtype=dtype, device=self.device, memory_format=CL)
            self.frames[i] = frame
            self._block_of[i] = (i, frame)

    def _host_empty(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """An empty channels-last (n, C, H, W) tensor in host memory, pinned when the device is CUDA."""
        n, c, h, w = shape
        host = torch.empty((n, h, w, c), dtype=dtype, pin_memory=self.device.type == "cuda")
        return host.permute(0, 3, 1, 2)

    def subset(self, start: int, end: int) -> "FrameStore":
        """A store of frames [start, end) sharing this store's tensors."""
        sub = FrameStore(end - start, self.device, self.park, self.scratch)
        sub.frames = self.frames[start:end]
        sub._block_of = [None] * (end - start)
        sub._dtype = self._dtype
        return sub

    def adopt(self, start: int, other: "FrameStore") -> None:
        """Take the frames of `other` as frames [start, start + len(other)) (no copy)."""
        self._dtype = other._dtype
        for i in range(len(other)):
            self.frames[start + i] = other.frames[i]
            self._block_of[start + i] = None

    def drop(self, start: int, end: int) -> None:
        """Forget frames [start, end) (their memory goes once no other frame shares their block)."""
        for i in range(start, end):
            self.frames[i] = None
            self._block_of[i] = None

    def read(self, start: int, end: int, rows: slice = slice(None), cols: slice = slice(None),
             stash: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Frames [start, end), region rows × cols, as one `(n, C, h, w)` channels-last tensor on the device.

        stash: regions (rows × cols) to read instead of the stored frames' (their values before an in-place
            update)."""
        if self.scratch is None and not self.park and not (stash and any(start <= i < end for i in stash)):
            first = self._block_of[start]
            if first is not None and all(self._block_of[i] is not None and self._block_of[i][1] is first[1]
                                         for i in range(start, end)):
                base, block = first
                return block[start - base:end - base, :, rows, cols]  # a view: no copy
        out = None
        for j, i in enumerate(range(start, end)):  # one frame's region at a time (a disk read is a copy)
            part = stash[i] if stash and i in stash else self._region(i, rows, cols)
            if out is None:
                out = torch.empty((end - start, *part.shape[1:]), dtype=part.dtype, device=self.device,
                                  memory_format=CL)
            out[j:j + 1].copy_(part)
            del part
        return out

    def _region(self, i: int, rows: slice, cols: slice) -> torch.Tensor:
        """Region rows × cols of frame i: a view of it in memory, or read from its file."""
        if self.scratch is not None:
            return self.frames[i].read(rows, cols)
        return self.frames[i][:, :, rows, cols]

    def holds(self, x: torch.Tensor, start: int) -> bool:
        """Whether x is a view of the stored frames from `start` on (a result computed into it is stored)."""
        frame = self.frames[start]
        return (self.scratch is None and frame is not None and x.device == frame.device
                and x.untyped_storage().data_ptr() == frame.untyped_storage().data_ptr())

    def write(self, start: int, block: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None)) -> None:
        """Write `block` (n, C, h, w) into the region rows × cols of stored frames [start, start + n)."""
        for j in range(block.shape[0]):
            if self.scratch is not None:
                self.frames[start + j].write(block[j:j + 1], rows, cols)
            else:
                self.frames[start + j][:, :, rows, cols].copy_(block[j:j + 1])

    def original(self, start: int, end: int, stash: dict[int, torch.Tensor], rows: slice = slice(None),
                 cols: slice = slice(None)) -> dict[int, torch.Tensor]:
        """Region rows × cols of frames [start, end) as it is before an in-place update overwrites it: from `stash`
        (regions kept earlier) or copied."""
        return {i: stash[i] if i in stash else
                self._region(i, rows, cols) if self.scratch is not None else self.frames[i][:, :, rows, cols].clone()
                for i in range(max(0, start), min(self.count, end))}

    def gather(self) -> torch.Tensor:
        """All frames as one `(T, C, H, W)` tensor on the store's place (host when parked, the device when on
        disk)."""
        if not self.park:
            return self.read(0, self.count)
        return torch.cat(self.frames).contiguous(memory_format=CL)


# ----------------------------------------------------------------------------------------------- statistics


class Moments:
    """GroupNorm statistics gathered piece by piece: count, mean and M2 (sum of squared deviations), fp64.

    per_frame: statistics per frame (spatial norms: shape (n, G)) or over all frames (temporal: shape (1, G)).
    Each piece adds its own mean and M2 about that mean (fp32 on the device); pieces combine exactly.
    """

    def __init__(self, groups: int, per_frame: bool):
        self.groups, self.per_frame = groups, per_frame
        self.rows: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # per frame: count, mean, M2
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor, frame: int = 0) -> None:
        """x: a piece (n, C, h, w); for per-frame statistics its frames are frames frame..frame+n of the chunk.

        Two passes over one fp32 copy of the piece: sums give each group's mean, then the squared deviations
        about it, computed in place in the copy."""
        n, c, h, w = x.shape
        g = self.groups
        per_group = c // g
        pixels = x.to(torch.float32, copy=True).permute(0, 2, 3, 1)  # (frame, h, w, C): a view for channels-last
        pixels = pixels.reshape(n, h * w, c) if self.per_frame else pixels.reshape(1, n * h * w, c)
        count = pixels.shape[1] * per_group
        sums = pixels.sum(dim=1)  # (rows, C)
        mean = sums.view(-1, g, per_group).sum(-1) / count  # (rows, G)
        pixels.sub_(mean.repeat_interleave(per_group, dim=1)[:, None, :])  # deviations
        m2 = pixels.square_().sum(dim=1).view(-1, g, per_group).sum(-1)  # (rows, G)
        del pixels
        mean, m2 = mean.double(), m2.double()
        if self.per_frame:
            self._add_rows(frame, n, count, mean, m2)
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        self.count, self.mean, self.m2 = merge(self.count, self.mean, self.m2, count, mean, m2)

    def _add_rows(self, frame: int, n: int, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        for j in range(n):
            key = frame + j
            if key not in self.rows:
                self.rows[key] = (count, mean[j].clone(), m2[j].clone())  # not views that keep the piece's rows
                continue
            self.rows[key] = merge(*self.rows[key], count, mean[j], m2[j])

    def affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), fp32 (n or 1, C, 1, 1): norm(x) = x·scale + shift with these statistics."""
        if self.per_frame:
            keys = sorted(self.rows)
            mean = torch.stack([self.rows[k][1] for k in keys])
            count = torch.tensor([float(self.rows[k][0]) for k in keys], dtype=torch.float64,
                                 device=mean.device)[:, None]
            m2 = torch.stack([self.rows[k][2] for k in keys])
        else:
            count, mean, m2 = float(self.count), self.mean, self.m2
        rstd = torch.rsqrt(m2 / count + norm.eps)  # (n, G)
        per_group = norm.num_channels // norm.num_groups
        rstd = rstd.repeat_interleave(per_group, dim=1)
        mean = mean.repeat_interleave(per_group, dim=1)
        weight = norm.weight.double() if norm.weight is not None else torch.ones_like(rstd[0])
        bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(rstd[0])
        scale = rstd * weight
        shift = bias - mean * scale
        return scale.float()[:, :, None, None], shift.float()[:, :, None, None]


def merge(n0: int, mean0: torch.Tensor, m2_0: torch.Tensor, n1: int, mean1: torch.Tensor, m2_1: torch.Tensor
          ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and M2 of two sets together (Chan et al.): M2 = M2₀ + M2₁ + δ²·n₀n₁/n, δ = mean₁ − mean₀."""
    total = n0 + n1
    delta = mean1 - mean0
    return total, mean0 + delta * (n1 / total), m2_0 + m2_1 + delta * delta * (n0 * n1 / total)


def affine_silu(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """silu(x·scale + shift) in x's dtype, channels-last (a GroupNorm with given statistics, then SiLU).

    One row of statistics (a temporal norm's, or one frame's): the affine is an inference-mode `batch_norm` with
    zero mean and unit variance (one pass, computed in fp32 inside the kernel, about 3x faster on a CPU than an
    fp32 round trip for bf16), then SiLU in place, as the one-clip GroupNorm and SiLU round. Several rows (a chunk of
    frames, each with its own statistics): the affine in fp32, one rounding at the end."""
    scale, shift = affine
    if scale.shape[0] == 1:
        channels = scale.shape[1]
        zero = torch.zeros(channels, dtype=scale.dtype, device=scale.device)
        unit = torch.ones(channels, dtype=scale.dtype, device=scale.device)
        y = F.batch_norm(x.contiguous(memory_format=CL), zero, unit, scale.view(channels), shift.view(channels),
                         False, 0.0, 0.0)
        return F.silu(y, inplace=True)
    y = torch.addcmul(shift, x, scale) if x.dtype == torch.float32 else torch.addcmul(shift, x.float(), scale)
    y = F.silu(y, inplace=True)
    return y if y.dtype == x.dtype else y.to(x.dtype)
