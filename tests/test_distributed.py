"""Batches under torchrun on CPU (gloo): dynamic claiming, outputs bit-identical to one process, every input once,
a worker killed and restarted, a corrupt file failing alone, and the batch record refusing stale outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from helpers import make_video, random_vae, tiny_config
from vaecli.cli import app
from vaecli.model.svd.layout import save_checkpoint
from vaecli.pipeline.distributed import by_size
from vaecli.pipeline.record import RECORD_NAME, BatchRecord, stale_reason

LENGTHS = [40, 2, 3, 2, 3, 2, 2]  # one long clip among short ones


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    config = tiny_config()
    for seed in (0, 1):
        save_checkpoint(random_vae(config, seed=seed).state_dict(), config, root / f"m{seed}.safetensors", layout="sgm")
    names = []
    for i, n in enumerate(LENGTHS):
        make_video(root / f"c{i}.mp4", n=n, width=64, height=48, seed=i)
        names.append(str(root / f"c{i}.mp4"))
    (root / "bad.mp4").write_bytes(b"not a video at all")
    ref = root / "ref"
    ref.mkdir()
    done = subprocess.run([sys.executable, "-m", "vaecli", "encode", *names, "--out-dir", ref, "-m",
                           root / "m0.safetensors", "-q"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as torchrun's workers run
    assert done.returncode == 0, done.stderr
    return {"root": root, "inputs": names, "model": root / "m0.safetensors", "ref": ref}


def torchrun(args, nproc=2, max_restarts=0, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "vaecli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def latents(path: Path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latents")


def same_as_reference(out: Path, ref: Path, names) -> None:
    for name in names:
        stem = Path(name).stem
        a, b = latents(out / f"{stem}.latents.safetensors"), latents(ref / f"{stem}.latents.safetensors")
        assert torch.equal(a, b), name  # bit-identical


def test_three_workers_each_input_once_claimed_dynamically_and_a_corrupt_file_fails_alone(clips, tmp_path):
    """Every input exactly once over three ranks, claimed largest first, each result bit-identical to one
    process's, and a corrupt file fails alone (one torchrun run serves these checks: each costs a dozen seconds
    on two cores). How many inputs each rank claims is left to timing."""
    out = tmp_path / "out"
    out.mkdir()
    inputs = clips["inputs"] + [str(clips["root"] / "bad.mp4")]
    proc = torchrun(["encode", *inputs, "--out-dir", out, "-m", clips["model"], "--json"], nproc=3)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0  # rank 0 reports the failed file in the exit code
    lines = [json.loads(line) for line in stdout.splitlines()]
    results = [r for r in lines if "summary" not in r]
    (summary,) = [r["summary"] for r in lines if "summary" in r]
    assert sorted(r["input"] for r in results) == sorted(inputs)  # every input exactly once
    assert all(r["rank"] in (0, 1, 2) for r in results)
    (bad,) = [r for r in results if "error" in r]
    assert bad["input"].endswith("bad.mp4") and "not a readable video" in bad["error"]
    assert summary["done"] == len(clips["inputs"]) and summary["failed"] == 1 and summary["workers"] == 3
    assert [r["rank"] for r in summary["ranks"]] == [0, 1, 2]
    assert sum(r["frames"] for r in summary["ranks"]) == sum(LENGTHS)
    long_rank = next(r["rank"] for r in results if r["input"].endswith("c0.mp4"))
    counts = {r["rank"]: r["done"] + r.get("failed", 0) for r in summary["ranks"]}
    # how many inputs each worker claims depends on when the workers start, which on 2 busy cores varies (a late
    # worker may claim none): the counts add up, and the largest input is the first in the claiming order
    assert sum(counts.values()) == len(inputs) and long_rank in counts, counts
    assert by_size(clips["inputs"])[0].endswith("c0.mp4")
    assert "error: " in stderr and "bad.mp4" in stderr
    same_as_reference(out, clips["ref"], clips["inputs"])
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # nothing partial
    record = BatchRecord(out / RECORD_NAME)
    assert len(record.entries) == len(inputs)


def test_killed_worker_is_restarted_and_the_job_completes(clips, tmp_path):
    """SIGKILL to one worker mid-batch under --max-restarts 1: torchrun restarts the workers, the restart skips
    what was done and redoes what was in flight; every output is whole, identical, and made once."""
    out = tmp_path / "out"
    out.mkdir()
    many = clips["inputs"] * 1  # plus copies under other names, so that the batch lasts a while
    extra = []
    for i in range(8):
        copy = tmp_path / f"long{i}.mp4"
        copy.write_bytes(Path(clips["inputs"][0]).read_bytes())
        extra.append(str(copy))
    proc = torchrun(["encode", *many, *extra, "--out-dir", out, "-m", clips["model"], "--skip-existing", "--json"],
                    nproc=2, max_restarts=1)
    record = out / RECORD_NAME
    deadline = time.time() + 300
    while time.time() < deadline and (not record.exists() or record.read_text().count("\n") < 2):
        time.sleep(0.05)
    workers = children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    names = many + extra
    for name in names:
        stem = Path(name).stem
        ref_name = clips["ref"] / f"{stem}.latents.safetensors"
        expected = latents(ref_name) if ref_name.exists() else latents(clips["ref"] / "c0.latents.safetensors")
        assert torch.equal(latents(out / f"{stem}.latents.safetensors"), expected), name
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the killed worker's temporary was cleaned
    done_lines = [json.loads(line) for line in record.read_text().splitlines()]
    made = [e["output"] for e in done_lines if e["status"] == "done"]
    assert sorted(made) == sorted(set(made)) and len(made) == len(names)  # each output made exactly once
    final = [json.loads(line) for line in stdout.splitlines()]
    assert any(r.get("skipped") for r in final)  # the restart skipped what the first attempt had done


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_record_refuses_stale_outputs(clips, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    out.mkdir()
    first = clips["inputs"][1]
    assert runner.invoke(app, ["encode", first, "--out-dir", str(out), "-m", str(clips["model"]), "-q"]).exit_code == 0
    again = runner.invoke(app, ["encode", first, "--out-dir", str(out), "-m", str(clips["model"]), "--skip-existing",
                                "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] is True
    other = runner.invoke(app, ["encode", first, "--out-dir", str(out), "-m", str(clips["root"] / "m1.safetensors"),
                                "--skip-existing"])
    assert other.exit_code == 1 and "made with another model" in other.stderr and "--overwrite" in other.stderr
    redo = runner.invoke(app, ["encode", first, "--out-dir", str(out), "-m", str(clips["root"] / "m1.safetensors"),
                               "--overwrite", "--json"])
    assert redo.exit_code == 0
    entry = BatchRecord(out / RECORD_NAME).last(out / "c1.latents.safetensors")
    assert entry["model_hash"] == json.loads(redo.stdout)["model_hash"] and entry["plan"]["stage"] == "encode"
    # without a record line, the latent file's own metadata tells
    (out / RECORD_NAME).unlink()
    stale = runner.invoke(app, ["encode", first, "--out-dir", str(out), "-m", str(clips["model"]), "--skip-existing"])
    assert stale.exit_code == 1 and "made with another model" in stale.stderr
    wider = runner.invoke(app, ["encode", first, "--out-dir", str(out), "-m", str(clips["root"] / "m1.safetensors"),
                                "--skip-existing", "--dtype", "bf16"])
    assert wider.exit_code == 1 and "made in fp32, this run computes in bf16" in wider.stderr


def test_stale_reason_unit():
    entry = {"status": "done", "model_hash": "abc", "dtype": "fp32", "model": "m"}
    assert stale_reason(entry, "abc", "fp32") is None
    assert "another model" in stale_reason(entry, "def", "fp32")
    assert "made in fp32" in stale_reason(entry, "abc", "bf16")
    assert stale_reason({"status": "failed"}, "abc", "fp32") is None
    assert stale_reason(None, "abc", "fp32") is None


def test_record_ignores_torn_lines(tmp_path):
    path = tmp_path / RECORD_NAME
    path.write_text('{"output": "a", "status": "done"}\n{"output": "b", "sta\n[1, 2]\n')
    record = BatchRecord(path)
    assert list(record.entries) == [os.path.abspath("a")]
    record.append({"output": "c", "status": "failed"})
    assert BatchRecord(path).last("c")["status"] == "failed"


def test_decode_under_torchrun(clips, tmp_path):
    latent_files = sorted(str(p) for p in clips["ref"].glob("*.latents.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(["decode", *latent_files, "--out-dir", out, "-m", clips["model"], "--format", "webm", "--json"])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    results = [json.loads(line) for line in stdout.splitlines()]
    assert sorted(r["input"] for r in results if "input" in r) == latent_files
    assert sorted(os.listdir(out)) == sorted([f"c{i}.decoded.webm" for i in range(len(LENGTHS))] + [RECORD_NAME])


def test_claims_hand_out_each_index_once_to_whichever_worker_asks():
    """Dynamic claiming without timing: two workers share one store; while one holds index 0 (the largest input,
    busy), the other takes every later index as it asks; each index goes to exactly one worker, in order."""
    import torch.distributed as dist

    from vaecli.pipeline.distributed import Workers

    store = dist.HashStore()
    busy, free = (Workers(rank, 2, rank, "run", 0, store) for rank in (0, 1))
    first = busy.claims(5)
    assert next(first) == 0  # worker 0 is now encoding the largest input
    assert list(free.claims(5)) == [1, 2, 3, 4]  # worker 1 takes the rest meanwhile
    assert list(first) == []  # nothing is left when worker 0 asks again
    assert list(Workers(0, 2, 0, "run", 1, store).claims(2)) == [0, 1]  # a restarted attempt counts afresh
