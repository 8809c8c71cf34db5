"""Attention backends: one signature, chosen once, passed down as a value.

Every backend computes softmax(q kᵀ / √d) v on tensors laid out `(B, heads, N, d)` and returns
`(B, heads, N_q, d)` in the dtype of `v`:

- `math`: the reference; materialises the full `(B, heads, N_q, N_k)` score matrix (softmax in fp32).
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels where torch has them).
- `split`: the math backend over slices of the queries, each slice's scores within `max_bytes`.
- `sub-quadratic`: chunked keys and values with an online (running max and sum) softmax, O(N) memory.
- `xformers`: `xformers.ops.memory_efficient_attention`, only where xformers is importable and the device is CUDA.

`resolve_attention("auto", device, dtype, ...)` picks one and says why; the result is an `AttentionBackend`
value that the model keeps and reports. Nothing here is global.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vaecli.errors import BackendError, UsageError

BACKEND_NAMES = ("math", "sdpa", "split", "sub-quadratic", "xformers")
MIN_BUDGET = 16 << 20  # never plan attention scratch space below 16 MiB


@dataclass(frozen=True)
class AttentionBackend:
    """A chosen attention backend and its parameters.

    name: one of BACKEND_NAMES.
    max_bytes: scratch budget for score matrices (`split`, `sub-quadratic`); None = 1 GiB.
    reason: why this backend was chosen (printed by `--json` and `vaecli plan`).
    """

    name: str = "sdpa"
    max_bytes: int | None = None
    reason: str = ""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, heads, N_q, d), k and v: (B, heads, N_k, d) -> (B, heads, N_q, d).

        Inputs whose last axis is strided (a channels-first conv output viewed as tokens) are made contiguous
        first: torch's fused SDPA kernels need unit stride there and otherwise fall back to the O(N²) math path.
        """
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return _FUNCTIONS[self.name](q, k, v, self.budget)

    @property
    def budget(self) -> int:
        return max(MIN_BUDGET, self.max_bytes if self.max_bytes is not None else 1 << 30)

    def describe(self) -> str:
        extra = f" (budget {self.budget >> 20} MiB)" if self.name in ("split", "sub-quadratic") else ""
        return f"{self.name}{extra}" + (f": {self.reason}" if self.reason else "")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int = 0) -> torch.Tensor:
    """Reference attention: full score matrix, softmax in fp32."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, heads, N_q, N_k)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int = 0) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int) -> torch.Tensor:
    """Math attention over slices of the queries; one slice's scores (plus fp32 softmax) fit in `budget`."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[-2]
    bytes_per_row = batch * heads * n_k * (q.element_size() + 4)
    rows = max(1, budget // bytes_per_row)
    if rows >= n_q:
        return math_attention(q, k, v)
    out = torch.empty(batch, heads, n_q, v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, n_q, rows):
        out[:, :, start : start + rows] = math_attention(q[:, :, start : start + rows], k, v)
    return out


def sub_quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int) -> torch.Tensor:
    """Online-softmax attention: queries in chunks, keys/values in chunks, running max and sum in fp32.

    Peak scratch is one (B, heads, q_chunk, kv_chunk) fp32 block plus the fp32 accumulator of a query chunk.
    """
    batch, heads, n_q, d = q.shape
    n_k = k.shape[-2]
    scale = d**-0.5
    kv_chunk = min(n_k, 1024)
    q_chunk = max(1, min(n_q, budget // max(1, batch * heads * (kv_chunk * 8 + d * 4))))
    out = torch.empty(batch, heads, n_q, v.shape[-1], dtype=v.dtype, device=v.device)
    for qs in range(0, n_q, q_chunk):
        q_c = q[:, :, qs : qs + q_chunk].float() * scale  # (B, heads, q, d)
        running_max = torch.full(q_c.shape[:-1] + (1,), -math.inf, device=q.device)
        running_sum = torch.zeros_like(running_max)
        acc = torch.zeros(q_c.shape[:-1] + (v.shape[-1],), device=q.device)
        for ks in range(0, n_k, kv_chunk):
            scores = torch.matmul(q_c, k[:, :, ks : ks + kv_chunk].float().transpose(-1, -2))  # (B, heads, q, kv)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            correction = torch.exp(running_max - new_max)
            probs = torch.exp(scores - new_max)
            running_sum = running_sum * correction + probs.sum(dim=-1, keepdim=True)
            acc = acc * correction + torch.matmul(probs, v[:, :, ks : ks + kv_chunk].float())
            running_max = new_max
        out[:, :, qs : qs + q_chunk] = (acc / running_sum).to(v.dtype)
    return out


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int = 0) -> torch.Tensor:
    import xformers.ops  # only reached when resolve_attention found it importable

    # xformers wants (B, N, heads, d)
    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "math": math_attention,
    "sdpa": sdpa_attention,
    "split": split_attention,
    "sub-quadratic": sub_quadratic_attention,
    "xformers": xformers_attention,
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend `name` works on `device`, else a sentence saying why not."""
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed (pip install xformers)"
        if device.type != "cuda":
            return "xformers runs on CUDA devices only"
    if name == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
        return "this torch has no scaled_dot_product_attention"
    return None


def math_scores_bytes(batch_heads: int, tokens_q: int, tokens_k: int, dtype: torch.dtype) -> int:
    """Bytes of the score matrix the math backend materialises (scores in `dtype` plus fp32 softmax)."""
    return batch_heads * tokens_q * tokens_k * (torch.finfo(dtype).bits // 8 + 4)


def resolve_attention(
    name: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    free_bytes: int | None = None,
    tokens: int | None = None,
    batch_heads: int = 1,
) -> AttentionBackend:
    """Turn a user's backend name into an `AttentionBackend` for this device and dtype.

    `auto` takes `sdpa` (torch's fused kernels, O(N) memory on CUDA and CPU). When `tokens` is known and
    the math score matrix would fit in a tenth of the free memory, small problems also go to `sdpa`; only
    where sdpa is missing does `auto` fall back to `sub-quadratic`. The split and sub-quadratic budgets are a
    quarter of `free_bytes` (what the device reports when not given).
    """
    device = torch.device(device)
    if name not in BACKEND_NAMES and name != "auto":
        raise UsageError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKEND_NAMES)}")
    if free_bytes is None:
        from vaecli.ops.device import free_memory

        free_bytes = free_memory(device)
    budget = max(MIN_BUDGET, free_bytes // 4)
    if name != "auto":
        why_not = unavailable_reason(name, device)
        if why_not:
            raise BackendError(f"attention backend {name!r} is not available: {why_not}")
        return AttentionBackend(name, budget, "chosen by the user")
    if unavailable_reason("sdpa", device) is None:
        kind = "flash/memory-efficient kernels" if device.type == "cuda" else "fused CPU kernel"
        return AttentionBackend("sdpa", budget, f"auto: torch SDPA ({kind}) on {device.type}")
    if tokens is not None and math_scores_bytes(batch_heads, tokens, tokens, dtype) * 10 <= free_bytes:
        return AttentionBackend("math", budget, "auto: no SDPA in this torch; the score matrix is small")
    return AttentionBackend("sub-quadratic", budget, "auto: no SDPA in this torch; O(N) memory")
