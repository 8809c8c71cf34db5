"""The rules of counting execution (see `counting.py`): what each torch function returns, from shapes alone.

`rules(mode)` maps the torch functions (not Tensor methods: those are `Sym`'s own) that the models and the
executor call to a rule `(*args, **kwargs) -> Sym` with the function's signature; `SymEinops` lets einops'
`rearrange` run on `Sym`s. A rule allocates what the real function allocates (through `mode.new` or `_like`) and
nothing else. Layouts follow torch: `(N, C, *spatial)`, channels-last kept from the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops._backends import AbstractBackend

from vaecli.ops.counting import CL, Counting, Sym, matmul_shape
from vaecli.ops.shapes import broadcast_shapes, dims_of, promote


class SymEinops(AbstractBackend):
    """einops on `Sym`s (rearrange: reshape and permute)."""

    framework_name = __name__

    def is_appropriate_type(self, tensor) -> bool:
        return isinstance(tensor, Sym)

    def shape(self, x):
        return tuple(x.shape)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, x, axes):
        return x.permute(axes)

    def add_axis(self, x, new_position):
        return x.unsqueeze(new_position)

    def is_float_type(self, x) -> bool:
        return x.dtype.is_floating_point


def rules(m: Counting) -> dict:
    """Torch functions (not methods) -> rule(*args, **kwargs), for those the model and the executor call."""
    return {**_makers(m), **_layers(m), **_elementwise(m)}


def _makers(m: Counting) -> dict:
    """Functions that make tensors: factories, `*_like`, `tensor`, `cat`, `stack`."""
    def factory(*size, dtype=None, device=None, memory_format=None, pin_memory=False, **kw):
        return m.new(dims_of(size), dtype or torch.float32, torch.device(device or "cpu"), memory_format == CL)

    def like(x, *args, dtype=None, device=None, memory_format=torch.preserve_format, **kw):
        x = m.sym(x)
        cl = x.channels_last() if memory_format == torch.preserve_format else memory_format == CL
        return m.new(tuple(x.shape), dtype or x.dtype, torch.device(device) if device else x.device, cl)

    def tensor(data, dtype=None, device=None, **kw):
        shape = (len(data),) if isinstance(data, (list, tuple)) else ()
        return m.new(shape, dtype or torch.float32, torch.device(device or "cpu"))

    def cat(tensors, dim=0):
        tensors = [m.sym(t) for t in tensors]
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        return tensors[0]._like(tuple(shape))

    def stack(tensors, dim=0):
        tensors = [m.sym(t) for t in tensors]
        shape = list(tensors[0].shape)
        shape.insert(dim, len(tensors))
        return m.new(tuple(shape), tensors[0].dtype, tensors[0].device)

    return {
        torch.empty: factory, torch.zeros: factory, torch.ones: factory, torch.randn: factory, torch.rand: factory,
        torch.full: lambda size, value, **kw: factory(size, **kw),
        torch.empty_like: like, torch.zeros_like: like, torch.ones_like: like, torch.randn_like: like,
        torch.full_like: lambda x, value, **kw: like(x, **kw),
        torch.arange: lambda *a, dtype=None, device=None, **kw: m.new(
            (len(range(*[int(v) for v in a])),), dtype or torch.int64, torch.device(device or "cpu")),
        torch.tensor: tensor, torch.as_tensor: tensor, torch.cat: cat, torch.stack: stack,
    }


def _layers(m: Counting) -> dict:
    """Convolutions, matrix products, norms, pads, resampling and attention."""
    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        x = m.sym(x)
        n = x.ndim - 2

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
        stride, padding, dilation = tup(stride), tup(padding), tup(dilation)
        out = [x.shape[0], weight.shape[0]] + [
            (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(n)]
        return m.new(tuple(out), x.dtype, x.device, x.channels_last())

    def pad(x, pad, mode="constant", value=None):
        shape = list(x.shape)
        for i in range(len(pad) // 2):
            shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
        return x._like(tuple(shape))

    def interpolate(x, size=None, scale_factor=None, mode="nearest", **kw):
        if size is None:
            s = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * (x.ndim - 2)
            size = tuple(int(math.floor(d * f)) for d, f in zip(x.shape[2:], s))
        size = tuple(size) if isinstance(size, (tuple, list)) else (size,) * (x.ndim - 2)
        return x._like(tuple(x.shape[:2]) + size)

    return {
        torch.matmul: lambda a, b: matmul_shape(m, m.sym(a), m.sym(b)), torch.bmm: lambda a, b: matmul_shape(m, a, b),
        torch.addmm: lambda bias, a, b, **kw: m.new((a.shape[0], b.shape[1]), a.dtype, a.device),
        torch.baddbmm: lambda base, a, b, **kw: matmul_shape(m, a, b),
        F.linear: lambda x, w, b=None: m.new(tuple(x.shape[:-1]) + (w.shape[0],), x.dtype, x.device),
        F.conv2d: conv, F.conv3d: conv, torch.conv2d: conv, torch.conv3d: conv,
        F.group_norm: lambda x, groups, weight=None, bias=None, eps=1e-5: x._like(),
        F.batch_norm: lambda x, *a, **kw: x._like(),
        F.layer_norm: lambda x, shape, weight=None, bias=None, eps=1e-5: x._like(),
        F.pad: pad, F.interpolate: interpolate,
        F.scaled_dot_product_attention: lambda q, k, v, *a, **kw: m.new(
            tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype, q.device),
    }


def _elementwise(m: Counting) -> dict:
    """Elementwise and reducing functions, views by function name, and torch's own helpers passed through."""
    def addcmul(base, a, b, value=1):
        a, b, base = m.sym(a), m.sym(b), m.sym(base)
        shape = broadcast_shapes(tuple(base.shape), tuple(a.shape), tuple(b.shape))
        return m.new(shape, promote(a.dtype, b.dtype), a.device, a.channels_last())

    def silu(x, inplace=False):
        return x if inplace else x._like()

    def normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
        x = m.sym(x)
        norms = x.sum(dim, keepdim=True)  # torch: x / x.norm(p, dim, keepdim).clamp_min(eps).expand_as(x)
        result = x._like()
        del norms
        return result

    def where(cond, a, b):
        return m.sym(a)._like()

    def binary(a, b, *args, **kwargs):
        return m.sym(a)._binary(b) if isinstance(a, (Sym, torch.Tensor)) else m.sym(b)._like()

    def unary(x, *args, **kwargs):
        return m.sym(x)._like()

    return {
        torch.device: torch.device, torch._C._set_grad_enabled: torch._C._set_grad_enabled,
        torch.promote_types: torch.promote_types,
        F.dropout: lambda x, p=0.5, training=True, inplace=False: x if not training or p == 0 else x._like(),
        F.silu: silu, F.normalize: normalize, F.gelu: lambda x, approximate="none": x._like(),
        F.softmax: lambda x, dim=None, dtype=None, **kw: x.softmax(dim, dtype),
        torch.softmax: lambda x, dim=None, dtype=None, **kw: x.softmax(dim, dtype),
        torch.addcmul: addcmul, torch.where: where, torch.isfinite: lambda x: x._like(dtype=torch.bool),
        torch.sigmoid: unary, torch.exp: unary, torch.tanh: unary, torch.rsqrt: unary, torch.clamp: unary,
        torch.cos: unary, torch.sin: unary, torch.add: binary, torch.mul: binary, torch.sub: binary,
        torch.maximum: binary, torch.minimum: binary, torch.permute: lambda x, dims: m.sym(x).permute(dims),
        torch.reshape: lambda x, shape: m.sym(x).reshape(shape), torch.flatten: lambda x, *a: m.sym(x).flatten(*a),
        torch.chunk: lambda x, c, dim=0: m.sym(x).chunk(c, dim), torch.transpose: lambda x, a, b: m.sym(x).transpose(a, b),
        torch.sum: lambda x, *a, **k: m.sym(x).sum(*a, **k), torch.mean: lambda x, *a, **k: m.sym(x).mean(*a, **k),
        torch.amax: lambda x, *a, **k: m.sym(x).amax(*a, **k),
    }
