"""The shape-only memory model (`vaecli.model.svd.memory`) against its oracle, the meta-device trace."""

import subprocess
import sys

import pytest
import torch

from helpers import make_video, tiny_config
from vaecli.model.svd import memory
from vaecli.model.svd.streaming import Pieces
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.memtrace import traced_peak_bytes, traced_peaks
from vaecli.model.plan import CostModel
from vaecli.model.svd.planning import Estimator

CONFIGS = {
    "conv-only": tiny_config(),
    "only-last-conv": tiny_config(time_mode="only-last-conv"),
    "image+quant+attn": tiny_config(time_mode="image", quant_conv=True, post_quant_conv=True, attn_levels=(0,)),
    "3 levels, odd widths": tiny_config(ch=32, ch_mult=(1, 3, 2), name="t3"),
}


def meta_vae(config, dtype):
    with torch.device("meta"):
        return VAE(config, AttentionBackend("sdpa")).to(dtype).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_clip_decode_and_encode_equal_the_trace(name, dtype):
    config = CONFIGS[name]
    vae = meta_vae(config, dtype)
    model = memory.Model(vae, dtype)
    for frames, h, w, batch in [(2, 8, 8, None), (3, 7, 9, None), (6, 8, 12, None), (9, 8, 8, 4), (10, 7, 9, 4)]:
        z = torch.empty(frames, config.latent_channels, h, w, device="meta", dtype=dtype)
        traced = traced_peak_bytes(lambda: vae.decode(z, frame_batch=batch))
        assert model.decode(frames, h, w, batch) == traced, (frames, h, w, batch)
    # one frame: the clip's views need no copy; the model's bound is above (never below) the trace
    z = torch.empty(1, config.latent_channels, 8, 8, device="meta", dtype=dtype)
    traced = traced_peak_bytes(lambda: vae.decode(z))
    assert traced <= model.decode(1, 8, 8) <= 1.05 * traced
    for frames, height, width in [(1, 32, 48), (2, 24, 16)]:
        x = torch.empty(frames, 3, height, width, device="meta", dtype=dtype)
        assert model.encode(frames, height, width) == traced_peak_bytes(lambda: vae.encode(x))


CUTS = [Pieces(2), Pieces(1), Pieces(4, None, None, 4), Pieces(1, 4, None, 4, keep=True), Pieces(1, 4, 2, 4),
        Pieces(2, 4, 1, 3), Pieces(3, None, 2, None), Pieces(1, 4, 1, 4, park=True),
        Pieces(2, None, None, None, park=True), Pieces(1, 3, 3, None, park=True, keep=True)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_peaks_match_the_trace_per_phase(name):
    """Every phase's peak within 1% below and 3% plus the latents' size above the trace: the model counts a few
    small statistics by size, and keeps decode_stream's view of the caller's latents alive throughout (the trace
    counts that view's whole storage while it lives); both err upwards."""
    config = CONFIGS[name]
    dtype = torch.bfloat16 if name == "conv-only" else torch.float32
    vae = meta_vae(config, dtype)
    model = memory.Model(vae, dtype)
    frames, h, w = 7, 8, 12
    z = torch.empty(frames, config.latent_channels, h, w, device="meta", dtype=dtype)
    latents = z.numel() * z.element_size()
    for pieces in CUTS:
        def run(set_phase):
            for _ in vae.decode_stream(z, pieces, sample_tiles=True, phase=set_phase):
                set_phase("out")
        traced, computed = traced_peaks(run), model.stream("decode", frames, h, w, pieces)
        for phase in ("", "2d", "temporal", "out"):
            if phase in traced:
                assert 0.99 * traced[phase] <= computed[phase] <= 1.03 * traced[phase] + latents, (pieces, phase)
    x = torch.empty(1, 3, 64, 48, device="meta", dtype=dtype)
    for pieces in (Pieces(1, 4), Pieces(1, 2, park=True), Pieces(1, 3, keep=True)):
        traced = traced_peak_bytes(lambda: vae.moments(x, pieces=pieces, sample_tiles=True))
        assert 0.99 * traced <= model.stream("encode", 1, 64, 48, pieces)[""] <= 1.03 * traced


def test_svd_size_streamed_rows_within_half_a_percent():
    """The docs' SVD rows (25 frames 576x1024, bf16): computed and traced agree within 0.5%."""
    from vaecli.model.svd.config import load_config

    config, dtype = load_config("svd-vae"), torch.bfloat16
    vae = meta_vae(config, dtype)
    z = torch.empty(25, 4, 72, 128, device="meta", dtype=dtype)
    for pieces in (Pieces(2, None, None, 16), Pieces(1, 16, None, 16, park=True)):
        traced = traced_peak_bytes(lambda: [None for _ in vae.decode_stream(z, pieces, sample_tiles=True)])
        computed = memory.Model(vae, dtype).stream("decode", 25, 72, 128, pieces)[""]
        assert abs(computed - traced) <= 0.005 * traced


def test_estimator_computes_where_covered_and_traces_elsewhere():
    sdpa, math_ = AttentionBackend("sdpa"), AttentionBackend("math")
    config = tiny_config()
    computed, traced = Estimator(config, torch.float32, CostModel()), Estimator(config, torch.float32, CostModel(), traced=True)
    # the traced line (2 and 3 frames, extrapolated) equals the computed peak on whole frames
    assert computed.activations("decode", sdpa, 6, 8, 8) == traced.activations("decode", sdpa, 6, 8, 8)
    assert computed._computed(sdpa) is not None and computed._computed(math_) is None
    assert memory.supported(tiny_config(time_mode="all"), "sdpa") is False
    with_attention = Estimator(tiny_config(time_mode="all"), torch.float32, CostModel())
    assert with_attention._computed(sdpa) is None
    assert with_attention.activations("decode", sdpa, 4, 8, 8) > 0  # traced


def test_vaecli_plan_does_not_trace(tmp_path):
    """`vaecli plan` prices every candidate from shapes: torch's lazy imports on the first meta operator (sympy,
    torch._dynamo; about a second) never happen."""
    video = tmp_path / "clip.mp4"
    make_video(video, n=12, width=64, height=48)
    code = ("import contextlib, io, json, sys\nfrom vaecli.cli import app\n"
            "def plan(*extra):\n    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n        try:\n            app([\"plan\", sys.argv[1], \"--json\", *extra])\n"
            "        except SystemExit:\n            pass\n    return out.getvalue()\n"
            "whole = json.loads(plan())\n"  # just below one clip and its batched 2D layers: streamed
            "print(plan(\"--max-memory\", str(whole['predicted_peak_bytes'] - (20 << 20))))\n"
            "print('sympy' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(video)], capture_output=True, text=True, check=True)
    assert '"strategy": "stream"' in out.stdout  # the streamed cut search ran
    assert out.stdout.strip().splitlines()[-1] == "False False"
