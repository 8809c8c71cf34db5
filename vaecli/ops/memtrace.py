"""Peak memory of a computation, traced on the meta device.

Running a model whose weights and inputs live on the `meta` device computes every shape and allocates nothing.
`traced_peak_bytes` watches each operator's outputs while that runs and keeps a running sum of the storages
still alive (Python frees a tensor as soon as its last reference goes, as eager execution does on a real
device): its maximum is the peak that eager execution holds for activations, independent of the device.
Allocator rounding, kernel workspaces (cuDNN, fused attention) and fragmentation are not seen; the planner's
calibrated cost model adds them (see `vaecli.pipeline.planner.CostModel`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode that are still referenced."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    size = storage.nbytes()
                    self.live[ref.cdata] = (ref, size)
                    self.current += size
        self.peak = max(self.peak, self.current)
        return out

    def _collect(self) -> None:
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size


def traced_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors `fn` allocates (on the meta device), including its result while alive."""
    mode = _LiveBytes()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(mode)
        result = fn()
        mode._collect()
        del result
    return mode.peak
