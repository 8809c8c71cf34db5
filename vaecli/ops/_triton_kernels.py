"""The Triton kernels behind `vaecli.ops.triton_norm` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def group_stats(x_ptr, partial_ptr, pixels, channels, per_group, groups, chunk, chunks,
                BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Program (n, g, k): mean and sum of squared deviations of group g over pixels [k·chunk, (k+1)·chunk)."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    k = tl.program_id(2)
    start = k * chunk
    end = tl.minimum(start + chunk, pixels)
    cols = tl.arange(0, BLOCK_CG)
    col_ok = cols < per_group
    base = x_ptr + n * pixels * channels + g * per_group
    acc = tl.zeros([BLOCK_P, BLOCK_CG], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < end) & col_ok[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * channels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    count = ((end - start) * per_group).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    acc2 = tl.zeros([BLOCK_P, BLOCK_CG], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < end) & col_ok[None, :]
        v = tl.load(base + rows[:, None].to(tl.int64) * channels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - mean, 0.0)
        acc2 += d * d
    m2 = tl.sum(tl.sum(acc2, axis=1), axis=0)
    out = partial_ptr + ((n * groups + g) * chunks + k) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def group_apply(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, pixels, channels, per_group, groups,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr):
    """Program (n, block): y = silu((x - mean)·rstd·w + b) for BLOCK_P pixels of frame n, all channels."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    mask = (rows[:, None] < pixels) & col_ok[None, :]
    offsets = n * pixels * channels + rows[:, None] * channels + cols[None, :]
    v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    group = cols // per_group
    mu = tl.load(mean_ptr + n * groups + group, mask=col_ok, other=0.0)
    scale = tl.load(rstd_ptr + n * groups + group, mask=col_ok, other=0.0)
    if AFFINE:
        scale = scale * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        shift = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) - mu * scale
    else:
        shift = -mu * scale
    y = v * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
