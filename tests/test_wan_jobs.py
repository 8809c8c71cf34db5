"""Everything else works for Wan as for SVD: batches with --skip-existing (the model hash), roundtrip and plan
with `family` in the JSON, torchrun, recovery from out-of-memory (decode and encode re-planned smaller, same
result) and the precision fallback of a decode step (one causal step redone wider, the cache carried on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import make_video, randomise
from vaecli.cli import app
from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.conv import channels_last_
from vaecli.model.wan.modules import WanVAE

TINY = WanConfig(dim=3, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1, name="tiny")
LENGTHS = (9, 5, 13)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """Two tiny random Wan 2.1 models (other weights, so another hash) and three clips of 1 + 4k frames."""
    root = tmp_path_factory.mktemp("wanjobs")
    for seed in (0, 1):
        vae = WanVAE(TINY)
        randomise(vae, seed + 3)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / f"w{seed}.safetensors"))
    for i, n in enumerate(LENGTHS):
        make_video(root / f"c{i}.mp4", n=n, width=32, height=32, seed=i)
    return root


def run(*args, code: int = 0):
    done = CliRunner().invoke(app, [str(a) for a in args])
    assert done.exit_code == code, done.output
    return done


def jsonl(done) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def latents(path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latents")


def frames(folder) -> list[np.ndarray]:
    return [iio.imread(p).astype(int) for p in sorted(folder.iterdir())]


def test_batches_skip_existing_roundtrip_and_plan(wan, tmp_path):
    clips = [wan / f"c{i}.mp4" for i in range(3)]
    out = tmp_path / "lat"
    out.mkdir()
    done = jsonl(run("encode", *clips, "-m", wan / "w0.safetensors", "--out-dir", out, "--json"))
    assert [r["family"] for r in done] == ["wan"] * 3 and [r["latent_frames"] for r in done] == [3, 2, 4]
    again = jsonl(run("encode", *clips, "-m", wan / "w0.safetensors", "--out-dir", out, "--skip-existing", "--json"))
    assert [r.get("reason") for r in again] == ["exists"] * 3
    other = run("encode", clips[0], "-m", wan / "w1.safetensors", "--out-dir", out, "--skip-existing", code=1)
    assert "exists, but" in other.stderr and "--overwrite" in other.stderr  # made with another model: not reused
    decoded = tmp_path / "dec"
    decoded.mkdir()
    lats = sorted(out.glob("*.latents.safetensors"))
    results = jsonl(run("decode", *lats, "-m", wan / "w0.safetensors", "--out-dir", decoded, "--format", "png",
                        "--json"))
    assert [r["frames"] for r in results] == [9, 5, 13] and all(r["family"] == "wan" for r in results)
    assert [len(list((decoded / f"c{i}.decoded").iterdir())) for i in range(3)] == [9, 5, 13]
    rt = json.loads(run("roundtrip", clips[2], "-m", wan / "w0.safetensors", "-o", tmp_path / "rt.mp4",
                        "--json").stdout)
    assert rt["family"] == "wan" and rt["frames"] == 13 and rt["plan"]["exact"]
    plan = json.loads(run("plan", lats[2], "-m", wan / "w0.safetensors", "--json").stdout)
    assert plan["family"] == "wan" and plan["exact"] and plan["pieces"]["latent_frames"] == 1  # CPU


def test_encode_under_torchrun_equals_one_process(wan, tmp_path):
    clips = [str(wan / f"c{i}.mp4") for i in range(3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref.mkdir(), out.mkdir()
    one = subprocess.run([sys.executable, "-m", "vaecli", "encode", *clips, "--out-dir", ref, "-m",
                          wan / "w0.safetensors", "-q"], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "vaecli", "encode", *clips, "--out-dir", str(out), "-m", str(wan / "w0.safetensors"),
                           "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert many.returncode == 0, many.stderr
    results = [json.loads(line) for line in many.stdout.splitlines()]
    assert sorted(r["input"] for r in results if "input" in r) == sorted(clips)  # every input once
    for i in range(3):
        name = f"c{i}.latents.safetensors"
        assert torch.equal(latents(out / name), latents(ref / name)), name  # bit-identical


def test_out_of_memory_replans_smaller_with_the_same_result(wan, tmp_path, monkeypatch):
    model, clip = wan / "w0.safetensors", wan / "c2.mp4"
    run("encode", clip, "-m", model, "-o", tmp_path / "ref.latents.safetensors")
    run("decode", tmp_path / "ref.latents.safetensors", "-m", model, "-o", f"{tmp_path}/ref/", "--format", "png")
    real_encode, real_decode = WanVAE.encode_chunk, WanVAE.decode_chunk
    from vaecli.model.wan import family

    monkeypatch.setattr(family, "MAX_ENCODE_FRAMES", {})  # the limits of a GPU: calls as large as fit
    monkeypatch.setattr(family, "MAX_DECODE_FRAMES", {})

    def encode(self, x, cache, attention):
        if isinstance(x, torch.Tensor) and x.shape[2] > 5:  # the planned first call takes all 13 frames (pricing
            # runs this code too, on shape-only tensors: those pass)
            raise torch.OutOfMemoryError("out of memory (injected, encode)")
        return real_encode(self, x, cache, attention)

    def decode(self, z, cache, attention):
        if isinstance(z, torch.Tensor) and z.shape[2] > 1:  # the planned call takes all 4 latent frames
            raise torch.OutOfMemoryError("out of memory (injected, decode)")
        return real_decode(self, z, cache, attention)

    monkeypatch.setattr(WanVAE, "encode_chunk", encode)
    monkeypatch.setattr(WanVAE, "decode_chunk", decode)
    enc = json.loads(run("encode", clip, "-m", model, "-o", tmp_path / "x.latents.safetensors", "--json").stdout)
    assert enc["oom_retries"] and "injected, encode" in enc["oom_retries"][0]["error"]
    assert enc["plan"]["batch_frames"] == 4 and enc["oom_retries"][0]["plan"]["batch_frames"] == 12
    assert torch.allclose(latents(tmp_path / "x.latents.safetensors"), latents(tmp_path / "ref.latents.safetensors"),
                          atol=1e-5)  # the causal cache makes 1 + 4 + 4 + 4 frames the same encode
    dec = json.loads(run("decode", tmp_path / "ref.latents.safetensors", "-m", model, "-o", f"{tmp_path}/x/",
                         "--format", "png", "--json").stdout)
    assert [r["plan"]["pieces"]["latent_frames"] for r in dec["oom_retries"]] == [4]
    assert dec["plan"]["pieces"]["latent_frames"] == 1 and dec["plan"]["exact"] and dec["frames"] == 13
    got, want = frames(tmp_path / "x"), frames(tmp_path / "ref")
    assert len(got) == len(want) == 13 and max(np.abs(a - b).max() for a, b in zip(got, want)) <= 1


def poison_second_fp16_call(monkeypatch, method: str) -> list[torch.dtype]:
    """Make WanVAE.<method> put an inf into its second fp16 result; returns the dtypes of its calls."""
    real, calls = getattr(WanVAE, method), []

    def poisoned(self, x, cache, attention):
        out = real(self, x, cache, attention)
        if not isinstance(out, torch.Tensor):  # pricing runs the code on shape-only tensors: not a call
            return out
        calls.append(out.dtype)
        if out.dtype == torch.float16 and calls.count(torch.float16) == 2:
            out = out.clone(memory_format=torch.contiguous_format)  # the kernels' layout varies by CPU
            out.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(WanVAE, method, poisoned)
    return calls


def by_hand(model, method: str, pieces, dtypes) -> list[torch.Tensor]:
    """WanVAE.<method> over `pieces` (B, C, t, H, W) in order, each in its dtype, the causal cache moved to the
    next dtype's model (cast) when the dtype changes: what the precision fallback must compute."""
    from safetensors.torch import load_file

    from vaecli.ops.attention import AttentionBackend

    state, vaes = load_file(str(model)), {}
    for dtype in set(dtypes):
        vaes[dtype] = WanVAE(TINY).eval()
        vaes[dtype].load_state_dict(state)
        channels_last_(vaes[dtype].to(dtype))  # as the family builds it: the same kernels, the same rounding
    cache, owner, parts = {}, dtypes[0], []
    with torch.no_grad():
        for x, dtype in zip(pieces, dtypes):
            if dtype != owner:
                names = {m: n for n, m in vaes[owner].named_modules()}
                mine = dict(vaes[dtype].named_modules())
                cache = {mine[names[m]]: v.to(dtype) if isinstance(v, torch.Tensor) else v for m, v in cache.items()}
                owner = dtype
            parts.append(getattr(vaes[dtype], method)(x.to(dtype), cache, AttentionBackend("sdpa")).float())
    return parts


def test_a_step_with_inf_in_half_precision_is_redone_wider(wan, tmp_path, monkeypatch):
    """fp16 gives inf in the second causal step only (a decode's second latent frame, an encode's second batch):
    that step is redone in bf16, the others stay fp16, and the results are those of exactly that sequence
    computed by hand. The decode's bf16 model rebuilds the cache from the latents of the steps done (their frames
    dropped) and hands it on cast to fp16; the encode's redo starts from the cache before the failed batch."""
    from helpers import read_video

    model, clip = wan / "w0.safetensors", wan / "c2.mp4"
    half, bf16 = torch.float16, torch.bfloat16
    run("encode", clip, "-m", model, "-o", tmp_path / "c.latents.safetensors")
    lat = tmp_path / "c.latents.safetensors"
    calls = poison_second_fp16_call(monkeypatch, "decode_chunk")
    done = run("decode", lat, "-m", model, "--dtype", "fp16", "--chunk", "1", "-o", f"{tmp_path}/redo/", "--format",
               "png", "--json")
    assert json.loads(done.stdout)["precision_fallbacks"] == [{"where": "latent frames 1-1", "from": "fp16",
                                                                "to": "bf16"}]
    assert "fp16 gave inf/NaN in latent frames 1-1; redoing it in bf16" in done.stderr
    assert calls == [half, half, bf16, bf16, half, half]  # step 1 failed; bf16 replays step 0, then does step 1
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (TINY.latents_mean, TINY.latents_std))
    z = latents(lat).permute(1, 0, 2, 3)[None] * std + mean  # (1, C, t, h, w), raw
    monkeypatch.undo()
    steps = [z[:, :, t:t + 1] for t in range(4)]
    x = torch.cat(by_hand(model, "decode_chunk", steps[:1], [half]) +
                  by_hand(model, "decode_chunk", steps, [bf16, bf16, half, half])[1:], 2)
    want = ((x[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).numpy().astype(int)
    got = frames(tmp_path / "redo")
    assert len(got) == 13 and max(np.abs(a - b).max() for a, b in zip(got, want)) <= 1

    calls = poison_second_fp16_call(monkeypatch, "encode_chunk")
    done = run("encode", clip, "-m", model, "--dtype", "fp16", "--batch", "4", "-o",
               tmp_path / "e.latents.safetensors", "--json")
    assert json.loads(done.stdout)["precision_fallbacks"] == [{"where": "frames 5-8", "from": "fp16", "to": "bf16"}]
    assert calls == [half, half, bf16, half]  # the first 5 frames, then 4 per call
    monkeypatch.undo()
    seen, _ = read_video(clip)
    video = torch.from_numpy(seen).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    mu = by_hand(model, "encode_chunk", [video[:, :, a:a + n] for a, n in ((0, 5), (5, 4), (9, 4))],
                 [half, bf16, half])
    mu = torch.cat(mu, 2)[0, :16].permute(1, 0, 2, 3)
    stored = (mu - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # (t, C, h, w), normalised
    assert torch.allclose(latents(tmp_path / "e.latents.safetensors"), stored, atol=1e-3)


def test_plan_takes_the_latent_space_of_a_foreign_file_as_decode_does(wan, tmp_path):
    """A latent file that does not say its space: plan, like decode, asks for --latent-space, then plans what
    decode runs."""
    foreign = tmp_path / "foreign.safetensors"
    save_file({"latents": torch.randn(3, 16, 4, 4)}, str(foreign))
    model = wan / "w0.safetensors"
    asked = run("plan", foreign, "-m", model, code=1)
    assert "--latent-space" in asked.stderr and asked.stderr.startswith("error: ")
    plan = json.loads(run("plan", foreign, "-m", model, "--latent-space", "raw", "--json").stdout)
    dec = json.loads(run("decode", foreign, "-m", model, "--latent-space", "raw", "--fps", "16", "-o",
                         tmp_path / "out.mp4", "--json").stdout)
    assert plan["pieces"] == dec["plan"]["pieces"]
    assert plan["predicted_peak_bytes"] == dec["plan"]["predicted_peak_bytes"]
    assert run("plan", foreign, "-m", model, "--latent-space", "sideways", code=2).stderr.startswith("error: ")
