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
    from vaecli.model.svd.config import load_config
    from vaecli.model.svd.vae import VAE, randomize_weights_

    save_file(randomize_weights_(VAE(load_config("svd-vae"))).half().state_dict(), str(tmp_path / "svd.safetensors"))
    save_file({"latents": torch.randn(25, 4, 72, 128) * 0.18215}, str(tmp_path / "z.safetensors"))
    torch.cuda.reset_peak_memory_stats()
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "z.safetensors"), "-m", str(tmp_path / "svd.safetensors"),
                                      "--fps", "7", "--device", "cuda", "--dtype", "bf16", "--max-memory", "4GiB",
                                      "-o", str(tmp_path / "out.mp4"), "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["predicted_peak_bytes"] <= 4 << 30 and plan["exact"]
    assert torch.cuda.max_memory_allocated() <= 4 << 30


def test_streaming_on_cuda_with_a_parked_clip_equals_one_clip():
    """Pinned host parking, copies both ways, in-place temporal updates on the device."""
    from vaecli.model.svd.config import VAEConfig
    from vaecli.model.svd.streaming import Pieces
    from vaecli.model.svd.vae import VAE, randomize_weights_

    config = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, time_mode="conv-only")
    vae = randomize_weights_(VAE(config, AttentionBackend("sdpa")), 3).to("cuda").eval()
    z = torch.randn(7, 4, 18, 22, device="cuda")
    with torch.inference_mode():
        ref = vae.decode(z)
        for pieces in (Pieces(2, time_tile=8), Pieces(1, 6, 3, 6, park=True, keep=True), Pieces(3, park=True)):
            assert (vae.decode(z, pieces=pieces) - ref).abs().max().item() <= 1e-4, pieces


@pytest.mark.parametrize("stage,frames,hw,dtype", [("decode", 14, (576, 1024), torch.bfloat16),
                                                   ("decode", 4, (720, 1280), torch.float16),
                                                   ("encode", 8, (576, 1024), torch.bfloat16)])
def test_cost_model_within_15_percent_of_cuda_peak(stage, frames, hw, dtype):
    from vaecli.model.svd.config import load_config
    from vaecli.model.svd.vae import VAE, randomize_weights_
    from vaecli.model.svd.planning import Estimator

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


# ------------------------------------------------------------------------------------------ the fast path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(14, 128, 72, 128), (2, 512, 9, 16), (1, 256, 4000, 1)])
def test_triton_group_norm_silu_on_cuda(dtype, shape):
    from vaecli.ops import triton_norm

    if not triton_norm.available():
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=gen) * 3 + 20).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    out = triton_norm.group_norm_silu(x, 32, w, b, 1e-6)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 32, w.double(), b.double(), 1e-6))
    tol = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}[dtype]
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_svd_config_half_vs_fp32_reference_40db(dtype):
    """The SVD architecture (random weights) at 144x256, bf16/fp16 with Triton norms and frame batches, against
    the fp32 model with TF32 off: ≥ 40 dB, no inf/NaN."""
    from vaecli.model.svd.config import load_config
    from vaecli.model.svd.vae import VAE, randomize_weights_

    state = randomize_weights_(VAE(load_config("svd-vae"))).state_dict()
    ref = VAE(load_config("svd-vae"), AttentionBackend("math"))
    ref.load_state_dict(state)
    ref = ref.cuda().eval()
    fast = VAE(load_config("svd-vae"))
    fast.load_state_dict(state)
    fast = fast.to("cuda", dtype).eval()
    z = torch.randn(8, 4, 18, 32, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        want = ref.decode(z)
        got = fast.decode(z.to(dtype), frame_batch=4).float()
    assert torch.isfinite(got).all() and psnr(got, want) >= 40


def test_fast_path_matches_diffusers_in_bf16():
    """vaecli's fast path and diffusers, same weights in bf16, both close to their fp32 selves and to each other."""
    config = tiny_config(ch_mult=(1, 2, 2))
    vae = random_vae(config, seed=5, attention="sdpa").cuda()
    ref = diffusers_model(config, vae.state_dict()).cuda()
    z = latents(6, 16, 16).cuda()
    with torch.inference_mode():
        ours = vae.to(torch.bfloat16).decode(z.bfloat16(), frame_batch=2).float()
        theirs = ref.to(torch.bfloat16).decode(z.bfloat16(), num_frames=6).sample.float()
    assert (ours - theirs).abs().mean() < 0.02
