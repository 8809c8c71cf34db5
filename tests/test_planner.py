"""Cost model, planner, temporal windows, tiles and OOM recovery."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import make_video, random_vae, read_video, tiny_config
from vaecli.cli import app
from vaecli.errors import UsageError
from vaecli.model.svd.config import load_config
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.memtrace import traced_peak_bytes
from vaecli.model.svd.streaming import Pieces
from vaecli.pipeline.chunking import WindowBlender, crossfade_weights, windows
from vaecli.model.plan import CostModel
from vaecli.model.svd.planning import FALLBACK_OVERLAP, FALLBACK_WINDOW, Estimator, plan_decode, plan_encode
from vaecli.pipeline.planner import parse_bytes

CPU = torch.device("cpu")
TINY8 = tiny_config(ch_mult=(1, 1, 1, 1), num_res_blocks=1, name="tiny8")


# ----------------------------------------------------------------------------------------------- cost model


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096 and parse_bytes(None) is None
    with pytest.raises(UsageError, match="must look like"):
        parse_bytes("lots")


def test_trace_counts_live_tensors_exactly():
    def fn():
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # 8000 live (a freed)
        return c.sum()

    assert traced_peak_bytes(fn) == 8004  # b and c, then the 4-byte sum while both are alive


def test_trace_counts_no_view_of_a_tensor_made_before_it():
    x = torch.empty(1000, device="meta")
    assert traced_peak_bytes(lambda: x[:10].view(2, 5).to(torch.float32)) == 0  # views share x's storage
    assert traced_peak_bytes(lambda: x[:10] + 1) == 40
    assert traced_peak_bytes(lambda: x[:10].clone().transpose(0, 0)) == 40  # a view of a new tensor: counted once


def test_traced_peak_is_linear_in_frames_and_math_attention_costs_its_scores():
    config = tiny_config()
    with torch.device("meta"):
        sdpa, math_ = VAE(config, AttentionBackend("sdpa")), VAE(config, AttentionBackend("math"))
    z = lambda t: torch.empty(t, 4, 16, 16, device="meta")  # noqa: E731
    peaks = [traced_peak_bytes(lambda: sdpa.decode(z(t))) for t in (2, 3, 5, 8)]
    per_frame = peaks[1] - peaks[0]
    assert per_frame > 0 and all(p == peaks[0] + per_frame * (t - 2) for p, t in zip(peaks, (2, 3, 5, 8)))
    # one frame has no temporal neighbours: below the line the planner extrapolates to it
    assert traced_peak_bytes(lambda: sdpa.decode(z(1))) <= peaks[0] - per_frame
    wide = torch.empty(2, 4, 32, 32, device="meta")  # scores (2·1024² fp32 = 8 MiB) dominate at this size
    extra = traced_peak_bytes(lambda: math_.decode(wide)) - traced_peak_bytes(lambda: sdpa.decode(wide))
    assert extra >= 0.95 * 2 * 1024 * 1024 * 4  # about the fp32 score matrices of 2 frames of 32x32 tokens


def test_cost_model_is_applied():
    est = Estimator(tiny_config(), torch.float32, CostModel(scale=2.0, overhead=1000))
    raw = Estimator(tiny_config(), torch.float32, CostModel())
    b = AttentionBackend("sdpa")
    assert est.activations("decode", b, 3, 8, 8) == 2 * raw.activations("decode", b, 3, 8, 8) + 1000


# ----------------------------------------------------------------------------------------------- plans


def plan_size(plan):
    """Order plans by how much they hold at once: one clip > streamed resident > streamed parked > windows."""
    if plan.strategy == "one-clip":
        return (3, 0, 0, 0)
    if plan.strategy == "windows":
        return (0, 0, 0, 0)
    p = plan.pieces
    return (2 - p.park, p.frames * (p.tile or 10**4) ** 2, (p.time_frames or 10**3) * (p.time_tile or 10**4) ** 2, 0)


def test_decode_plans_are_exact_shrink_with_the_budget_and_fit():
    config = load_config("svd-vae")
    est = Estimator(config, torch.bfloat16, device_type="cuda")
    previous = None
    for gib in (64, 16, 8, 5, 2, 1, 0.5):
        budget = int(gib * (1 << 30))
        plan = plan_decode(config, 25, (72, 128), device=torch.device("cuda"), dtype=torch.bfloat16,
                           available_bytes=budget, estimator=est, host_bytes=64 << 30)
        assert plan.fits and plan.activation_bytes <= budget and plan.exact, (gib, plan.to_dict())
        assert plan.to_dict()["exact"] is True
        if previous is not None:
            assert plan_size(plan)[:2] <= plan_size(previous)[:2], (gib, plan.to_dict())
        previous = plan
    assert plan.strategy == "stream" and plan.pieces.park and plan.host_bytes > 0
    # without host memory to park in, the fallback is the fixed approximate windows, and it says so
    plan = plan_decode(config, 25, (72, 128), device=torch.device("cuda"), dtype=torch.bfloat16,
                       available_bytes=int(0.5 * (1 << 30)), estimator=est, host_bytes=None)
    assert plan.strategy == "windows" and not plan.exact and plan.to_dict()["exact"] is False
    assert (plan.chunk_frames, plan.overlap) == (FALLBACK_WINDOW, FALLBACK_OVERLAP)
    assert "APPROXIMATE" in " ".join(plan.reasons) and "dB" in " ".join(plan.reasons)


def test_decode_strategies_in_order():
    config = tiny_config()
    kw = dict(device=CPU, dtype=torch.float32, cost=CostModel())
    big = plan_decode(config, 12, (32, 32), available_bytes=64 << 30, **kw)
    assert (big.strategy, big.chunk_frames, big.overlap, big.pieces, big.exact) == ("one-clip", 12, 0, None, True)
    assert big.frame_batch is None  # on CPU the 2D layers are batched only where a plan needs it
    one = big.activation_bytes
    # just below the unbatched line: still one clip, priced exactly with the 2D layers batched
    batched = plan_decode(config, 12, (32, 32), available_bytes=one - 1, **kw)
    assert (batched.strategy, batched.frame_batch) == ("one-clip", 4) and batched.activation_bytes < one
    assert "2D layers 4 frames at a time" in " ".join(batched.reasons)
    below = int(batched.activation_bytes * 0.8)
    mid = plan_decode(config, 12, (32, 32), available_bytes=below, **kw)
    assert mid.strategy == "stream" and mid.exact and mid.activation_bytes <= below and not mid.pieces.park
    small = plan_decode(config, 12, (32, 32), available_bytes=one // 3, **kw)
    assert small.strategy == "stream" and small.exact and small.activation_bytes <= one // 3
    assert plan_size(small) < plan_size(mid)
    # on a CPU device nothing is parked: when even the smallest pieces do not fit, fixed approximate windows
    tiny = plan_decode(config, 40, (32, 32), available_bytes=1, **kw)
    assert tiny.strategy == "windows" and not tiny.exact and tiny.chunk_frames == FALLBACK_WINDOW


def test_forced_plans():
    config = tiny_config()
    kw = dict(device=CPU, dtype=torch.float32, available_bytes=64 << 30)
    plan = plan_decode(config, 10, (8, 8), chunk=4, overlap=0, **kw)
    assert (plan.strategy, plan.chunk_frames, plan.overlap, plan.exact) == ("windows", 4, 0, False)
    assert "independent clips" in " ".join(plan.reasons)
    assert plan_decode(config, 10, (8, 8), chunk=0, **kw).strategy == "one-clip"
    plan = plan_decode(config, 10, (8, 8), tile=4, **kw)
    assert plan.strategy == "stream" and plan.exact and plan.pieces.tile == 4 and plan.pieces.time_tile == 4
    plan = plan_decode(config, 10, (8, 8), chunk=4, tile=4, **kw)
    assert plan.strategy == "windows" and not plan.exact and plan.pieces.tile == 4
    assert plan_decode(config, 10, (8, 8), attention="split", **kw).attention.name == "split"
    with pytest.raises(UsageError, match="--overlap 4 must be smaller than --chunk 4"):
        plan_decode(config, 10, (8, 8), chunk=4, overlap=4, **kw)
    tight = plan_decode(config, 10, (8, 8), chunk=0, device=CPU, dtype=torch.float32, available_bytes=1000)
    assert not tight.fits and "exceeds the budget" in " ".join(tight.reasons)


def test_plans_do_not_depend_on_free_memory_for_their_pixels():
    """Exact plans give the same frames whatever they are; an approximate fallback has a fixed window."""
    config = tiny_config()
    kw = dict(device=CPU, dtype=torch.float32, cost=CostModel())
    cuts = {(p.strategy, p.chunk_frames, p.overlap) for p in
            (plan_decode(config, 40, (16, 16), available_bytes=b, **kw) for b in (1, 1000, 1 << 16))
            if not p.exact}
    assert cuts == {("windows", FALLBACK_WINDOW, FALLBACK_OVERLAP)}


def test_stream_memory_prediction_bounds_the_full_run():
    """The planner prices streamed plans by counting a sampled run (representative pieces per loop); a full run
    (every piece) and, for resident clips, the full meta trace are the oracles."""
    from vaecli.ops.counting import count
    from vaecli.ops.memtrace import traced_peak_bytes

    config = tiny_config("all", ch_mult=(1, 2, 2), attn_levels=(1,))
    est = Estimator(config, torch.float32, CostModel())
    with torch.device("meta"):
        vae = VAE(config, AttentionBackend("sdpa"))
    weights = sum(t.numel() * t.element_size() for t in vae.state_dict().values())
    z = torch.empty(6, 4, 12, 16, device="meta")
    for pieces in (Pieces(2), Pieces(1, 6, 3, 6, keep=True), Pieces(3, 6, None, 8, park=True)):
        def full(m):
            zz = m.new((6, 4, 12, 16), torch.float32, CPU, True)
            for _ in vae.decode_stream(zz, pieces, device=CPU):
                pass
        sampled = est.stream("decode", AttentionBackend("sdpa"), 6, 12, 16, pieces)
        assert sampled == count(full, CPU).peak["device"], pieces
        if pieces.frames == 2:  # the trace counts views of parameters as their storage: up to the weights above
            traced = traced_peak_bytes(lambda: [None for _ in vae.decode_stream(z, pieces)])
            assert traced - weights - 0.005 * traced <= sampled <= 1.005 * traced, (pieces, sampled, traced)
    for pieces in (Pieces(1, 6), Pieces(1, 6, park=True)):
        def full_encode(m):
            x = m.new((1, 3, 96, 80), torch.float32, CPU, True)
            vae.moments(x, pieces=pieces, device=CPU)
        assert est.stream("encode", AttentionBackend("sdpa"), 1, 96, 80, pieces) == count(full_encode, CPU).peak["device"]


def test_encode_plan_batches_shrink_with_budget():
    config = load_config("svd-vae")
    sizes = [plan_encode(config, 25, (576, 1024), device=torch.device("cuda"), dtype=torch.float16,
                         available_bytes=gib << 30).chunk_frames for gib in (64, 16, 8, 4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 16 and sizes[-1] >= 1


# ----------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("total,chunk,overlap", [(25, 14, 0), (25, 14, 4), (24, 8, 2), (15, 14, 4), (7, 8, 2), (30, 5, 4)])
def test_windows_cover_every_frame(total, chunk, overlap):
    plan = windows(total, chunk, overlap)
    assert plan[0].start == 0 and plan[-1].end == total
    for prev, cur in zip(plan, plan[1:]):
        assert cur.start == prev.end - cur.blend and 0 <= cur.blend < cur.frames and cur.start > prev.start
    assert all(w.frames <= chunk for w in plan)
    if overlap == 0:
        assert [(w.start, w.end) for w in plan] == [(s, min(s + chunk, total)) for s in range(0, total, chunk)]
    # streaming the windows yields each frame exactly once, in order
    blender = WindowBlender(plan)
    out = torch.cat([blender.push(torch.arange(w.start, w.end, dtype=torch.float32).view(-1, 1, 1, 1))
                     for w in plan])
    assert torch.allclose(out.flatten(), torch.arange(total, dtype=torch.float32))


def test_sgm_chunks_are_reproduced_by_overlap_zero():
    assert [(w.start, w.end) for w in windows(25, 14, 0)] == [(0, 14), (14, 25)]


def test_crossfade_is_linear_and_sums_to_one():
    w = crossfade_weights(3)
    assert torch.allclose(w, torch.tensor([0.25, 0.5, 0.75]))
    plan = windows(6, 4, 2)  # [0,4) and [2,6)
    blender = WindowBlender(plan)
    a = blender.push(torch.zeros(4, 1, 1, 1))
    b = blender.push(torch.ones(4, 1, 1, 1))
    assert torch.allclose(torch.cat([a, b]).flatten(), torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))


def psnr(a, b):
    return (10 * torch.log10(4 / ((a - b) ** 2).mean())).item()


def decode_windows(vae, z, chunk, overlap):
    plan = windows(z.shape[0], chunk, overlap)
    blender = WindowBlender(plan)
    with torch.no_grad():
        return torch.cat([blender.push(vae.decode(z[w.start:w.end])) for w in plan]), plan


def test_seams_overlapped_windows_beat_hard_cuts(tmp_path):
    vae = random_vae(TINY8, seed=70)
    make_video(tmp_path / "v.mp4", n=24, width=64, height=48)
    frames, _ = read_video(tmp_path / "v.mp4")
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
        one_clip = vae.decode(z)
    hard, plan_hard = decode_windows(vae, z, 8, 0)
    soft, plan_soft = decode_windows(vae, z, 8, 4)
    cuts = [i for w in plan_hard[1:] for i in (w.start - 1, w.start)]
    report = {"hard_all": psnr(hard, one_clip), "soft_all": psnr(soft, one_clip),
              "hard_boundary": psnr(hard[cuts], one_clip[cuts]), "soft_boundary": psnr(soft[cuts], one_clip[cuts])}
    print(json.dumps(report))
    assert report["soft_boundary"] > report["hard_boundary"] + 6  # dB, measured ~+11
    assert report["soft_all"] > report["hard_all"] + 3


# ----------------------------------------------------------------------------------------------- tiles


# ----------------------------------------------------------------------------------------------- runner


@pytest.fixture
def tiny8_file(tmp_path):
    path = tmp_path / "tiny8.safetensors"
    save_file(random_vae(TINY8, seed=70).state_dict(), str(path))
    return path


def test_oom_recovery_gives_the_output_of_a_small_plan(tmp_path, tiny8_file, monkeypatch):
    make_video(tmp_path / "v.mp4", n=10, width=32, height=32)
    runner = CliRunner()
    assert runner.invoke(app, ["encode", str(tmp_path / "v.mp4"), "-m", str(tiny8_file)]).exit_code == 0
    lat = tmp_path / "v.latents.safetensors"
    real_decode = VAE.decode

    def failing_decode(self, z, num_frames=None, **kw):
        if isinstance(z, torch.Tensor) and z.shape[0] > 4:  # the planner's counting runs must still work
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_decode(self, z, num_frames, **kw)

    monkeypatch.setattr(VAE, "decode", failing_decode)
    result = runner.invoke(app, ["decode", str(lat), "-m", str(tiny8_file), "-o", f"{tmp_path}/recovered/", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["oom_retries"] and data["oom_retries"][0]["plan"]["strategy"] == "one-clip"
    assert "injected" in data["oom_retries"][0]["error"]
    plan = data["plan"]
    # one clip failed; the re-plan streams exactly, so the frames equal a one-clip decode's (within a level)
    assert plan["strategy"] == "stream" and plan["exact"] and data["frames"] == 10
    monkeypatch.setattr(VAE, "decode", real_decode)
    again = runner.invoke(app, ["decode", str(lat), "-m", str(tiny8_file), "-o", f"{tmp_path}/direct/", "--chunk", "0"])
    assert again.exit_code == 0, again.stderr
    import imageio.v3 as iio

    a = [iio.imread(p).astype(int) for p in sorted((tmp_path / "recovered").iterdir())]
    b = [iio.imread(p).astype(int) for p in sorted((tmp_path / "direct").iterdir())]
    assert len(a) == len(b) == 10 and max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1


def test_oom_that_never_ends_is_a_clean_error(tmp_path, tiny8_file, monkeypatch):
    save_file({"latents": torch.randn(3, 4, 2, 2)}, str(tmp_path / "l.safetensors"))

    real_decode = VAE.decode

    real_stream = VAE.decode_stream

    def always(self, z, num_frames=None, **kw):
        if not isinstance(z, torch.Tensor):  # the planner's counting runs
            return real_decode(self, z, num_frames, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    def always_streamed(self, z, *args, **kw):
        if not isinstance(z, torch.Tensor):
            return real_stream(self, z, *args, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(VAE, "decode", always)
    monkeypatch.setattr(VAE, "decode_stream", always_streamed)
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "l.safetensors"), "-m", str(tiny8_file), "--fps", "8"])
    assert result.exit_code == 1 and "out of memory on cpu after 5 attempts" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", "tiny8.safetensors"]


def test_encode_recovers_from_oom_with_smaller_batches(tmp_path, tiny8_file, monkeypatch):
    make_video(tmp_path / "v.mp4", n=6, width=32, height=32)
    runner = CliRunner()
    assert runner.invoke(app, ["encode", str(tmp_path / "v.mp4"), "-m", str(tiny8_file), "-o",
                               str(tmp_path / "ref.safetensors")]).exit_code == 0
    real = VAE.moments

    def failing(self, x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.shape[0] > 1:  # the CPU plan's batches are 2 frames at most
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(VAE, "moments", failing)
    result = runner.invoke(app, ["encode", str(tmp_path / "v.mp4"), "-m", str(tiny8_file), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["batch_frames"] == 1 and data["oom_retries"]
    from safetensors import safe_open

    a = safe_open(str(tmp_path / "ref.safetensors"), "pt").get_tensor("latents")
    b = safe_open(data["output"], "pt").get_tensor("latents")
    assert (a - b).abs().max() <= 1e-5


def test_plan_command(tmp_path, tiny8_file):
    make_video(tmp_path / "v.mp4", n=25, width=64, height=48)
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(tmp_path / "v.mp4"), "-m", str(tiny8_file), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"attention", "chunk_frames", "overlap", "exact", "pieces", "predicted_peak_bytes"} <= set(data)
    assert data["strategy"] == "one-clip" and data["chunk_frames"] == 25 and data["encode"]["batch_frames"] >= 1
    assert data["exact"] is True and data["pieces"] is None
    limit = str(data["predicted_peak_bytes"] - 1)  # just below one clip: batched 2D layers or streamed, exact
    small = json.loads(runner.invoke(app, ["plan", str(tmp_path / "v.mp4"), "-m", str(tiny8_file), "--json",
                                           "--max-memory", limit, "--device", "cpu"]).stdout)
    assert small["predicted_peak_bytes"] < data["predicted_peak_bytes"] and small["exact"] is True
    assert small["strategy"] == "stream" or small["frame_batch"] == 4
    svd = runner.invoke(app, ["plan", str(tmp_path / "v.mp4"), "--config", "svd-vae", "--frames", "14"])
    assert svd.exit_code == 0 and "decode:" in svd.stdout and "why:" in svd.stdout
    assert runner.invoke(app, ["plan", str(tmp_path / "v.mp4"), "--max-memory", "lots", "-m",
                               str(tiny8_file)]).exit_code == 2


def test_budget_respects_max_memory(tiny8_file):
    from vaecli.model.checkpoint import load_codec
    from vaecli.ops.device import free_memory
    from vaecli.pipeline.planner import CPU_DEFAULT_CEILING, CPU_SHARE, budget_for, overhead_bytes

    model = load_codec(tiny8_file, device=torch.device("cpu"), dtype=torch.float32)
    # on CPU the ceiling is on the resident set: the weights and the runtime allowance are taken off, never the
    # momentary resident set (so plan and decode agree)
    assert overhead_bytes(model) == model.weights_bytes() + (320 << 20)
    left = budget_for(model, overhead_bytes(model) + (10 << 20)).activation_bytes
    assert left == 10 << 20
    assert budget_for(model, 1).activation_bytes == 0
    # without a ceiling, a safe share of the available memory, never all of it
    share = budget_for(model, None).activation_bytes
    assert 0 < share <= CPU_SHARE * free_memory(torch.device("cpu")) * 1.05
    # and at most the default ceiling in all (as --max-memory 4GiB), where that share is larger
    assert share <= CPU_DEFAULT_CEILING - overhead_bytes(model)
    if CPU_SHARE * free_memory(torch.device("cpu")) > CPU_DEFAULT_CEILING:
        assert share == budget_for(model, CPU_DEFAULT_CEILING).activation_bytes


def test_the_cpu_default_ceiling_is_a_preference_an_exact_plan_beyond_it_gets_the_share(tiny8_file, monkeypatch):
    """Without --max-memory on CPU, plans stay within CPU_DEFAULT_CEILING when an exact one fits there; when none
    does (here: a ceiling that leaves nothing for activations), the plan gets the whole default share instead of
    an approximate plan or a refusal; with --max-memory the ceiling holds."""
    from vaecli.errors import OutOfMemory
    from vaecli.model.checkpoint import load_codec
    from vaecli.pipeline import planner

    model = load_codec(tiny8_file, device=torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setattr(planner, "free_memory", lambda device: 16 << 30)  # steady, whatever else runs
    preferred = planner.decode_plan(model, 8, (8, 8))
    assert preferred.exact and preferred.fits
    assert preferred.budget_bytes == planner.budget_for(model, None).activation_bytes
    monkeypatch.setattr(planner, "CPU_DEFAULT_CEILING", planner.overhead_bytes(model))
    assert planner.budget_for(model, None).activation_bytes == 0
    for plan in (planner.decode_plan(model, 8, (8, 8)), planner.encode_plan(model, 8, (64, 64))):
        assert plan.exact and plan.fits
        assert plan.budget_bytes == planner.budget_for(model, None, preferred=False).activation_bytes > 0
    with pytest.raises(OutOfMemory, match="--max-memory .* is too small"):
        planner.decode_plan(model, 8, (8, 8), max_memory=planner.overhead_bytes(model))


def test_plan_is_the_plan_that_runs_at_every_ceiling(tmp_path, tiny8_file):
    """`vaecli plan` and `vaecli decode`/`encode` prepare and plan the same way: for a range of --max-memory
    ceilings, the plan printed is the plan run; a refusal names a ceiling that is then accepted."""
    import re

    make_video(tmp_path / "v.mp4", n=12, width=64, height=64)
    runner = CliRunner()
    assert runner.invoke(app, ["encode", str(tmp_path / "v.mp4"), "-m", str(tiny8_file)]).exit_code == 0
    lat = tmp_path / "v.latents.safetensors"

    def planned(*extra):
        result = runner.invoke(app, ["plan", str(lat), "-m", str(tiny8_file), "--json", *extra])
        return result, (json.loads(result.stdout) if result.exit_code == 0 else None)

    _, whole = planned()
    refused, _ = planned("--max-memory", "1")
    assert refused.exit_code == 1
    need = re.search(r"needs about ([0-9.]+) MiB", refused.stderr)
    assert need, refused.stderr
    smallest = f"{need.group(1)}MiB"
    accepted, at_need = planned("--max-memory", smallest)
    assert accepted.exit_code == 0, accepted.stderr
    assert at_need["fits"] and at_need["predicted_peak_bytes"] <= parse_bytes(smallest)
    # just below the figure: still refused, with the same figure
    below, _ = planned("--max-memory", str(parse_bytes(smallest) - (2 << 20)))
    assert below.exit_code == 1 and f"needs about {need.group(1)} MiB" in below.stderr
    low, high = parse_bytes(smallest), whole["predicted_peak_bytes"] + (8 << 20)
    strategies = set()
    for k, ceiling in enumerate((low, (low + high) // 2, high)):
        _, shown = planned("--max-memory", str(ceiling))
        out = tmp_path / f"d{k}.mp4"
        result = runner.invoke(app, ["decode", str(lat), "-m", str(tiny8_file), "-o", str(out), "--json",
                                     "--max-memory", str(ceiling)])
        assert result.exit_code == 0, (ceiling, result.stderr)
        ran = json.loads(result.stdout)["plan"]
        assert ran == {k: shown[k] for k in ran}, ceiling  # every field: strategy, pieces, budget, bytes, reasons
        strategies.add((ran["strategy"], ran["frame_batch"], json.dumps(ran["pieces"])))
    assert len(strategies) >= 2  # the range crosses from streamed to one clip
    # encode: the plan printed for a video is the plan encode runs
    enc_shown = json.loads(runner.invoke(app, ["plan", str(tmp_path / "v.mp4"), "-m", str(tiny8_file), "--json",
                                               "--max-memory", smallest]).stdout)["encode"]
    enc = runner.invoke(app, ["encode", str(tmp_path / "v.mp4"), "-m", str(tiny8_file), "--json", "-o",
                              str(tmp_path / "e.latents.safetensors"), "--max-memory", smallest])
    assert enc.exit_code == 0, enc.stderr
    assert json.loads(enc.stdout)["plan"] == enc_shown
