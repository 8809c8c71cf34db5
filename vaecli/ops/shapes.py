"""Shape, stride and dtype arithmetic of eager torch, from shapes alone: what counting execution
(`vaecli.ops.counting`) needs to answer views, reshapes, broadcasts and promotions without running a kernel.

Layouts follow torch: shapes `(N, C, H, W)` / `(N, C, D, H, W)`, channels-last strides `(HWC, 1, WC, C)`.
"""

from __future__ import annotations

import functools
import math

import torch

Shape = tuple[int, ...]


@functools.lru_cache(maxsize=None)
def element_size(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 1
    return (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8


@functools.lru_cache(maxsize=4096)
def dense_strides(shape: Shape, channels_last: bool = False) -> Shape:
    """Contiguous strides of `shape`, or channels-last ones for 4-D (N, C, H, W) / 5-D (N, C, D, H, W)."""
    n = len(shape)
    order = ([1] + list(range(n - 1, 1, -1)) + [0]) if channels_last and n in (4, 5) else list(range(n - 1, -1, -1))
    strides = [0] * n
    step = 1
    for axis in order:
        strides[axis] = step
        step *= max(1, shape[axis])
    return tuple(strides)


def view_strides(shape: Shape, strides: Shape, new: Shape) -> Shape | None:
    """Strides of `new` as a view of a tensor (shape, strides), or None when it needs a copy (torch's rule: the
    new dims must split or merge runs of old dims that are contiguous with each other)."""
    if math.prod(shape) == 0:
        return dense_strides(new)
    runs: list[list[int]] = []  # runs of non-unit old dims, each contiguous: [size, innermost stride]
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if runs and runs[-1][1] == stride * size:
            runs[-1] = [runs[-1][0] * size, stride]
        else:
            runs.append([size, stride])
    sizes = [s for s in new if s != 1]
    found: list[int] = []
    k = 0
    for size, stride in runs:
        remaining = size
        while remaining > 1:
            if k >= len(sizes) or remaining % sizes[k]:
                return None
            remaining //= sizes[k]
            found.append(stride * remaining)
            k += 1
    if k != len(sizes):
        return None
    out = [0] * len(new)
    it = iter(found)
    for axis, size in enumerate(new):
        if size != 1:
            out[axis] = next(it)
    for axis in range(len(new) - 1, -1, -1):  # size-1 dims take the stride their position implies
        if new[axis] == 1:
            out[axis] = out[axis + 1] * new[axis + 1] if axis + 1 < len(new) else 1
    return tuple(out)


def broadcast_shapes(*shapes: Shape) -> Shape:
    """numpy broadcasting (torch.broadcast_shapes imports sympy on first use)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        for i, v in enumerate(s):
            j = ndim - len(s) + i
            if v != 1:
                if out[j] not in (1, v):
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[j] = v
    return tuple(out)


@functools.lru_cache(maxsize=None)
def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types, memoised (under the mode every torch call costs a dispatch)."""
    with torch._C.DisableTorchFunction():
        return torch.promote_types(a, b)


def dims_of(args) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
