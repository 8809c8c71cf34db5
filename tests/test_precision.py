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
