"""The planner's memory model: the real code run under counting execution (`vaecli.ops.counting`), checked
against the meta-device trace (an independent oracle), against full (unsampled) runs, and for speed."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import make_video, tiny_config
from vaecli.model.plan import CostModel
from vaecli.model.svd import memory
from vaecli.model.svd.planning import Estimator
from vaecli.model.svd.streaming import Pieces
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.counting import count
from vaecli.ops.memtrace import traced_peak_bytes, traced_peaks

CPU = torch.device("cpu")
SDPA = AttentionBackend("sdpa")
CONFIGS = {
    "conv-only": tiny_config(),
    "only-last-conv": tiny_config(time_mode="only-last-conv"),
    "image+quant+attn": tiny_config(time_mode="image", quant_conv=True, post_quant_conv=True, attn_levels=(0,)),
    "3 levels, odd widths": tiny_config(ch=32, ch_mult=(1, 3, 2), name="t3"),
    "temporal attention": tiny_config(time_mode="all"),
}


def meta_vae(config, dtype):
    with torch.device("meta"):
        return VAE(config, SDPA).to(dtype).eval()


def kw(dtype):
    return dict(dtype=dtype, device=CPU, attention=SDPA)


def agree(counted: int, traced: int, vae) -> bool:
    """Counting against the meta trace: within 3% above, and below by at most the weights and 3%: the trace counts
    a view of a parameter (a flattened 1x1 weight, a temporal weight as matrices) as that parameter's storage,
    and meta kernels return some outputs channels-first, which costs copies a real device does not make."""
    weights = sum(t.numel() * t.element_size() for t in vae.state_dict().values())
    return traced - weights - 0.03 * traced <= counted <= 1.03 * traced


@pytest.mark.parametrize("name,dtype", [(name, torch.float32) for name in CONFIGS] + [("conv-only", torch.bfloat16)])
def test_one_clip_decode_and_encode_agree_with_the_trace(name, dtype):
    """Counting models the real channels-last run; the meta trace the same code on the meta device (`agree`)."""
    config = CONFIGS[name]
    vae = meta_vae(config, dtype)
    for frames, h, w, batch in [(2, 8, 8, None), (3, 7, 9, None), (6, 8, 12, None), (9, 8, 8, 4), (10, 7, 9, 4)]:
        z = torch.empty(frames, config.latent_channels, h, w, device="meta", dtype=dtype)
        traced = traced_peak_bytes(lambda: vae.decode(z.contiguous(memory_format=torch.channels_last),
                                                      frame_batch=batch))
        counted = memory.decode_peak(vae, frames, h, w, frame_batch=batch, **kw(dtype))
        assert agree(counted, traced, vae), (frames, h, w, batch, counted, traced)
    for frames, height, width in [(1, 32, 48), (2, 24, 16)]:
        x = torch.empty(frames, 3, height, width, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
        traced = traced_peak_bytes(lambda: vae.encode(x))
        counted = memory.encode_peak(vae, frames, height, width, **kw(dtype)).peak["device"]
        assert agree(counted, traced, vae), (frames, height, width, counted, traced)


CUTS = [Pieces(2), Pieces(4, None, None, 4), Pieces(1, 4, None, 4, keep=True), Pieces(2, 4, 1, 3),
        Pieces(3, None, 2, None)]
PARKED = [Pieces(1, 4, 1, 4, park=True), Pieces(1, 3, 3, None, park=True, keep=True)]


@pytest.mark.parametrize("name", ["conv-only", "temporal attention"])
def test_streamed_peaks_agree_with_the_trace_per_phase(name):
    config = CONFIGS[name]
    dtype = torch.bfloat16 if name == "conv-only" else torch.float32
    vae = meta_vae(config, dtype)
    frames, h, w = 5, 8, 12
    z = torch.empty(frames, config.latent_channels, h, w, device="meta", dtype=dtype)
    for pieces in CUTS:
        def run(set_phase):  # the latents made inside, as the counting run makes its input
            for _ in vae.decode_stream(z.contiguous(memory_format=torch.channels_last), pieces, sample_tiles=True,
                                       phase=set_phase):
                set_phase("out")
        traced = traced_peaks(run)
        ledger = memory.stream_peaks(vae, frames, h, w, pieces, **kw(dtype))
        counted = {"": ledger.peak["device"], **ledger.phases}
        for phase in ("", "2d", "temporal", "out"):
            if phase in traced:
                assert agree(counted[phase], traced[phase], vae), (pieces, phase, counted[phase], traced[phase])


@pytest.mark.parametrize("name", ["conv-only", "temporal attention"])
def test_sampled_runs_equal_full_runs(name):
    """The executor's representative pieces (`sample_tiles`) give the peaks of running every piece: the stated
    reason the planner may count only those."""
    config = CONFIGS[name]
    vae = meta_vae(config, torch.float32)
    frames, h, w = 7, 8, 12
    for pieces in CUTS + PARKED:
        def run(sample):
            def go(m):
                where = CPU if pieces.park else torch.device("cuda")
                z = m.new((frames, config.latent_channels, h, w), torch.float32, where, True)
                for _ in vae.decode_stream(z, pieces, sample_tiles=sample, phase=m.ledger.set_phase,
                                           device=torch.device("cuda")):
                    m.ledger.set_phase("out")
            ledger = count(go, "cuda")
            return {**ledger.peak, **ledger.phases}
        sampled, full = run(True), run(False)
        assert sampled.keys() == full.keys(), pieces
        assert (sampled["device"], sampled["host"]) == (full["device"], full["host"]), (pieces, sampled, full)
        # per phase at most the full run's: the phase peaks only guide the planner's search (`stream_pieces`
        # then checks the overall peak, which is exact)
        assert all(sampled[k] <= full[k] for k in full), (pieces, sampled, full)


def test_parked_clips_are_counted_on_the_host():
    config = CONFIGS["conv-only"]
    vae = meta_vae(config, torch.float32)
    cuda = torch.device("cuda")
    resident = memory.stream_peaks(vae, 8, 8, 12, Pieces(1, 4, 1, 4), dtype=torch.float32, device=cuda,
                                   attention=SDPA)
    parked = memory.stream_peaks(vae, 8, 8, 12, Pieces(1, 4, 1, 4, park=True), dtype=torch.float32, device=cuda,
                                 attention=SDPA)
    assert resident.peak["host"] == 0 and parked.peak["host"] > 0
    assert parked.peak["device"] < resident.peak["device"] <= parked.peak["device"] + parked.peak["host"]


def test_svd_size_rows():
    """The docs' SVD rows (25 frames 576x1024, bf16): counted within 1% of the trace (resident cut) and of the
    numbers docs/memory.md gives, in a fraction of a second each."""
    import time

    from vaecli.model.svd.config import load_config

    config, dtype = load_config("svd-vae"), torch.bfloat16
    vae = meta_vae(config, dtype)
    z = torch.empty(25, 4, 72, 128, device="meta", dtype=dtype)
    pieces = Pieces(2, None, None, 16)
    traced = traced_peak_bytes(lambda: [None for _ in vae.decode_stream(z, pieces, sample_tiles=True)])
    started = time.perf_counter()
    counted = memory.stream_peaks(vae, 25, 72, 128, pieces, dtype=dtype, device=torch.device("cuda"),
                                  attention=SDPA).peak["device"]
    assert abs(counted - traced) <= 0.01 * traced and time.perf_counter() - started < 30  # not a timing test:
    # a sanity bound far above the ~0.1 s it takes, so a pathological slowdown is caught
    parked = memory.stream_peaks(vae, 25, 72, 128, Pieces(1, 16, None, 16, park=True), dtype=dtype,
                                 device=torch.device("cuda"), attention=SDPA)
    assert 0.27 * (1 << 30) <= parked.peak["device"] <= 0.32 * (1 << 30)  # docs: 0.29 GiB on the device


def test_estimator_counts_every_backend_and_time_mode():
    for name in ("conv-only", "temporal attention"):
        est = Estimator(CONFIGS[name], torch.float32, CostModel())
        traced = Estimator(CONFIGS[name], torch.float32, CostModel(), traced=True)
        for backend in ("sdpa", "math", "split", "sub-quadratic"):
            b = AttentionBackend(backend, 1 << 20)
            counted, oracle = est.activations("decode", b, 4, 8, 8), traced.activations("decode", b, 4, 8, 8)
            assert agree(counted, oracle, est._model(b)), (name, backend, counted, oracle)
    math_ = Estimator(CONFIGS["conv-only"], torch.float32, CostModel())
    # math attention holds the score matrix: more than sdpa at the mid block's token count
    assert math_.activations("decode", AttentionBackend("math"), 2, 16, 16) > \
        math_.activations("decode", SDPA, 2, 16, 16)


def test_vaecli_plan_does_not_trace(tmp_path):
    """`vaecli plan` prices every candidate by counting: torch's lazy imports on the first meta operator (sympy,
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
    assert out.stdout.strip().endswith("False False")
    assert json.loads(out.stdout.splitlines()[0])["exact"] is True
