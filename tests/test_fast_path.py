"""The fast path's ops against plain torch: per-tap temporal matrix products vs Conv3d, fused norm+SiLU vs
GroupNorm then SiLU, layout independence of the blocks, gradients for training, and the Triton kernels (in
Triton's CPU interpreter, where Triton is installed)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import random_vae, randomize_, tiny_config
from vaecli.errors import UsageError
from vaecli.model.svd.blocks import Clips
from vaecli.model.svd.temporal import VideoResBlock
from vaecli.model.svd.vae import VAE
from vaecli.ops.conv import temporal_conv
from vaecli.ops.norm import clip_norm_silu, norm_silu, spatial_norm, temporal_norm

ROOT = Path(__file__).resolve().parent.parent
CL = torch.channels_last


def conv3d_reference(x, weight, bias):
    """x (b, t, H, W, C) -> Conv3d over (b, C, t, H, W) with 'same' zero padding -> (b, t, H, W, C)."""
    pad = tuple(k // 2 for k in weight.shape[2:])
    return F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=pad).permute(0, 2, 3, 4, 1)


@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 1, 1), (3, 3, 3)])
def test_temporal_conv_equals_conv3d(t, kernel):
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, 4, 6, 8, generator=gen)
    weight = torch.randn(16, 8, *kernel, generator=gen) / 5
    bias = torch.randn(16, generator=gen)
    residual = torch.randn(2, t, 4, 6, 16, generator=gen)
    alpha = torch.tensor([0.3])
    expected = conv3d_reference(x, weight, bias)
    assert (temporal_conv(x, weight, bias) - expected).abs().max() <= 1e-5
    assert (temporal_conv(x, weight, None) - conv3d_reference(x, weight, None)).abs().max() <= 1e-5
    fused = temporal_conv(x, weight, bias, residual=residual, scale=alpha)
    assert (fused - (residual + 0.3 * expected)).abs().max() <= 1e-5


def test_temporal_conv_gradients_match_conv3d():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, 8, generator=gen, requires_grad=True)
    weight = (torch.randn(8, 8, 3, 1, 1, generator=gen) / 5).requires_grad_()
    bias = torch.randn(8, generator=gen).requires_grad_()
    probe = torch.randn(2, 4, 3, 3, 8, generator=gen)
    grads = torch.autograd.grad((temporal_conv(x, weight, bias, residual=x) * probe).sum(), (x, weight, bias))
    refs = torch.autograd.grad(((x + conv3d_reference(x, weight, bias)) * probe).sum(), (x, weight, bias))
    for g, r in zip(grads, refs):
        assert (g - r).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_norm_silu_and_clip_norm_follow_their_definitions(dtype):
    gen = torch.Generator().manual_seed(4)
    norm = randomize_(spatial_norm(64), seed=5)
    x = (torch.randn(3, 64, 5, 7, generator=gen) * 4 + 2).to(dtype)
    for layout in (torch.contiguous_format, CL):
        out = norm_silu(norm.to(dtype), x.contiguous(memory_format=layout))
        assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
        ref = F.silu(F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-6))
        assert (out.float() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 0.05)
    tnorm = randomize_(temporal_norm(64), seed=6)
    clips = torch.randn(2, 3, 4, 5, 64, generator=gen).to(dtype)  # (b, t, H, W, C)
    out = clip_norm_silu(tnorm, clips)
    ref = F.silu(F.group_norm(clips.float().permute(0, 4, 1, 2, 3), 32, tnorm.weight, tnorm.bias, 1e-5))
    assert out.shape == clips.shape and out.dtype == dtype
    assert (out.float() - ref.permute(0, 2, 3, 4, 1)).abs().max() <= (1e-5 if dtype == torch.float32 else 0.05)


def test_blocks_give_the_same_numbers_in_either_memory_format():
    vae = random_vae(tiny_config("all", attn_levels=(1,)), seed=7)
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        decoder = vae.decoder
        a = decoder(z.contiguous(), Clips(3))
        b = decoder(z.contiguous(memory_format=CL), Clips(3))
        x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
        e1, e2 = vae.encoder(x.contiguous(), vae.attention), vae.encoder(x.contiguous(memory_format=CL), vae.attention)
    assert (a - b).abs().max() <= 1e-5 and (e1 - e2).abs().max() <= 1e-5
    assert vae.decode(z).is_contiguous(memory_format=CL)  # the model runs channels-last end to end


def test_training_only_the_temporal_layers_backpropagates():
    """torch's CPU group_norm backward crashes on channels-last input when only the affine parameters need
    gradients (the second training stage); the norms hand it a contiguous copy. Gradients match Conv3d's."""
    block = randomize_(VideoResBlock(32, 32, (3, 1, 1)), seed=10)
    for name, p in block.named_parameters():
        p.requires_grad_("time_stack" in name or name == "mix_factor")
    x = torch.randn(6, 32, 4, 4, generator=torch.Generator().manual_seed(11)).contiguous(memory_format=CL)
    out = block(x, Clips(3))
    out.square().mean().backward()
    grad = block.time_stack.out_layers[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="Triton is not installed")
def test_triton_group_norm_silu_in_the_interpreter():
    """The CUDA kernels, run by Triton's CPU interpreter: fp32 statistics, any channel count, both layouts of use."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from vaecli.ops.triton_norm import group_norm_silu
        torch.manual_seed(0)
        for shape, dtype, tol in [((2, 64, 5, 7), torch.float32, 1e-4), ((1, 128, 300, 1), torch.float16, 5e-3),
                                  ((3, 96, 4, 4), torch.bfloat16, 4e-2)]:
            x = (torch.randn(shape) * 3 + 50).to(dtype).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(shape[1]), torch.randn(shape[1])
            ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6))
            out = group_norm_silu(x, 32, w, b, 1e-6)
            assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
            err = (out.double() - ref).abs().max().item()
            assert err <= tol, (shape, dtype, err)
            plain = group_norm_silu(x, 32, None, None, 1e-6, silu=False)
            assert (plain.double() - F.group_norm(x.double(), 32, None, None, 1e-6)).abs().max() <= tol * 2
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("mode", ["conv-only", "all", "image"])
def test_frame_batches_give_the_same_frames_with_a_lower_peak(mode):
    vae = random_vae(tiny_config(mode, attn_levels=(1,)), seed=12)
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        whole = vae.decode(z, num_frames=3)
        for batch in (1, 2, 4):
            assert (vae.decode(z, num_frames=3, frame_batch=batch) - whole).abs().max() <= 1e-5
    from vaecli.ops.memtrace import traced_peak_bytes

    with torch.device("meta"):
        meta = VAE(tiny_config(mode, attn_levels=(1,)))
    zm = torch.empty(8, 4, 16, 16, device="meta")
    if mode == "all":  # its peak is in the temporal attention, which needs every frame of the clip
        return
    assert traced_peak_bytes(lambda: meta.decode(zm, frame_batch=2)) < 0.8 * traced_peak_bytes(lambda: meta.decode(zm))


def test_triton_probe_falls_back_with_a_reason(monkeypatch):
    """The kernels are used only after a probe on the device agreed with torch; a failure means torch's norm."""
    from vaecli.ops import triton_norm
    from vaecli.model.svd.planning import norm_kernels

    triton_norm.status.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_norm.importlib.util, "find_spec", lambda name: object())

    def broken(*args, **kwargs):
        raise RuntimeError("PTX compile failed (injected)")

    monkeypatch.setattr(triton_norm, "group_norm_silu", broken)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.ones(2, 64, 8, 8))  # no CUDA here: CPU stand-ins
    try:
        usable, why = triton_norm.status()
        assert not usable and "failed on this GPU" in why and "injected" in why
        assert "torch's kernels (Triton kernels failed" in norm_kernels(torch.device("cuda"))
    finally:
        triton_norm.status.cache_clear()
    assert norm_kernels(torch.device("cpu")) == "GroupNorm+SiLU: torch's kernels, SiLU in place"


def test_frame_batch_below_one_is_a_usage_error_for_encode_and_decode():
    vae = random_vae(tiny_config(), seed=14)
    with pytest.raises(UsageError, match="frame_batch must be at least 1, got 0"):
        vae.encode(torch.zeros(2, 3, 16, 16), frame_batch=0)
    with pytest.raises(UsageError, match="frame_batch must be at least 1, got 0"):
        vae.decode(torch.zeros(2, 4, 4, 4), frame_batch=0)
