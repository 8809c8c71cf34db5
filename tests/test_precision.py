"""fp16 safety: a chunk whose half-precision result holds inf/NaN is redone wider, logged and reported."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import make_video, random_vae, tiny_config
from vaecli.cli import app
from vaecli.model.svd.vae import VAE

TINY8 = tiny_config(ch_mult=(1, 1, 1, 1), num_res_blocks=1, name="tiny8")
runner = CliRunner()


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "tiny8.safetensors"
    save_file(random_vae(TINY8, seed=71).state_dict(), str(path))
    make_video(tmp_path / "v.mp4", n=6, width=32, height=32)
    return tmp_path, path


def poison(monkeypatch, method: str, bad: tuple[torch.dtype, ...]):
    """Make VAE.<method> put a NaN and an inf into its result whenever it computes in one of `bad` dtypes."""
    real = getattr(VAE, method)

    def patched(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dtype in bad:
            out = out.contiguous().clone()
            out.view(-1)[0], out.view(-1)[-1] = float("nan"), float("inf")
        return out

    monkeypatch.setattr(VAE, method, patched)


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def test_decode_redoes_non_finite_fp16_windows_in_bf16(setup, monkeypatch):
    tmp, model = setup
    run("encode", tmp / "v.mp4", "-m", model)
    lat = tmp / "v.latents.safetensors"
    run("decode", lat, "-m", model, "--dtype", "bf16", "--chunk", "3", "--overlap", "0", "-o", f"{tmp}/bf16/")
    poison(monkeypatch, "decode", (torch.float16,))
    result = run("decode", lat, "-m", model, "--dtype", "fp16", "--chunk", "3", "--overlap", "0", "-o", f"{tmp}/fp16/",
                 "--json")
    data = json.loads(result.stdout)
    assert data["precision_fallbacks"] == [{"where": "frames 0-2", "from": "fp16", "to": "bf16"},
                                           {"where": "frames 3-5", "from": "fp16", "to": "bf16"}]
    assert "fp16 gave inf/NaN in frames 0-2; redoing it in bf16" in result.stderr
    redone = [iio.imread(p) for p in sorted((tmp / "fp16").iterdir())]
    direct = [iio.imread(p) for p in sorted((tmp / "bf16").iterdir())]
    assert len(redone) == 6 and all(np.array_equal(a, b) for a, b in zip(redone, direct))  # = a bf16 decode


def test_encode_falls_back_to_fp32_when_bf16_fails_too(setup, monkeypatch):
    tmp, model = setup
    run("encode", tmp / "v.mp4", "-m", model, "--dtype", "fp32", "-o", tmp / "fp32.safetensors")
    poison(monkeypatch, "moments", (torch.float16, torch.bfloat16))
    result = run("encode", tmp / "v.mp4", "-m", model, "--dtype", "fp16", "--batch", "6", "--json",
                 "-o", tmp / "fp16.safetensors")
    data = json.loads(result.stdout)
    assert data["precision_fallbacks"] == [{"where": "frames 0-5", "from": "fp16", "to": "bf16"},
                                           {"where": "frames 0-5", "from": "bf16", "to": "fp32"}]
    got, ref = load_file(tmp / "fp16.safetensors")["latents"], load_file(tmp / "fp32.safetensors")["latents"]
    assert torch.isfinite(got).all() and torch.equal(got, ref)  # the fp32 redo is exactly the fp32 encode


def test_finite_half_results_are_kept(setup):
    tmp, model = setup
    data = json.loads(run("encode", tmp / "v.mp4", "-m", model, "--dtype", "bf16", "--json").stdout)
    assert data["precision_fallbacks"] == []


# ------------------------------------------------------------------------------ the dtype `auto` picks per stage

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


@pytest.mark.parametrize("extra, feature", [("avx512_bf16", "avx512_bf16"), ("amx_bf16 amx_tile", "amx_bf16"),
                                            ("avx512bw", None), ("", None)])
def test_cpu_bf16_is_read_from_the_flags(monkeypatch, extra, feature):
    from vaecli.ops.device import cpu_bf16_feature

    monkeypatch.delenv("VAECLI_CPU_BF16")
    assert cpu_bf16_feature(CPUINFO.format(extra=extra)) == feature
    monkeypatch.setenv("VAECLI_CPU_BF16", "1")
    assert cpu_bf16_feature(CPUINFO.format(extra="")) == "VAECLI_CPU_BF16=1"


def test_auto_is_bf16_for_cpu_decodes_with_native_bf16_and_fp32_for_encodes(monkeypatch):
    from vaecli.ops.device import choose_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv("VAECLI_CPU_BF16")
    native, plain = CPUINFO.format(extra="avx512_bf16"), CPUINFO.format(extra="")
    dtype, why = choose_dtype("auto", cpu, "decode", native)
    assert dtype == torch.bfloat16 and "native bf16 (avx512_bf16)" in why
    dtype, why = choose_dtype("auto", cpu, "decode", plain)
    assert dtype == torch.float32 and "without native bf16" in why
    for info in (native, plain):
        assert choose_dtype("auto", cpu, "encode", info)[0] == torch.float32
    for stage in ("encode", "decode"):  # --dtype forces one dtype for both
        dtype, why = choose_dtype("bf16", cpu, stage, plain)
        assert dtype == torch.bfloat16 and "chosen by the user" in why
        assert choose_dtype("fp32", cpu, stage, native)[0] == torch.float32


def test_jobs_say_which_dtype_each_stage_ran_and_why(setup, monkeypatch):
    """With native bf16 (mocked), decode and roundtrip decode in bf16 and encode in fp32, and the plans say why;
    the bf16 decode's frames are those of the fp32 decode within bf16 rounding (a random model amplifies it)."""
    tmp, model = setup
    monkeypatch.setenv("VAECLI_CPU_BF16", "1")
    lat = tmp / "v.latents.safetensors"
    enc = json.loads(runner.invoke(app, ["encode", str(tmp / "v.mp4"), "-m", str(model), "-o", str(lat),
                                         "--json"]).stdout)
    assert enc["dtype"] == "fp32" and any("fp32: auto for encoding" in r for r in enc["plan"]["reasons"])
    res = runner.invoke(app, ["decode", str(lat), "-m", str(model), "-o", f"{tmp}/bf/", "--format", "png", "--json"])
    dec = json.loads(res.stdout)
    assert dec["dtype"] == "bf16" and dec["plan"]["dtype"] == "bf16"
    assert any("bf16: auto for decoding on a CPU with native bf16" in r for r in dec["plan"]["reasons"])
    ref = json.loads(runner.invoke(app, ["decode", str(lat), "-m", str(model), "-o", f"{tmp}/fp/", "--format",
                                         "png", "--dtype", "fp32", "--json"]).stdout)
    assert ref["dtype"] == "fp32" and any("chosen by the user" in r for r in ref["plan"]["reasons"])
    for name in sorted(p.name for p in (tmp / "fp").iterdir()):
        a, b = (iio.imread(tmp / d / name).astype(int) for d in ("bf", "fp"))
        assert np.abs(a - b).mean() < 3 and np.abs(a - b).max() <= 32, name  # a random model amplifies bf16 rounding
    rt = json.loads(runner.invoke(app, ["roundtrip", str(tmp / "v.mp4"), "-m", str(model), "-o",
                                        str(tmp / "rt.mp4"), "--json"]).stdout)
    assert rt["dtype"] == "fp32" and rt["decode_dtype"] == "bf16" and rt["plan"]["dtype"] == "bf16"
    plan = json.loads(runner.invoke(app, ["plan", str(tmp / "v.mp4"), "-m", str(model), "--json"]).stdout)
    assert plan["encode"]["dtype"] == "fp32" and plan["dtype"] == "bf16"
    monkeypatch.setenv("VAECLI_CPU_BF16", "0")
    plan = json.loads(runner.invoke(app, ["plan", str(lat), "-m", str(model), "--json"]).stdout)
    assert plan["dtype"] == "fp32" and any("without native bf16" in r for r in plan["reasons"])


def test_free_heap_pages_go_back_to_the_system_between_steps():
    """Tensors under glibc's mmap threshold live in the heap; freeing every other one leaves resident holes, which
    `release_host_memory` gives back (RSS drops by most of the freed bytes); a no-op on other devices."""
    import sys

    from vaecli.ops.device import process_rss, release_host_memory

    assert not release_host_memory(torch.device("meta"))
    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    blocks = [torch.ones(16 * 1024) for _ in range(2048)]  # 64 KiB each, 128 MiB in all, touched
    del blocks[::2]  # 64 MiB of holes between live blocks: not at the heap's top, so free() keeps them resident
    before = process_rss()
    assert release_host_memory(torch.device("cpu"))
    assert before - process_rss() > 48 << 20
    assert all(float(b[0]) == 1.0 for b in blocks)  # the live blocks are untouched
