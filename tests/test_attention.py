"""Every attention backend against the math backend, and backend resolution."""

import pytest
import torch

from helpers import latents, random_vae, tiny_config
from vaecli.errors import BackendError, UsageError
from vaecli.ops import attention as att
from vaecli.ops.attention import AttentionBackend, resolve_attention


def qkv(batch=2, heads=3, n_q=77, n_k=77, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=g).to(dtype) for n in (n_q, n_k, n_k))


@pytest.mark.parametrize("name", ["sdpa", "split", "sub-quadratic"])
@pytest.mark.parametrize("shape", [dict(), dict(n_q=5, n_k=300), dict(batch=1, heads=1, n_q=1100, n_k=1100, d=8)])
def test_backend_equals_math(name, shape):
    q, k, v = qkv(**shape)
    expected = att.math_attention(q, k, v)
    got = AttentionBackend(name)(q, k, v)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fn", [att.split_attention, att.sub_quadratic_attention])
def test_chunked_backends_with_tiny_budgets_still_equal_math(fn):
    q, k, v = qkv(n_q=1100, n_k=1100, d=8, batch=1, heads=2)
    expected = att.math_attention(q, k, v)
    for budget in (1, 4096, 100_000):  # forces one query row, a few rows, many rows per slice
        assert (fn(q, k, v, budget) - expected).abs().max().item() <= 1e-5


def test_math_matches_a_handwritten_softmax():
    q, k, v = qkv(batch=1, heads=1, n_q=4, n_k=6, d=2)
    w = torch.exp(q[0, 0] @ k[0, 0].T / 2**0.5)
    expected = (w / w.sum(-1, keepdim=True)) @ v[0, 0]
    assert torch.allclose(att.math_attention(q, k, v)[0, 0], expected, atol=1e-6)


def test_half_precision_backends_stay_close():
    q, k, v = qkv(dtype=torch.bfloat16)
    ref = att.math_attention(q.float(), k.float(), v.float())
    for name in ("math", "sdpa", "split", "sub-quadratic"):
        out = AttentionBackend(name)(q, k, v)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max().item() < 0.05, name


@pytest.mark.parametrize("mode", ["conv-only", "all"])
@pytest.mark.parametrize("name", ["sdpa", "split", "sub-quadratic"])
def test_whole_model_with_each_backend_equals_math(mode, name):
    config = tiny_config(mode, attn_levels=(1,))
    z = latents(4, 8, 8)
    with torch.no_grad():
        expected = random_vae(config, seed=7, attention="math").decode(z, 2)
        got = random_vae(config, seed=7, attention=name).decode(z, 2)
    assert (got - expected).abs().max().item() <= 1e-4


def test_auto_resolves_once_with_a_reason():
    backend = resolve_attention("auto", "cpu", torch.float32, free_bytes=8 << 30)
    assert backend.name == "sdpa" and "auto" in backend.reason
    assert backend.budget == 2 << 30
    assert "sdpa" in backend.describe()


def test_explicit_names_and_budgets():
    backend = resolve_attention("split", "cpu", free_bytes=1 << 30)
    assert backend.name == "split" and backend.budget == 256 << 20 and "user" in backend.reason
    assert resolve_attention("sub-quadratic", "cpu", free_bytes=0).budget == att.MIN_BUDGET


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown attention backend 'flash3'.*sub-quadratic"):
        resolve_attention("flash3", "cpu")


def test_xformers_is_refused_where_it_cannot_run():
    with pytest.raises(BackendError, match="xformers"):
        resolve_attention("xformers", "cpu")


def test_backends_get_unit_stride_inputs(monkeypatch):
    """A channels-first conv output viewed as tokens is strided; fused SDPA kernels would fall back to O(N²)."""
    seen = []

    def spy(q, k, v, budget):
        seen.extend(t.stride(-1) for t in (q, k, v))
        return att.math_attention(q, k, v)

    monkeypatch.setitem(att._FUNCTIONS, "sdpa", spy)
    vae = random_vae(tiny_config("all"), seed=8, attention="sdpa")
    with torch.no_grad():
        vae.decode(latents(4, 4, 4), 2)
    assert seen and set(seen) == {1}
