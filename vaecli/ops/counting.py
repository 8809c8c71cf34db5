"""Counting execution: the model's own code run on tensors without data, to price a plan's memory.

`count(fn)` runs `fn(mode)` under a torch function mode in which every torch operation is answered from shapes
alone. Tensors are `Sym`s: shape, strides, dtype, a logical device, and the `Storage` they view. A `Storage` adds
its bytes to the `Ledger` when it is made and takes them off when Python frees it, so the ledger follows the real
program's allocations in order, frees included (`del x`, a view outliving its base, a stash), and its maximum is
the program's activation peak. No kernel runs, and nothing of torch beyond the function-mode protocol is touched
(no sympy, no dynamo): an operation costs about a microsecond.

What is modelled is eager torch on a real device with the program's own memory formats: convolutions, norms,
pads and elementwise ops keep their input's memory format, views share their base's storage, in-place ops
allocate nothing, `reshape` and `contiguous` copy only when torch would, `.to()` copies only across devices or
dtypes (tensors not on the compute device are counted as "host"). Kernel workspaces and allocator rounding are
not modelled: the planner's `CostModel`, calibrated against measured peaks, adds them. An operation without a
rule raises `NotImplementedError` naming it (add its rule to `counting_rules.py`). Parameters (real tensors, e.g. on the meta
device) are read for their shapes only; views of them count nothing.

Layouts follow torch: shapes `(N, C, H, W)`, channels-last strides `(HWC, 1, WC, C)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from vaecli.ops.shapes import (Shape, broadcast_shapes, dense_strides, dims_of, element_size, promote,
                               view_strides)

CL = torch.channels_last


class Ledger:
    """Live bytes on the compute device, on the host and in scratch files on disk (`vaecli.ops.scratch`), their
    peaks, and the device peak per phase."""

    def __init__(self) -> None:
        self.current = {"device": 0, "host": 0, "disk": 0}
        self.peak = {"device": 0, "host": 0, "disk": 0}
        self.phase = ""
        self.phases: dict[str, int] = {}

    def alloc(self, where: str, nbytes: int) -> None:
        now = self.current[where] + nbytes
        self.current[where] = now
        if now > self.peak[where]:
            self.peak[where] = now
        if where == "device" and self.phase and now > self.phases[self.phase]:
            self.phases[self.phase] = now

    def free(self, where: str, nbytes: int) -> None:
        self.current[where] -= nbytes

    def set_phase(self, name: str) -> None:
        """From now on also keep the device peak under `name` (starting from what is live now)."""
        self.phase = name
        self.phases[name] = max(self.phases.get(name, 0), self.current["device"])


class Storage:
    """One allocation; its bytes leave the ledger when the last tensor viewing it is freed."""

    __slots__ = ("ledger", "where", "nbytes")

    def __init__(self, ledger: Ledger | None, where: str, nbytes: int):
        self.ledger, self.where, self.nbytes = ledger, where, nbytes
        if ledger is not None:
            ledger.alloc(where, nbytes)

    def __del__(self) -> None:
        if self.ledger is not None:
            self.ledger.free(self.where, self.nbytes)

    def data_ptr(self) -> int:
        return id(self)


PARAMETER = Storage(None, "device", 0)  # what views of real tensors (parameters) share: counted nowhere


class Sym:
    """A tensor without data: metadata plus the `Storage` it views, on a logical device. Methods mirror the
    `torch.Tensor` methods the model and the executor use; torch functions reach the `Counting` mode."""

    __slots__ = ("shape", "_strides", "dtype", "device", "store", "mode")

    def __init__(self, mode: "Counting", shape: Shape, strides: Shape, dtype: torch.dtype, device: torch.device,
                 store: Storage):
        self.mode, self.shape, self._strides, self.dtype, self.device, self.store = \
            mode, shape, strides, dtype, device, store

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # reached only without an active mode
        raise RuntimeError("Sym tensors are only used under counting execution")

    def __repr__(self) -> str:
        return f"Sym({tuple(self.shape)}, {self.dtype}, {self.device})"

    # -- metadata --
    ndim = property(lambda self: len(self.shape))
    is_cuda = property(lambda self: False)  # counting models torch's own kernels (Triton's fused one allocates alike)
    requires_grad = property(lambda self: False)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def stride(self, dim: int | None = None):
        return self._strides if dim is None else self._strides[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return element_size(self.dtype)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_contiguous(self, memory_format=torch.contiguous_format) -> bool:
        cl = memory_format in (CL, torch.channels_last_3d)
        if cl and self.ndim not in (4, 5):
            return False
        expected = dense_strides(tuple(self.shape), cl)
        return all(s == 1 or a == b for s, a, b in zip(self.shape, self._strides, expected))

    def channels_last(self) -> bool:
        """torch's suggested memory format of x is channels-last (outputs of convs, norms, pads follow it)."""
        return self.ndim in (4, 5) and self.shape[1] > 1 and self.is_contiguous(CL) and not self.is_contiguous()

    def untyped_storage(self) -> Storage:
        return self.store

    def __len__(self) -> int:
        return self.shape[0]

    def __bool__(self) -> bool:
        return True

    # -- views --
    def _view(self, shape: Shape, strides: Shape, dtype: torch.dtype | None = None) -> "Sym":
        return Sym(self.mode, shape, strides, dtype or self.dtype, self.device, self.store)

    def __getitem__(self, index) -> "Sym":
        if type(index) is slice and index.step is None:  # the common x[a:b]: the first axis only
            start, stop, _ = index.indices(self.shape[0])
            return Sym(self.mode, (max(0, stop - start),) + self.shape[1:], self._strides, self.dtype,
                       self.device, self.store)
        if type(index) is tuple and len(index) == len(self.shape) and all(type(i) is slice for i in index):
            shape, strides = [], []  # x[:, :, rows, cols]: slices on every axis
            for item, size, stride in zip(index, self.shape, self._strides):
                start, stop, step = item.indices(size)
                shape.append(len(range(start, stop, step)))
                strides.append(stride * step)
            return Sym(self.mode, tuple(shape), tuple(strides), self.dtype, self.device, self.store)
        index = index if isinstance(index, tuple) else (index,)
        if any(item is Ellipsis for item in index):
            k = index.index(Ellipsis)
            used = sum(1 for item in index if item is not None and item is not Ellipsis)
            index = index[:k] + (slice(None),) * (self.ndim - used) + index[k + 1:]
        shape, strides = tuple(self.shape), self._strides
        out_shape, out_strides, axis = [], [], 0
        for item in index:
            if item is None:
                out_shape.append(1)
                out_strides.append(strides[axis] * shape[axis] if axis < len(shape) else 1)
            elif isinstance(item, int):
                axis += 1
            elif isinstance(item, slice):
                start, stop, step = item.indices(shape[axis])
                out_shape.append(len(range(start, stop, step)))
                out_strides.append(strides[axis] * step)
                axis += 1
            else:
                raise NotImplementedError(f"counting execution: index {item!r}")
        return self._view(tuple(out_shape) + shape[axis:], tuple(out_strides) + strides[axis:])

    def __setitem__(self, index, value) -> None:
        return None  # a write into existing storage

    def permute(self, *dims) -> "Sym":
        dims = dims_of(dims)
        return self._view(tuple(self.shape[d] for d in dims), tuple(self._strides[d] for d in dims))

    def transpose(self, a: int, b: int) -> "Sym":
        dims = list(range(self.ndim))
        dims[a], dims[b] = dims[b], dims[a]
        return self.permute(dims)

    def t(self) -> "Sym":
        return self.transpose(0, 1)

    def _resolve(self, new) -> Shape:
        new = list(dims_of(new))
        if -1 in new:
            known = math.prod(s for s in new if s != -1)
            new[new.index(-1)] = self.numel() // max(1, known)
        return tuple(int(s) for s in new)

    def view(self, *new) -> "Sym":
        if new and isinstance(new[0], torch.dtype):
            last = self.shape[-1] * element_size(self.dtype) // element_size(new[0])
            return self._view(tuple(self.shape[:-1]) + (last,), self._strides, new[0])
        shape = self._resolve(new)
        strides = view_strides(tuple(self.shape), self._strides, shape)
        if strides is None:
            raise RuntimeError("view size is not compatible with input tensor's size and stride; use reshape")
        return self._view(shape, strides)

    def reshape(self, *new) -> "Sym":
        shape = self._resolve(new)
        strides = view_strides(tuple(self.shape), self._strides, shape)
        return self._view(shape, strides) if strides is not None else self.mode.new(shape, self.dtype, self.device)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "Sym":
        shape = tuple(self.shape)
        end = end_dim % len(shape) if shape else 0
        return self.reshape(shape[:start_dim] + (math.prod(shape[start_dim:end + 1]),) + shape[end + 1:])

    def unsqueeze(self, dim: int) -> "Sym":
        shape = list(self.shape)
        dim = dim % (len(shape) + 1)
        return self.reshape(tuple(shape[:dim] + [1] + shape[dim:]))

    def squeeze(self, dim: int | None = None) -> "Sym":
        return self.reshape(tuple(s for i, s in enumerate(self.shape) if s != 1 or (dim is not None and
                                                                                  i != dim % self.ndim)))

    def split(self, size: int, dim: int = 0) -> tuple:
        n = self.shape[dim]
        index = [slice(None)] * self.ndim
        out = []
        for start in range(0, n, size):
            index[dim] = slice(start, min(n, start + size))
            out.append(self[tuple(index)])
        return tuple(out)

    def chunk(self, chunks: int, dim: int = 0) -> tuple:
        return self.split(-(-self.shape[dim] // chunks), dim)

    def expand(self, *sizes) -> "Sym":
        sizes = dims_of(sizes)
        lead = len(sizes) - self.ndim
        shape = tuple(self.shape[i - lead] if v == -1 else v for i, v in enumerate(sizes))
        strides = tuple(0 if i < lead or (self.shape[i - lead] == 1 and shape[i] != 1) else self._strides[i - lead]
                        for i in range(len(shape)))
        return self._view(shape, strides)

    def detach(self) -> "Sym":
        return self._view(tuple(self.shape), self._strides)

    # -- copies and conversions --
    def _like(self, shape: Shape | None = None, dtype: torch.dtype | None = None) -> "Sym":
        return self.mode.new(shape or tuple(self.shape), dtype or self.dtype, self.device, self.channels_last())

    def new_empty(self, size, dtype=None, device=None, **kw) -> "Sym":
        return self.mode.new(tuple(size), dtype or self.dtype, torch.device(device) if device else self.device)

    def contiguous(self, memory_format=torch.contiguous_format) -> "Sym":
        if self.is_contiguous(memory_format):
            return self
        return self.mode.new(tuple(self.shape), self.dtype, self.device, memory_format in (CL, torch.channels_last_3d))

    def to(self, *args, **kwargs) -> "Sym":
        device, dtype = self.device, self.dtype
        for a in list(args) + [kwargs.get("device"), kwargs.get("dtype")]:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = torch.device(a)
            elif isinstance(a, (Sym, torch.Tensor)):
                device, dtype = a.device, a.dtype
        if device.type == self.device.type and device.index is None:
            device = self.device
        if dtype == self.dtype and device == self.device and not kwargs.get("copy"):
            return self
        fmt = kwargs.get("memory_format")
        cl = self.channels_last() if fmt in (None, torch.preserve_format) else fmt == CL
        return self.mode.new(tuple(self.shape), dtype, device, cl)

    def float(self, memory_format=None) -> "Sym":
        return self.to(torch.float32)

    def type_as(self, other) -> "Sym":
        return self.to(other.dtype)

    def double(self, memory_format=None) -> "Sym":
        return self.to(torch.float64)

    def half(self, memory_format=None) -> "Sym":
        return self.to(torch.float16)

    def bfloat16(self, memory_format=None) -> "Sym":
        return self.to(torch.bfloat16)

    def clone(self, memory_format=None) -> "Sym":
        return self._like()

    def pin_memory(self) -> "Sym":
        return self._like()

    def copy_(self, src, non_blocking: bool = False) -> "Sym":
        return self

    # -- arithmetic --
    def _binary(self, other, *args, **kwargs) -> "Sym":
        if not isinstance(other, (Sym, torch.Tensor)):
            return self._like()
        shape = broadcast_shapes(tuple(self.shape), tuple(other.shape))
        big = self if math.prod(self.shape) >= math.prod(other.shape) else other
        dtype = promote(self.dtype, other.dtype) if other.dtype.is_floating_point else self.dtype
        if isinstance(big, Sym) and shape == tuple(big.shape):
            return big._like(dtype=dtype)
        return self.mode.new(shape, dtype, self.device)

    add = sub = mul = div = maximum = minimum = pow = _binary
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __pow__ = _binary

    def _inplace(self, *args, **kwargs) -> "Sym":
        return self

    add_ = sub_ = mul_ = div_ = clamp_ = square_ = sqrt_ = exp_ = neg_ = fill_ = zero_ = _inplace
    addcmul_ = addmm_ = baddbmm_ = masked_fill_ = uniform_ = normal_ = _inplace
    __iadd__ = __isub__ = __imul__ = __itruediv__ = _inplace

    def _unary(self, *args, **kwargs) -> "Sym":
        return self._like()

    exp = sqrt = rsqrt = square = neg = __neg__ = abs = clamp = sigmoid = tanh = sin = cos = log = _unary

    def softmax(self, dim: int = -1, dtype: torch.dtype | None = None) -> "Sym":
        return self._like(dtype=dtype)

    def _reduce(self, dim=None, keepdim: bool = False, dtype: torch.dtype | None = None) -> "Sym":
        if dim is None:
            return self.mode.new((), dtype or self.dtype, self.device)
        dims = {d % self.ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        shape = tuple(1 if i in dims else s for i, s in enumerate(self.shape) if keepdim or i not in dims)
        return self.mode.new(shape, dtype or self.dtype, self.device)

    sum = mean = amax = amin = _reduce

    def all(self, *args, **kwargs) -> "Sym":
        return self.mode.new((), torch.bool, self.device)

    any = all

    def repeat_interleave(self, repeats: int, dim: int | None = None) -> "Sym":
        dim = dim % self.ndim
        shape = tuple(s * repeats if i == dim else s for i, s in enumerate(self.shape))
        return self.mode.new(shape, self.dtype, self.device)

    def repeat(self, *reps) -> "Sym":
        reps = dims_of(reps)
        base = (1,) * (len(reps) - self.ndim) + tuple(self.shape)
        return self.mode.new(tuple(s * k for s, k in zip(base, reps)), self.dtype, self.device)

    def matmul(self, other) -> "Sym":
        return matmul_shape(self.mode, self, other)

    __matmul__ = matmul


def matmul_shape(m: "Counting", a, b) -> Sym:
    batch = broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    return m.new(batch + (a.shape[-2], b.shape[-1]), a.dtype, a.device)


# --------------------------------------------------------------------------------------------- the mode


class Counting(TorchFunctionMode):
    """Answers torch functions from shapes and keeps their allocations on `ledger`.

    device: the logical compute device; tensors on another device type (the host) are counted as "host"."""

    def __init__(self, ledger: Ledger, device: torch.device):
        super().__init__()
        self.ledger, self.device = ledger, torch.device(device)
        from vaecli.ops.counting_rules import rules  # the table names this module's Sym: imported here

        self.rules = rules(self)

    def new(self, shape: Shape, dtype: torch.dtype, device: torch.device, channels_last: bool = False) -> Sym:
        shape = tuple(map(int, shape))
        where = "device" if device.type == self.device.type or device.type == "meta" else "host"
        storage = Storage(self.ledger, where, math.prod(shape) * element_size(dtype))
        return Sym(self, shape, dense_strides(shape, channels_last), dtype, device, storage)

    def sym(self, x) -> Sym:
        """x as a Sym (a real tensor — a parameter — becomes a view that counts nothing)."""
        if isinstance(x, Sym):
            return x
        return Sym(self, tuple(x.shape), tuple(x.stride()), x.dtype, self.device, PARAMETER)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.rules.get(func)
        if rule is not None:
            return rule(*args, **kwargs)
        name = getattr(func, "__name__", None)
        if args and name is not None and (isinstance(args[0], torch.Tensor) or isinstance(args[0], Sym)):
            method = getattr(Sym, name, None)  # a Tensor method called on a real tensor: the Sym rule
            if method is not None and not isinstance(method, property):
                return method(self.sym(args[0]), *args[1:], **kwargs)
        qualname = getattr(func, "__qualname__", repr(func))
        if qualname.endswith("__get__"):  # attribute reads of real tensors (parameters)
            with torch._C.DisableTorchFunction():
                return func(*args, **kwargs)
        raise NotImplementedError(f"counting execution has no rule for {qualname}")


def count(fn: Callable[["Counting"], Any], device: torch.device | str = "cpu") -> Ledger:
    """Run fn(mode) under counting (no autograd, as the jobs run); returns the ledger. fn makes its inputs with
    `mode.new(shape, dtype, device, channels_last)`."""
    ledger = Ledger()
    mode = Counting(ledger, torch.device(device))
    with torch.no_grad(), mode:
        fn(mode)
    return ledger
