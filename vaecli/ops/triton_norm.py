"""GroupNorm (+ SiLU) as two Triton kernels for channels-last CUDA tensors, statistics in fp32.

Layout: x is `(N, C, H, W)` channels-last, i.e. memory `(N, H·W, C)` (the clip view `(b, C, t·H·W, 1)` of the
temporal norms is the same thing). Pass 1 reads x once per group and chunk of pixels and writes each chunk's
mean and sum of squared deviations; the chunks are merged in fp32 (Chan's parallel formula, stable for large
means); pass 2 reads x once and writes silu((x - μ)·rstd·γ + β) once in x's dtype. Compared with torch's
group_norm followed by an in-place SiLU this saves two of five passes over the activations.

Inference only (no autograd); `norm_silu` uses it on CUDA when Triton is importable and no gradient is needed.
The kernels also run in Triton's CPU interpreter (`TRITON_INTERPRET=1`), which the tests use without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def available() -> bool:
    """Whether the kernels can be used here: Triton is importable and, on CUDA, they compile and agree with
    torch on a small input (probed once per process, on first use; see `status`)."""
    return status()[0]


@functools.cache
def status() -> tuple[bool, str]:
    """(usable, why): the result of the one-time probe. A kernel that fails to compile or disagrees with
    torch's group_norm on this GPU is never used; the model then runs torch's group_norm and an in-place SiLU."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        x = torch.randn(2, 64, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last) * 3 + 1
        w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
        with torch.no_grad():
            got = group_norm_silu(x, 32, w, b, 1e-6)
            want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-6))
        error = (got - want).abs().max().item()
    except Exception as e:  # a compiler or driver problem: fall back to torch, say why  # noqa: BLE001
        return False, f"Triton kernels failed on this GPU: {type(e).__name__}: {e}"[:300]
    if not error <= 1e-3:
        return False, f"Triton kernels disagree with torch on this GPU (max |Δ| {error:.2e})"
    return True, "Triton GroupNorm+SiLU kernels"


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: a 4-D channels-last tensor that needs no gradient."""
    return (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and x.requires_grad))


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x)) (or the norm alone, `silu=False`) for channels-last `x` (N, C, H, W) -> same layout."""
    import triton

    from vaecli.ops import _triton_kernels as kernels

    n, channels, height, width = x.shape
    pixels = height * width
    per_group = channels // groups
    block_cg = triton.next_power_of_2(per_group)
    block_p = max(16, min(1024, 4096 // block_cg))
    chunk = 8 * block_p  # pixels per program in pass 1
    chunks = triton.cdiv(pixels, chunk)
    partial = torch.empty(n, groups, chunks, 2, device=x.device, dtype=torch.float32)
    kernels.group_stats[(n, groups, chunks)](x, partial, pixels, channels, per_group, groups, chunk, chunks,
                                             BLOCK_P=block_p, BLOCK_CG=block_cg)
    counts = (torch.clamp(pixels - torch.arange(chunks, device=x.device) * chunk, max=chunk) * per_group).float()
    means, m2s = partial[..., 0], partial[..., 1]  # (N, groups, chunks)
    mean = (means * counts).sum(-1) / (pixels * per_group)
    m2 = m2s.sum(-1) + (counts * (means - mean[..., None]) ** 2).sum(-1)
    rstd = torch.rsqrt(m2 / (pixels * per_group) + eps)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(channels)
    rows = max(1, min(64, 8192 // block_c))
    has_affine = weight is not None
    kernels.group_apply[(n, triton.cdiv(pixels, rows))](
        x, out, mean.contiguous(), rstd.contiguous(), weight if has_affine else mean, bias if has_affine else mean,
        pixels, channels, per_group, groups, BLOCK_P=rows, BLOCK_C=block_c, AFFINE=has_affine, SILU=silu)
    return out
