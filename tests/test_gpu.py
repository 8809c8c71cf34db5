"""GPU-only checks (marked `gpu`, skipped without CUDA): half precision and every CUDA backend vs fp32 math."""

import pytest
import torch

from helpers import diffusers_model, latents, random_vae, tiny_config
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
    ref = diffusers_model(config, vae.state_dict()).cuda()
    vae = vae.cuda()
    z = latents(6, 16, 16).cuda()
    with torch.no_grad():
        assert (vae.decode(z, 3) - ref.decode(z, num_frames=3).sample).abs().max().item() <= 1e-4


def test_svd_25_frames_576x1024_decode_under_4gib(tmp_path):
    """The memory planner's promise: a full SVD-size decode within --max-memory 4GiB."""
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from vaecli.cli import app
    from vaecli.model.config import load_config
    from vaecli.model.vae import VAE, randomize_weights_

    save_file(randomize_weights_(VAE(load_config("svd-vae"))).half().state_dict(), str(tmp_path / "svd.safetensors"))
    save_file({"latents": torch.randn(25, 4, 72, 128) * 0.18215}, str(tmp_path / "z.safetensors"))
    torch.cuda.reset_peak_memory_stats()
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "z.safetensors"), "-m", str(tmp_path / "svd.safetensors"),
                                      "--fps", "7", "--device", "cuda", "--dtype", "bf16", "--max-memory", "4GiB",
                                      "-o", str(tmp_path / "out.mp4"), "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["predicted_peak_bytes"] <= 4 << 30
    assert torch.cuda.max_memory_allocated() <= 4 << 30


@pytest.mark.parametrize("stage,frames,hw,dtype", [("decode", 14, (576, 1024), torch.bfloat16),
                                                   ("decode", 4, (720, 1280), torch.float16),
                                                   ("encode", 8, (576, 1024), torch.bfloat16)])
def test_cost_model_within_15_percent_of_cuda_peak(stage, frames, hw, dtype):
    from vaecli.model.config import load_config
    from vaecli.model.vae import VAE, randomize_weights_
    from vaecli.pipeline.planner import Estimator

    config = load_config("svd-vae")
    vae = randomize_weights_(VAE(config, AttentionBackend("sdpa"))).to("cuda", dtype).eval()
    if stage == "decode":
        x = torch.randn(frames, 4, hw[0] // 8, hw[1] // 8, device="cuda", dtype=dtype)
        call = lambda: vae.decode(x)  # noqa: E731
        size = (hw[0] // 8, hw[1] // 8)
    else:
        x = torch.rand(frames, 3, *hw, device="cuda", dtype=dtype) * 2 - 1
        call = lambda: vae.encode(x)  # noqa: E731
        size = hw
    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        measured = torch.cuda.max_memory_allocated() - base
    predicted = Estimator(config, dtype, device_type="cuda").activations(stage, AttentionBackend("sdpa"), frames, *size)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
