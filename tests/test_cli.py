"""The command line: through Typer's CliRunner and as a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import random_vae, tiny_config
from vaecli import __version__
from vaecli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    state = random_vae(tiny_config(), seed=40).state_dict()
    full = {f"first_stage_model.{k}": v for k, v in state.items()}
    full["model.diffusion_model.x"] = torch.ones(2)
    path = root / "svd_tiny.safetensors"
    save_file(full, str(path))
    return path, state


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_info_human_and_json(ckpt):
    path, state = ckpt
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    assert "sgm temporal VAE (SVD), full checkpoint, prefix first_stage_model." in result.stdout
    assert f"{sum(v.numel() for v in state.values()):,} in {len(state)} tensors (F32)" in result.stdout
    assert "attention:   sdpa" in result.stdout
    data = json.loads(invoke("info", path, "--json").stdout)
    assert data["layout"] == "sgm" and data["time_mode"] == "conv-only" and data["latent_channels"] == 4
    assert data["parameters"] == sum(v.numel() for v in state.values())
    assert data["attention"] == "sdpa" and data["config"]["ch_mult"] == [1, 2]
    data = json.loads(invoke("info", path, "--json", "--attention", "split").stdout)
    assert data["attention"] == "split" and data["attention_reason"] == "chosen by the user"


def test_convert_round_trip_through_the_cli(ckpt, tmp_path):
    path, state = ckpt
    r1 = invoke("convert", path, "--to", "diffusers", "-o", tmp_path / "diff")
    assert r1.exit_code == 0 and r1.stdout.strip() == str(tmp_path / "diff")
    r2 = invoke("convert", tmp_path / "diff", "--to", "sgm", "-o", tmp_path / "back.safetensors", "--json")
    assert r2.exit_code == 0
    assert json.loads(r2.stdout)["output"] == str(tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    r3 = invoke("convert", path, "--to", "sgm", "-o", tmp_path / "back.safetensors")
    assert r3.exit_code == 1 and "exists; pass --overwrite" in r3.stderr


@pytest.mark.parametrize("args,code,message", [
    (["info", "{tmp}/missing.safetensors"], 1, "no such file or folder"),
    (["info", "{tmp}/model.ckpt"], 1, "pickle-based PyTorch file"),
    (["info", "{tmp}/broken.safetensors"], 1, "corrupt safetensors header"),
    (["info", "{ckpt}", "--attention", "flash9"], 2, "unknown attention backend 'flash9'"),
    (["info", "{ckpt}", "--dtype", "fp8"], 2, "unknown dtype 'fp8'"),
    (["convert", "{ckpt}", "-o", "{tmp}/x.safetensors", "--to", "onnx"], 2, "--to must be sgm or diffusers"),
    (["convert", "{ckpt}", "-o", "{tmp}/x.bin", "--to", "sgm"], 2, "must end in .safetensors"),
])
def test_errors_are_one_line_with_exit_codes(ckpt, tmp_path, args, code, message):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04\x95")
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abcd")
    args = [a.format(tmp=tmp_path, ckpt=ckpt[0]) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == code
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "info", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "InputError" in result.stderr


def test_click_usage_errors_exit_2():
    result = runner.invoke(app, ["convert"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vaecli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_subprocess_version_info_and_failure(ckpt, tmp_path):
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"vaecli {__version__}"
    done = run_cli("info", ckpt[0], "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["tensors"] == len(ckpt[1])
    done = run_cli("info", tmp_path / "nothing.safetensors")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    done = run_cli("info", tmp_path / "nothing.safetensors", env={"VAECLI_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("vaecli") or os.path.join(os.path.dirname(sys.executable), "vaecli")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "convert" in done.stdout and "info" in done.stdout
