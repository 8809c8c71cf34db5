"""Hardening, round two: the families of bad input that ended in a traceback, a kill, a frozen bar or silence.

Each test fails on the code before the fix: non-UTF-8 text files, numbers at the edges of options, a full disk
in every writer, multi-frame images, checkpoints whose shapes disagree, empty paths, metadata of the wrong type,
absurd name patterns, a CPU plan that does not fit, Ctrl-C, approximate plans, half precision on a CPU that
emulates it, and a progress bar that must keep ticking.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vaecli.cli import app

runner = CliRunner()


def one_error(res, code: int, *needles: str) -> str:
    """The run ended with `code` and exactly one `error:` line holding every needle, no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == code, (res.exit_code, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def stray(folder, keep=()) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in keep)


def test_text_files_that_are_not_utf8(corpus, tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"clip.mp4\n\xff\xfe\x80 bad\n")
    one_error(runner.invoke(app, ["encode", "--manifest", str(manifest), "-m", str(corpus.model), "-q"]), 2,
              "not UTF-8")
    config = tmp_path / "c.toml"
    config.write_bytes(b'name = "\xff\xfe"\n')
    one_error(runner.invoke(app, ["plan", str(corpus.video), "--config", str(config)]), 2, "not UTF-8")


@pytest.mark.parametrize("args", [
    ["encode", "{video}", "--batch", "9" * 40], ["encode", "{video}", "--frames", "9" * 400],
    ["encode", "{video}", "--stride", "9" * 30], ["plan", "{video}", "--batch", "100000"],
    ["decode", "{latents}", "--tile", "9" * 25], ["decode", "{latents}", "--chunk", "9" * 25],
    ["decode", "{latents}", "--fps", "0.001"], ["decode", "{latents}", "--fps", "1e-300"],
    ["decode", "{latents}", "--fps", "9" * 400], ["encode", "{video}", "--max-memory", "9" * 31 + "GiB"],
    ["encode", "{video}", "--max-pixels", "9" * 30]])
def test_numbers_at_the_edges_of_options(corpus, tmp_path, args):
    args = [a.format(video=corpus.video, latents=corpus.latents) for a in args]
    out = tmp_path / ("o.mp4" if args[0] == "decode" else "o.latents.safetensors")
    res = runner.invoke(app, args + ["-m", str(corpus.model)] + (["-o", str(out)] if args[0] != "plan" else []))
    one_error(res, 2)
    assert stray(tmp_path) == []


@pytest.mark.parametrize("fmt", ["gif", "mp4", "webm"])
def test_the_slowest_and_fastest_frame_rates_write_every_format(corpus, tmp_path, fmt):
    for fps in ("0.01", "10000"):
        out = tmp_path / f"o{fps}.{fmt}"
        res = runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o", str(out),
                                  "--fps", fps, "-q"])
        assert res.exit_code == 0 and out.stat().st_size > 0, res.stderr


# ------------------------------------------------------------------------------------------------ full disks

def _limited(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("case", ["encode", "encode-comfy", "decode-mp4", "decode-gif", "decode-png",
                                  "convert-file", "convert-folder"])
def test_a_write_that_fails_in_any_writer_is_one_line_and_leaves_nothing(corpus, tmp_path, case):
    """Every writer under a file-size limit (the kernel refuses writes past it: EFBIG, as ENOSPC on a full
    disk): one `write failed` line, exit 1, nothing left beside the output (no .partial, no .raw)."""
    out = tmp_path / "out"
    out.mkdir()
    m = str(corpus.model)
    args, limit = {
        "encode": (["encode", str(corpus.video), "-m", m, "-o", str(out / "z.latents.safetensors")], 600),
        "encode-comfy": (["encode", str(corpus.video), "-m", m, "-o", str(out / "z.latents.safetensors"),
                          "--export", "comfy"], 600),
        "decode-mp4": (["decode", str(corpus.latents), "-m", m, "-o", str(out / "v.mp4")], 300),
        "decode-gif": (["decode", str(corpus.latents), "-m", m, "-o", str(out / "v.gif")], 300),
        "decode-png": (["decode", str(corpus.latents), "-m", m, "-o", f"{out}/frames/"], 300),
        "convert-file": (["convert", m, "-o", str(out / "c.safetensors"), "--to", "diffusers"], 4096),
        "convert-folder": (["convert", m, "-o", str(out / "folder"), "--to", "diffusers"], 4096),
    }[case]
    res = subprocess.run([sys.executable, "-m", "vaecli", *args, "-q"] if args[0] != "convert" else
                         [sys.executable, "-m", "vaecli", *args], capture_output=True, text=True,
                         preexec_fn=_limited(limit), timeout=300)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "write failed (File too large)" in lines[0], lines[0]
    assert stray(out) == [], stray(out)


# ------------------------------------------------------------------------------------------------ inputs

def test_images_with_many_frames_are_clips_and_refused_inside_a_sequence(corpus, tmp_path):
    rng = np.random.default_rng(3)
    pages = [Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(3)]
    for name in ("pages.tif", "anim.png"):
        pages[0].save(tmp_path / name, save_all=True, append_images=pages[1:], duration=100)
        res = runner.invoke(app, ["encode", str(tmp_path / name), "-m", str(corpus.model), "-o",
                                  str(tmp_path / f"{name}.latents.safetensors"), "--json", "-q"])
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["frames"] == 3, name  # every frame taken, as a GIF's
    seq = tmp_path / "seq"
    seq.mkdir()
    pages[0].save(seq / "a.png")
    pages[0].save(seq / "b.tif", save_all=True, append_images=pages[1:])
    one_error(runner.invoke(app, ["encode", str(seq), "-m", str(corpus.model), "-o",
                                  str(tmp_path / "s.latents.safetensors"), "-q"]), 1, "b.tif", "3 frames")


def test_checkpoints_whose_shapes_disagree(corpus, tmp_path):
    for key, shape in (("decoder.conv_in.weight", (-1,)), ("encoder.conv_in.weight", ()),
                       ("decoder.conv_out.weight", (-1,))):
        state = dict(corpus.state)
        state[key] = state[key].reshape(shape).contiguous() if shape else torch.zeros(())
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path))
        one_error(runner.invoke(app, ["info", str(path)]), 1, key)
    state = dict(corpus.state)
    state["encoder.mid.block_1.norm2.weight"] = torch.zeros(())  # a 0-D tensor reached the weights' hash
    save_file(state, str(tmp_path / "scalar.safetensors"))
    one_error(runner.invoke(app, ["decode", str(corpus.latents), "-m", str(tmp_path / "scalar.safetensors"), "-o",
                                  str(tmp_path / "o.mp4"), "--allow-model-mismatch"]), 1, "norm2.weight")
    wan = dict(corpus.wan_state)
    wan["model.conv2.weight"] = torch.zeros(())
    save_file(wan, str(tmp_path / "wan.safetensors"))
    one_error(runner.invoke(app, ["info", str(tmp_path / "wan.safetensors")]), 1, "conv2.weight")


def test_convert_of_a_checkpoint_missing_a_tensor_names_it(corpus, tmp_path):
    state = dict(corpus.state)
    del state["encoder.conv_out.weight"]  # found by scripts/fuzz.py --seed 2: a KeyError in the conversion
    save_file(state, str(tmp_path / "vae.safetensors"))
    for to in ("diffusers", "sgm"):
        one_error(runner.invoke(app, ["convert", str(tmp_path / "vae.safetensors"), "-o",
                                      str(tmp_path / f"c_{to}.safetensors"), "--to", to]), 1, "missing")
    assert stray(tmp_path) == ["vae.safetensors"]


def test_metadata_of_the_wrong_type(corpus, tmp_path):
    folder = tmp_path / "vae"
    res = runner.invoke(app, ["convert", str(corpus.model), "-o", str(folder), "--to", "diffusers"])
    assert res.exit_code == 0, res.stderr
    config = json.loads((folder / "config.json").read_text())
    for bad in ("abc", [1, 2], {"x": 1}, True, 1e300):
        config["scaling_factor"] = bad
        (folder / "config.json").write_text(json.dumps(config))
        one_error(runner.invoke(app, ["info", str(folder)]), 1, "scaling_factor")


def test_empty_paths_and_absurd_patterns(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = ["-m", str(corpus.model)]
    for args in (["encode", str(corpus.video), "--out-dir", "", *m], ["decode", str(corpus.latents), "-o", "", *m],
                 ["decode", str(corpus.latents), "--scratch", " ", *m],
                 ["encode", "--manifest", "", str(corpus.video), *m], ["convert", str(corpus.model), "-o", ""]):
        one_error(runner.invoke(app, args), 2, "empty")
    one_error(runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o",
                                  "f_%999999999999d.png"]), 2, "width")
    assert os.listdir(tmp_path) == []  # nothing landed in the working folder


# ------------------------------------------------------------------------------------------------ plans

def test_a_cpu_plan_that_does_not_fit_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    """No "trying anyway" on CPU (an out-of-memory there is a SIGKILL): the refusal names a --max-memory that
    the same command then accepts."""
    from vaecli.pipeline import planner

    monkeypatch.setattr(planner, "default_budget", lambda device: 1 << 20)
    out = tmp_path / "z.latents.safetensors"
    line = one_error(runner.invoke(app, ["encode", str(corpus.video), "-m", str(corpus.model), "-o", str(out),
                                         "--size", "256x192"]), 1, "needs about", "--max-memory")
    need = line.split("--max-memory ")[1].split()[0]
    assert not out.exists()
    res = runner.invoke(app, ["encode", str(corpus.video), "-m", str(corpus.model), "-o", str(out), "--size",
                              "256x192", "--max-memory", need, "-q"])
    assert res.exit_code == 0 and out.exists(), res.stderr


def test_an_approximate_decode_says_so_on_stderr(corpus, tmp_path):
    res = runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o", str(tmp_path / "a.mp4"),
                              "--chunk", "2", "--overlap", "1"])
    assert res.exit_code == 0 and "APPROXIMATE" in res.stderr and "forced by --chunk" in res.stderr
    res = runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o", str(tmp_path / "b.mp4")])
    assert res.exit_code == 0 and "APPROXIMATE" not in res.stderr
    quiet = runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o",
                                str(tmp_path / "c.mp4"), "--chunk", "2", "--overlap", "1", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_half_precision_on_a_cpu_that_emulates_it_warns(corpus, tmp_path, monkeypatch):
    from vaecli.ops import device

    monkeypatch.setattr(device, "_cpu_flags", lambda cpuinfo=None: set())
    res = runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o", str(tmp_path / "a.mp4"),
                              "--dtype", "fp16"])
    assert res.exit_code == 0 and "emulated" in res.stderr and "--dtype auto" in res.stderr
    res = runner.invoke(app, ["decode", str(corpus.latents), "-m", str(corpus.model), "-o", str(tmp_path / "b.mp4")])
    assert res.exit_code == 0 and "emulated" not in res.stderr
    monkeypatch.setattr(device, "_cpu_flags", lambda cpuinfo=None: {"avx512_fp16"})
    assert device.slow_half_warning(torch.float16, torch.device("cpu")) is None
    import vaecli

    monkeypatch.setattr(device, "_cpu_flags", lambda cpuinfo=None: set())
    with pytest.warns(UserWarning, match="emulated"):
        vaecli.load_vae(corpus.model, dtype=torch.bfloat16)
    assert next(vaecli.load_vae(corpus.model, dtype="auto").parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ interaction

def test_ctrl_c_in_a_batch_says_interrupted_with_a_summary(corpus, tmp_path, monkeypatch):
    from vaecli.pipeline import runner as pipeline_runner

    real, calls = pipeline_runner.decode_file, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_runner, "decode_file", interrupted)
    inputs = []
    for i in range(3):
        inputs.append(tmp_path / f"c{i}.latents.safetensors")
        inputs[-1].write_bytes(corpus.latents_bytes)
    out = tmp_path / "out"
    out.mkdir()
    res = runner.invoke(app, ["decode", *map(str, inputs), "-m", str(corpus.model), "--out-dir", str(out)])
    assert res.exit_code == 130, res.stderr
    assert "interrupted: decode 1 done, 0 skipped, 0 failed of 3" in res.stderr and "--skip-existing" in res.stderr
    calls[:] = [1]  # the next call is interrupted
    res = runner.invoke(app, ["roundtrip", str(corpus.video), "-m", str(corpus.model), "-o", str(tmp_path / "r.mp4")])
    assert res.exit_code == 130 and "interrupted" in res.stderr  # decode_file is patched: a single command too


def test_the_progress_bar_ticks_while_frames_take_long(capsys):
    from vaecli.pipeline.progress import Progress

    progress = Progress(bars=True, notes=True)
    bar = progress.frames(10, "decode x")
    time.sleep(2.3)
    bar.update(1)
    progress.close()
    err = capsys.readouterr().err
    assert "00:01" in err and "00:02" in err  # the elapsed time was redrawn while no frame came
