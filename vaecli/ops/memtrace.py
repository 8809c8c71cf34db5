"""Peak memory of a computation, traced on the meta device.

Running a model whose weights and inputs live on the `meta` device computes every shape and allocates nothing.
`traced_peak_bytes` watches each operator's outputs while that runs and keeps a running sum of the storages
still alive (Python frees a tensor as soon as its last reference goes, as eager execution does on a real
device): its maximum is the peak that eager execution holds for activations, independent of the device.
Allocator rounding, kernel workspaces (cuDNN, fused attention) and fragmentation are not seen; the planner's
calibrated cost model adds them (see `vaecli.model.svd.planning.CostModel`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode that are still referenced (an operator's output that
    shares an input's storage, a view or an in-place result, is not a new one: a slice of a tensor made before the
    trace costs nothing).

    `current` may include storages freed since the last scan (an over-estimate); the live set is rescanned only
    when that over-estimate exceeds the peak so far, so the peak is exact at a fraction of the cost. Peaks are kept
    per phase too (`set_phase`), for code whose parts run one after another.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.phase = ""
        self.peaks: dict[str, int] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Keep `__torch_dispatch__` a plain method. By default torch wraps it in `torch._dynamo.disable`, whose first
        call imports torch._dynamo and sympy (about 1 s of a `vaecli plan` on 2 cores); the tracer never runs under
        torch.compile, so there is nothing to disable."""
        return False

    def set_phase(self, name: str) -> None:
        self.phase = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs:  # a view of an input is not new
                    size = storage.nbytes()
                    self.live[ref.cdata] = (ref, size)
                    self.current += size
        if self.current > self.peaks.get(self.phase, 0):
            self._collect()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.current)
            self.peak = max(self.peak, self.current)
        return out

    def _collect(self) -> None:
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size


def traced_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors `fn` allocates (on the meta device), including its result while alive."""
    return traced_peaks(lambda _: fn())[""]


def traced_peaks(fn: Callable[[Callable[[str], None]], object]) -> dict[str, int]:
    """Peak bytes per phase: fn(set_phase) runs with `set_phase(name)` marking where each phase starts; the
    overall peak is under "" (as `traced_peak_bytes`)."""
    mode = _LiveBytes()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(mode)
        result = fn(mode.set_phase)
        del result
        mode._collect()
    return {**mode.peaks, "": mode.peak}
