"""The streaming executor's disk tier: a clip's activation kept in scratch files gives the one-clip decode, costs
what the planner counts, is planned only when nothing in memory holds the clip, and leaves nothing behind (after
a failure, a kill or a full disk)."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import latents, make_video, random_vae, tiny_config
from vaecli.cli import app
from vaecli.errors import OutputError
from vaecli.model.plan import Budget
from vaecli.model.svd import planning
from vaecli.model.svd.streaming import Pieces
from vaecli.ops import scratch as scratch_mod
from vaecli.ops.scratch import Scratch

BOUND = 1e-4  # fp32, against the one-clip decode
runner = CliRunner()
CONFIGS = {"conv-only-3": tiny_config("conv-only", ch_mult=(1, 2, 2)),
           "all-4": tiny_config("all", ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_levels=(1,))}
CUTS = [Pieces(2, None, 3, None, disk=True), Pieces(5, None, None, None, disk=True),
        Pieces(1, 3, 2, 3, disk=True), Pieces(1, 4, None, 5, disk=True, keep=True),
        Pieces(3, 16, 1, None, disk=True), Pieces(1, None, 4, 2, disk=True),
        Pieces(2, None, 3, 2, disk=True, band=True)]  # temporal layers in bands of whole rows


def decoded(vae, z, pieces, folder):
    with Scratch(folder) as sc:
        out = torch.cat([x for _, x in vae.decode_stream(z, pieces, scratch=sc)])
        assert sc.live == 0 and not any(sc.folder.iterdir())  # every frame file removed as it was dropped
        return out, sc.peak


def leftovers(folder) -> list[str]:
    """Scratch folders (and anything else vaecli leaves as a temporary) in `folder`."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and ".vaecli-" in n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_disk_cut_equals_one_clip_and_costs_what_is_counted(name, tmp_path):
    vae = random_vae(CONFIGS[name], seed=11)
    z = latents(5, 13, 10, seed=5)  # odd rows: tiles of 2..16 latent px cut it unevenly
    est = planning.Estimator(vae.config, torch.float32, vae=vae)
    with torch.no_grad():
        ref = vae.decode(z)
        for pieces in CUTS:
            out, peak = decoded(vae, z, pieces, tmp_path)
            assert (out - ref).abs().max().item() <= BOUND, pieces
            counted = est.stream_ledger("decode", vae.attention, 5, 13, 10, pieces)["disk"]
            assert counted == peak, pieces  # the planner's disk bytes are the scratch files' peak
    assert leftovers(tmp_path) == []


def test_planner_keeps_the_clip_on_disk_only_when_memory_cannot_hold_it(tmp_path):
    config = tiny_config("conv-only", ch_mult=(1, 2, 2))
    est = planning.Estimator(config, torch.float32)
    cpu = torch.device("cpu")
    frames, hw = 40, (64, 96)  # a clip store of GiBs: the cost model's fixed overhead is small beside it
    store = est.clip_store("decode", frames - 1, *hw)

    def plan(budget, disk):
        return planning.plan_decode(config, frames, hw, device=cpu, dtype=torch.float32, available_bytes=budget,
                                    estimator=est, disk_bytes=disk, scratch=str(tmp_path))

    roomy = plan(4 * store, 1 << 40)
    assert roomy.exact and not roomy.pieces or not roomy.pieces.disk  # memory first
    assert roomy.disk_bytes == 0 and roomy.scratch is None
    tight = store * 6 // 5  # the clip's activation and any piece's work (with the cost model's margin) do not fit
    on_disk = plan(tight, 1 << 40)
    assert on_disk.strategy == "stream" and on_disk.exact and on_disk.pieces.disk and on_disk.fits
    assert on_disk.disk_bytes >= store and on_disk.scratch == str(tmp_path)
    assert any("scratch files on disk" in r for r in on_disk.reasons)
    assert on_disk.to_dict()["disk_bytes"] == on_disk.disk_bytes
    short = plan(tight, on_disk.disk_bytes // 2)  # the disk cannot hold it either: approximate, and why
    assert not short.exact and short.strategy == "windows" and short.disk_bytes <= on_disk.disk_bytes // 2
    assert any("needs" in r and "scratch space" in r and "--scratch" in r for r in short.reasons)
    without = plan(tight, None)
    assert not without.exact  # no scratch folder: as before
    # where 16 whole frames of the temporal layers do not fit, 16 frames in bands of whole rows come before
    # fewer frames (less halo read) or square tiles (a contiguous read per frame)
    squeezed = plan(store, 1 << 40)
    assert squeezed.exact and squeezed.pieces.disk and squeezed.pieces.band and squeezed.pieces.time_frames == 16
    assert "bands of" in squeezed.pieces.describe() and squeezed.pieces.to_dict()["time_bands"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny model, a 12-frame clip and its latents."""
    folder = tmp_path_factory.mktemp("disk")
    model = folder / "tiny.safetensors"
    save_file(random_vae(tiny_config("conv-only", ch_mult=(1, 2, 2)), seed=3).state_dict(), str(model))
    make_video(folder / "v.mp4", n=12, width=64, height=48)
    lat = folder / "v.latents.safetensors"
    res = runner.invoke(app, ["encode", str(folder / "v.mp4"), "-m", str(model), "-o", str(lat)])
    assert res.exit_code == 0, res.output
    return folder, model, lat


def plan_at(model, lat, scratch, mib: int) -> dict | None:
    res = runner.invoke(app, ["plan", str(lat), "-m", str(model), "--max-memory", f"{mib}MiB", "--scratch",
                              str(scratch), "--json"])
    return json.loads(res.stdout) if res.exit_code == 0 else None


@pytest.fixture(scope="module")
def ceiling(clip):
    """A --max-memory (MiB) at which the plan keeps the clip on disk: the figure a refusal names is the smallest
    plan's, and with a scratch folder that is a disk plan (it holds one piece's work; a resident plan holds the
    clip's activation besides)."""
    import re

    folder, model, lat = clip
    scratch = folder / "probe"
    scratch.mkdir(exist_ok=True)
    refused = runner.invoke(app, ["plan", str(lat), "-m", str(model), "--max-memory", "1MiB", "--scratch",
                                  str(scratch)])
    need = re.search(r"needs about (\d+) MiB", refused.stderr)
    assert refused.exit_code == 1 and need, refused.stderr
    plan = plan_at(model, lat, scratch, int(need.group(1)))
    assert plan["fits"] and plan["exact"] and plan["disk_bytes"] > 0 and plan["pieces"]["disk"], plan
    bigger = plan_at(model, lat, scratch, 4096)
    assert bigger["disk_bytes"] == 0 and not (bigger["pieces"] or {}).get("disk")  # memory first
    return f"{need.group(1)}MiB", plan


@pytest.fixture
def scratch(tmp_path):
    folder = tmp_path / "scratch"
    folder.mkdir()
    return folder


def decode_on_disk(clip, ceiling, out, scratch):
    """`vaecli decode` of the clip's latents to `out` at the ceiling where the plan keeps the clip on disk."""
    folder, model, lat = clip
    return runner.invoke(app, ["decode", str(lat), "-m", str(model), "-o", str(out), "--max-memory", ceiling[0],
                               "--scratch", str(scratch)])


def pngs(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def test_cli_decode_on_disk_gives_the_one_clip_frames_and_cleans_up(clip, ceiling, scratch, tmp_path):
    folder, model, lat = clip
    ceiling, plan = ceiling
    ref = runner.invoke(app, ["decode", str(lat), "-m", str(model), "-o", f"{tmp_path}/ref/", "--format", "png",
                              "--chunk", "0"])
    assert ref.exit_code == 0, ref.output
    res = runner.invoke(app, ["decode", str(lat), "-m", str(model), "-o", f"{tmp_path}/disk/", "--format", "png",
                              "--max-memory", ceiling, "--scratch", str(scratch), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["plan"]["disk_bytes"] == plan["disk_bytes"] and out["plan"]["exact"] and out["frames"] == 12
    assert out["plan"]["scratch"] == str(scratch) and out["plan"]["pieces"]["disk"]
    got, want = pngs(tmp_path / "disk"), pngs(tmp_path / "ref")
    assert len(got) == len(want) == 12 and max(np.abs(a - b).max() for a, b in zip(got, want)) <= 1
    assert leftovers(scratch) == [] and leftovers(tmp_path) == []
    bad = runner.invoke(app, ["decode", str(lat), "-m", str(model), "-o", str(tmp_path / "x.mp4"), "--scratch",
                              str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "--scratch" in bad.output and "not a folder" in bad.output


def test_a_failed_or_killed_run_leaves_no_scratch_behind(clip, ceiling, scratch, tmp_path, monkeypatch):
    stale = scratch / ".vaecli-scratch.vaecli-999999999-abc123.scratch"  # a killed run's (no such process)
    stale.mkdir()
    (stale / "0.frame").write_bytes(b"\0" * 64)
    live = scratch / f".vaecli-scratch.vaecli-{os.getpid()}-zzz.scratch"  # a running process's: kept
    live.mkdir()
    from vaecli.model.svd import streaming

    real, calls = streaming.Streamer.time_stack, []

    def failing(self, store, block, *args):
        if not isinstance(self.scratch, Scratch):  # the planner's counting runs
            return real(self, store, block, *args)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure mid-decode")
        return real(self, store, block, *args)

    monkeypatch.setattr(streaming.Streamer, "time_stack", failing)
    res = decode_on_disk(clip, ceiling, tmp_path / "x.mp4", scratch)
    assert res.exit_code != 0 and len(calls) == 2 and "injected" in str(res.exception)
    assert leftovers(scratch) == [live.name]  # the stale folder swept, this run's removed on the failure
    assert not (tmp_path / "x.mp4").exists() and leftovers(tmp_path) == []


def test_a_full_scratch_disk_is_one_line_and_leaves_nothing(clip, ceiling, scratch, tmp_path, monkeypatch):
    made = []

    def full(fd, offset, length):
        made.append(length)
        if len(made) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scratch_mod.os, "posix_fallocate", full)
    res = decode_on_disk(clip, ceiling, tmp_path / "x.mp4", scratch)
    assert res.exit_code == 1 and len(made) == 6
    line = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "No space left on device" in line[0] and "--scratch" in line[0], res.output
    assert "Traceback" not in res.output
    assert leftovers(scratch) == [] and not (tmp_path / "x.mp4").exists()


def test_free_space_is_checked_before_any_work(clip, ceiling, scratch, tmp_path, monkeypatch):
    from vaecli.pipeline import planner

    plan = ceiling[1]
    calls = []

    def shrinking(folder):  # enough while planning, then the disk fills before the run starts
        calls.append(folder)
        return 1 << 50 if len(calls) == 1 else plan["disk_bytes"]

    monkeypatch.setattr(planner, "free_bytes", shrinking)
    started = []
    monkeypatch.setattr(Scratch, "__init__", lambda self, parent: started.append(parent))
    res = decode_on_disk(clip, ceiling, tmp_path / "x.mp4", scratch)
    assert res.exit_code == 1 and started == [] and len(calls) == 2
    assert "needs" in res.output and "free" in res.output and "--scratch" in res.output
    with pytest.raises(OutputError):
        planner.check_scratch(planning.Plan("decode", "cpu", "fp32", None, "stream", 1, 0, 0, 0, 0,
                                            disk_bytes=plan["disk_bytes"], scratch=str(scratch)))


def test_planned_disk_space_fits_the_folder(tmp_path, monkeypatch):
    from vaecli.pipeline import planner

    monkeypatch.setattr(planner, "free_bytes", lambda folder: 10 << 30)
    assert planner.scratch_space(tmp_path) == int((10 << 30) * 0.95) - (1 << 30)
    monkeypatch.setattr(planner, "free_bytes", lambda folder: 512 << 20)
    assert planner.scratch_space(tmp_path) == 0
    budget = planner.budget_for(_StubCodec(), None, tmp_path)
    assert isinstance(budget, Budget) and budget.disk_bytes == 0 and budget.scratch == str(tmp_path)


class _StubCodec:
    device = torch.device("cpu")
    resident = True

    def weights_bytes(self):
        return 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_cuts_are_as_close_to_fp32_as_the_one_clip_bf16_decode(name, tmp_path):
    """The CPU default decodes in bf16: a streamed or on-disk bf16 decode is not bitwise the one-clip bf16 decode
    (other summation orders), but adds no error of its own: it is as far from the fp32 frames as that one is."""
    vae = random_vae(CONFIGS[name], seed=11)
    z = latents(5, 13, 10, seed=5)
    with torch.no_grad():
        ref = vae.decode(z)
        half = vae.to(torch.bfloat16)
        one = (half.decode(z.bfloat16()).float() - ref).abs()
        for pieces in CUTS[:3] + [Pieces(2, None, 3, None)]:
            with Scratch(tmp_path) as sc:
                out = torch.cat([x for _, x in half.decode_stream(z.bfloat16(), pieces, scratch=sc)]).float()
            err = (out - ref).abs()
            assert err.max() <= 1.25 * one.max(), pieces
            assert err.mean() <= 1.1 * one.mean() and err.mean() < 0.02, pieces
