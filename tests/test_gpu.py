"""GPU-only checks (marked `gpu`, skipped without CUDA): half precision and every CUDA backend vs fp32 math."""

import pytest
import torch

from helpers import diffusers_temporal, latents, random_vae, tiny_config
from vaecli.ops.attention import AttentionBackend, math_attention, resolve_attention

pytestmark = pytest.mark.gpu


def psnr(a, b, peak=2.0):
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * torch.log10(torch.tensor(peak**2 / max(mse, 1e-20))).item()


@pytest.fixture(autouse=True)
def _no_tf32():
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decode_against_fp32(dtype):
    vae = random_vae(tiny_config(ch=64, ch_mult=(1, 2, 2)), seed=60).cuda()
    z = latents(6, 32, 32).cuda()
    with torch.no_grad():
        ref = vae.decode(z)
        low = vae.to(dtype).decode(z.to(dtype))
    assert torch.isfinite(low).all()
    assert psnr(low, ref) >= 40


@pytest.mark.parametrize("name", ["sdpa", "split", "sub-quadratic"])
def test_cuda_backends_equal_math(name):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1, 1024, 64, device="cuda", generator=g) for _ in range(3))
    assert (AttentionBackend(name)(q, k, v) - math_attention(q, k, v)).abs().max().item() <= 1e-5


def test_auto_on_cuda_is_sdpa():
    backend = resolve_attention("auto", "cuda", torch.float16)
    assert backend.name == "sdpa" and "cuda" in backend.reason


def test_cuda_fp32_matches_diffusers():
    config = tiny_config()
    vae = random_vae(config, seed=61)
    ref = diffusers_temporal(config, vae.state_dict()).cuda()
    vae = vae.cuda()
    z = latents(6, 16, 16).cuda()
    with torch.no_grad():
        assert (vae.decode(z, 3) - ref.decode(z, num_frames=3).sample).abs().max().item() <= 1e-4
