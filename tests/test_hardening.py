"""Regression tests for the hardening issue: data loss, symlinks, stale temporaries, validation, non-finite data,
non-regular files, pixel limits, one-line usage errors, escaping, playlists, outputs that fail together."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import fuzzcases
from helpers import make_video
from vaecli.cli import app
from vaecli.errors import InputError, OutputError, printable
from vaecli.ops import files, validate

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result, code=1, text=""):
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert text in lines[0], lines[0]
    return lines[0]


def decode(corpus, *args):
    return run("decode", corpus.latents, "-m", corpus.model, "-q", *args)


# ------------------------------------------------------------------------------------------ data loss


def test_overwrite_never_removes_a_folder_holding_other_files(tmp_path, corpus):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    one_error(decode(corpus, "-o", f"{keep}/", "--overwrite"), 1, "holds files vaecli did not write (notes.txt)")
    assert (keep / "notes.txt").read_text() == "mine"
    # a folder of its own frames is replaced
    frames = tmp_path / "frames"
    assert decode(corpus, "-o", f"{frames}/").exit_code == 0
    first = sorted(os.listdir(frames))
    assert first and all(n.startswith("frame_") for n in first)
    assert decode(corpus, "-o", f"{frames}/", "--overwrite").exit_code == 0
    assert sorted(os.listdir(frames)) == first


def test_pattern_overwrite_replaces_only_its_frames(tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "img_0099.png").write_bytes(b"old frame of an earlier, longer run")
    pattern = out / "img_%04d.png"
    one_error(decode(corpus, "-o", pattern), 1, "exists; pass --overwrite")
    assert decode(corpus, "-o", pattern, "--overwrite").exit_code == 0
    names = sorted(os.listdir(out))
    assert "notes.txt" in names and (out / "notes.txt").read_text() == "mine"
    assert "img_0099.png" not in names and [n for n in names if n.startswith("img_")] == \
        [f"img_{i:04d}.png" for i in range(3)]


def test_convert_overwrite_keeps_foreign_files(tmp_path, corpus):
    from vaecli.model.svd.layout import save_checkpoint

    out = tmp_path / "conv"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("convert", corpus.model, "-o", out, "--to", "diffusers", "--overwrite")
    one_error(result, 1, "holds files vaecli did not write")
    assert (out / "notes.txt").exists()
    assert save_checkpoint  # the module imports


@pytest.mark.parametrize("target", [".", "..", "/", "~", "cwd-parent"])
def test_protected_folders_are_never_outputs(tmp_path, corpus, monkeypatch, target):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / "a" / "precious.txt").write_text("x")
    monkeypatch.chdir(work)
    target = {"~": str(os.path.expanduser("~")), "cwd-parent": str(tmp_path / "a")}.get(target, target)
    result = decode(corpus, "-o", target if target.endswith("/") else target + "/", "--overwrite")
    assert result.exit_code in (1, 2) and "error: " in result.stderr
    assert (tmp_path / "a" / "precious.txt").exists() and work.is_dir()
    assert files.protected(files.Path(target)) is not None or target == "/"


def test_temporaries_ignore_planted_symlinks(tmp_path, corpus):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    out = tmp_path / "o.latents.safetensors"
    # the names the old code used, and names in the new scheme: links there must never be written through
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        for name in (f".{out.name}.{pid}.partial", f".{out.name}.{pid}.latents.raw",
                     f".o.mp4.{pid}.partial"):
            os.symlink(victim, tmp_path / name)
    assert run("encode", corpus.video, "-m", corpus.model, "-o", out, "-q").exit_code == 0
    assert decode(corpus, "-o", tmp_path / "o.mp4").exit_code == 0
    assert victim.read_text() == "do not touch"
    # an output that is itself a link is replaced as a link, not written through
    link = tmp_path / "l.mp4"
    os.symlink(victim, link)
    assert decode(corpus, "-o", link, "--overwrite").exit_code == 0
    assert victim.read_text() == "do not touch" and not link.is_symlink()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, corpus):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".o.mp4.vaecli-{dead.pid}-abc123.partial",
             tmp_path / f".o.mp4.vaecli-{dead.pid}-def456.latents.raw"]
    live = tmp_path / f".o.mp4.vaecli-{os.getppid()}-zzz999.partial"  # a live process's: kept
    other = tmp_path / f".other.mp4.vaecli-{dead.pid}-abc123.partial"  # another output's: kept
    for p in stale + [live, other]:
        p.write_text("x")
    assert decode(corpus, "-o", tmp_path / "o.mp4").exit_code == 0
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()


def test_killed_encode_leaves_recognisable_temporaries(tmp_path, corpus):
    video = tmp_path / "long.mp4"
    make_video(video, n=40, width=64, height=48)
    out = tmp_path / "long.latents.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "vaecli", "encode", str(video), "-m", str(corpus.model), "-o",
                             str(out), "--batch", "1", "-q"])
    deadline = time.time() + 120
    while time.time() < deadline and not any(".raw" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert left and all(files._TEMP.match(n) for n in left), left
    assert run("encode", video, "-m", corpus.model, "-o", out, "-q", "--frames", "2").exit_code == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_outputs_fail_together(tmp_path, corpus, monkeypatch):
    from vaecli.pipeline import latents_io

    out = tmp_path / "z.latents.safetensors"
    original = latents_io.LatentFileWriter.finish

    def finish(self, path, metadata, empty=(), **kwargs):
        if empty:  # the ComfyUI .latent: the disk fills up
            raise files.write_error(path, OSError(28, "No space left on device"))
        return original(self, path, metadata, empty, **kwargs)

    monkeypatch.setattr(latents_io.LatentFileWriter, "finish", finish)
    one_error(run("encode", corpus.video, "-m", corpus.model, "-o", out, "--export", "comfy", "-q"), 1,
              "write failed (No space left on device)")
    assert not out.exists() and not (tmp_path / "z.latent").exists() and not list(tmp_path.iterdir())


def test_roundtrip_checks_every_output_first(tmp_path, corpus):
    one_error(run("roundtrip", corpus.video, "-m", corpus.model, "-o", tmp_path / "r.mp4", "--report",
                  tmp_path / "missing" / "x.json", "-q"), 1, "does not exist")
    assert not (tmp_path / "r.mp4").exists()


def test_gif_disk_full_is_one_line(tmp_path, corpus, monkeypatch):
    from vaecli.pipeline import video_io

    def full(self, image):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video_io.GifWriter, "write", full)
    one_error(decode(corpus, "-o", tmp_path / "o.gif"), 1, "write failed (No space left on device)")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ output names


@pytest.mark.parametrize("command,name,text", [
    ("encode", "x.mp4", "end the name in .latents.safetensors"),
    ("encode", "newdir/", "is a folder"),
    ("encode", "existing", "is a folder"),
    ("decode", "x.safetensors", "not .safetensors"),
    ("decode", "x_%d_%d.png", "exactly one %d"),
    ("decode", "noext", "cannot tell the format"),
])
def test_output_names_that_say_another_kind_are_refused(tmp_path, corpus, command, name, text):
    (tmp_path / "existing").mkdir()
    args = ([command, corpus.video] if command == "encode" else [command, corpus.latents])
    result = run(*args, "-m", corpus.model, "-o", f"{tmp_path}/{name}", "--overwrite", "-q")
    one_error(result, 2, text)
    assert sorted(os.listdir(tmp_path)) == ["existing"]


def test_png_outputs(tmp_path, corpus):
    one = tmp_path / "one.png"
    one_error(decode(corpus, "-o", one), 2, "names one image but the latents hold 3 frames")
    single = tmp_path / "single.latents.safetensors"
    assert run("encode", corpus.video, "-m", corpus.model, "-o", single, "--frames", "1", "-q").exit_code == 0
    assert run("decode", single, "-m", corpus.model, "-o", one, "-q").exit_code == 0
    assert one.is_file() and one.read_bytes()[:4] == b"\x89PNG"
    assert run("decode", single, "-m", corpus.model, "-o", tmp_path / "two.png", "--format", "png", "-q").exit_code == 0
    assert (tmp_path / "two.png").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert decode(corpus, "-o", existing).exit_code == 0  # an existing folder: PNG frames in it
    assert sorted(os.listdir(existing)) == [f"frame_{i:05d}.png" for i in range(3)]
    os.chdir(tmp_path)
    try:
        assert decode(corpus, "-o", "frames_%04d.png").exit_code == 0
    finally:
        os.chdir("/")
    assert (tmp_path / "frames_0000.png").is_file()


# ------------------------------------------------------------------------------------------ validation


def edited_latents(corpus, tmp_path, **meta):
    header, body = fuzzcases.split_safetensors(corpus.latents_bytes)
    header["__metadata__"].update(meta)
    path = tmp_path / "edited.latents.safetensors"
    path.write_bytes(fuzzcases.join_safetensors(header, body))
    return path


@pytest.mark.parametrize("field,value,text", [
    ("fps", "abc", "fps 'abc' is not a frame rate"), ("fps", "0/0", "not a frame rate"),
    ("fps", "1/0", "not a frame rate"), ("fps", "24/-1", "not a frame rate"), ("fps", "-24", "out of range"),
    ("fps", "1e308", "out of range"), ("scaling_factor", "abc", "not a number"),
    ("scaling_factor", "nan", "out of range"), ("scaling_factor", "0x1p-3", "not a number"),
    ("scaling_factor", "1e-320", "out of range"), ("geometry", "null", "not a JSON object"),
    ("geometry", "[1, 2]", "not a JSON object"),
    ("geometry", json.dumps({"source": [100000, 100000], "resized": [16, 12], "processed": [16, 12], "fit": "pad",
                             "box": [0, 0, 16, 12]}), "more than --max-pixels"),
    ("geometry", json.dumps({"source": [-16, 12], "resized": [16, 12], "processed": [16, 12], "fit": "pad",
                             "box": [0, 0, 16, 12]}), "not [width, height] of positive integers"),
    ("geometry", json.dumps({"source": [16, 12], "resized": [16, 12], "processed": [16, 12], "fit": "pad",
                             "box": [-5, 0, 99, 12]}), "does not place"),
    ("frame_count", "7", "does not match"),
])
def test_latent_metadata_is_validated(tmp_path, corpus, field, value, text):
    path = edited_latents(corpus, tmp_path, **{field: value})
    line = one_error(run("decode", path, "-m", corpus.model, "-o", tmp_path / "o.mp4", "-q"), 1, text)
    assert field in line and "edited.latents.safetensors" in line
    assert not (tmp_path / "o.mp4").exists()


def test_declared_shapes_are_checked_against_the_bytes(tmp_path, corpus):
    header, body = fuzzcases.split_safetensors(corpus.latents_bytes)
    for shape, text in (([10**6, 4, 6, 8], "needs"), ([0, 4, 6, 8], "needs 0 bytes"), ([3, 4, 6], "needs")):
        header["latents"]["shape"] = shape
        path = tmp_path / "bad.latents.safetensors"
        path.write_bytes(fuzzcases.join_safetensors(header, body))
        for command in ("decode", "plan", "info"):
            extra = ["-o", tmp_path / "o.mp4"] if command == "decode" else []
            started = time.perf_counter()
            one_error(run(command, path, "-m", corpus.model, *extra), 1, text) if command != "info" else \
                one_error(run("info", path), 1, text)
            assert time.perf_counter() - started < 30  # no hang (the old code read a million frames)


def test_deep_and_odd_headers(tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(fuzzcases.join_safetensors("[" * 50000 + "]" * 50000, b""))
    with pytest.raises(InputError, match="nested too deep|not a JSON object"):
        validate.safetensors_header(path)
    path.write_bytes(fuzzcases.join_safetensors('{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}',
                                                b"\0" * 8))
    with pytest.raises(InputError, match="Infinity is not allowed"):
        validate.safetensors_header(path)


def test_nonfinite_latents_are_refused(tmp_path, corpus):
    header, body = fuzzcases.split_safetensors(corpus.latents_bytes)
    values = np.frombuffer(body, dtype=np.float32).copy()
    per_frame = values.size // 3
    values[per_frame * 2 + 5] = np.nan
    path = tmp_path / "nan.latents.safetensors"
    path.write_bytes(fuzzcases.join_safetensors(header, values.tobytes()))
    one_error(run("decode", path, "-m", corpus.model, "-o", tmp_path / "o.mp4"), 1, "first in frame 2")
    assert not (tmp_path / "o.mp4").exists()
    assert run("decode", path, "-m", corpus.model, "-o", tmp_path / "o.mp4", "--allow-nonfinite", "-q").exit_code == 0


def test_nonfinite_weights_are_refused(tmp_path, corpus):
    state = dict(corpus.state)
    key = sorted(state)[3]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("inf")
    path = tmp_path / "inf.safetensors"
    save_file(state, str(path))
    one_error(run("encode", corpus.video, "-m", path, "-o", tmp_path / "z.latents.safetensors"), 1,
              f"tensor {key} holds NaN or inf")
    one_error(run("info", path), 1, "holds NaN or inf")


def test_nonfinite_encoder_result_is_an_error(tmp_path, corpus, monkeypatch):
    from vaecli.model.svd.vae import VAE

    real = VAE.moments

    def broken(self, x, *args, **kwargs):
        out = real(self, x, *args, **kwargs)
        return out * float("nan")

    monkeypatch.setattr(VAE, "moments", broken)
    out = tmp_path / "z.latents.safetensors"
    one_error(run("encode", corpus.video, "-m", corpus.model, "-o", out), 1, "encoder gave NaN or inf")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["model", "video", "latents", "config"])
def test_fifos_are_refused_at_once(tmp_path, corpus, kind):
    fifo = tmp_path / {"model": "m.safetensors", "video": "v.mp4", "latents": "l.latents.safetensors",
                       "config": "config.json"}[kind]
    os.mkfifo(fifo)
    if kind == "model":
        result = run("encode", corpus.video, "-m", fifo, "-o", tmp_path / "z.latents.safetensors")
    elif kind == "video":
        result = run("encode", fifo, "-m", corpus.model, "-o", tmp_path / "z.latents.safetensors")
    elif kind == "latents":
        result = run("decode", fifo, "-m", corpus.model, "-o", tmp_path / "o.mp4")
    else:
        folder = tmp_path
        save_file(corpus.state, str(folder / "diffusion_pytorch_model.safetensors"))
        result = run("info", folder)
    one_error(result, 1, "not a regular file")


def test_pixel_limit(tmp_path, corpus):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(fuzzcases.png_bomb(12000, 12000))
    one_error(run("encode", bomb, "-m", corpus.model, "-o", tmp_path / "z.latents.safetensors"), 1,
              "more than --max-pixels")
    one_error(run("encode", corpus.video, "-m", corpus.model, "-o", tmp_path / "z.latents.safetensors",
                  "--max-pixels", "100"), 1, "frames of 16x12 = 192 pixels are more than --max-pixels 100")
    one_error(run("encode", corpus.video, "-m", corpus.model, "-o", tmp_path / "z.latents.safetensors",
                  "--size", "100000x100000"), 1, "more than --max-pixels")


def test_tiny_sources_encode(tmp_path, corpus):
    for w, h in ((1, 1), (7, 3), (3, 7)):
        png = tmp_path / f"t{w}x{h}.png"
        png.write_bytes(fuzzcases._png(np.full((h, w, 3), 100, np.uint8)))
        result = run("encode", png, "-m", corpus.model, "-o", tmp_path / f"t{w}x{h}.latents.safetensors", "-q")
        if result.exit_code:
            one_error(result, 1, "too small for model")
        else:
            with safe_open(str(tmp_path / f"t{w}x{h}.latents.safetensors"), "pt") as f:
                assert torch.isfinite(f.get_tensor("latents")).all()


def test_playlists_are_not_followed(tmp_path, corpus):
    (tmp_path / "other.mp4").write_bytes(corpus.video_bytes)
    for name in ("list.m3u8", "disguised.mp4"):
        (tmp_path / name).write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nother.mp4\n#EXT-X-ENDLIST\n")
        result = run("encode", tmp_path / name, "-m", corpus.model, "-o", tmp_path / "z.latents.safetensors")
        one_error(result, 1)
        assert not (tmp_path / "z.latents.safetensors").exists()


def test_usage_errors_are_one_line(corpus):
    for args in (["decode", "x", "--crf", "inf"], ["decode", "x", "--fps", "-1"], ["encode", "x", "--batch", "abc"],
                 ["decode", "--bogus"], ["encode", "x", "--crf", "10" * 30], ["convert"], ["frobnicate"]):
        one_error(run(*args), 2)
    assert run("--help").exit_code == 0 and "Usage" in run("--help").stdout


def test_control_characters_are_escaped(tmp_path, corpus):
    path = edited_latents(corpus, tmp_path, source="\x1b[2Jevil\nline", **{"model.name": "\x07bell"})
    result = run("info", path)
    assert result.exit_code == 0 and "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2Jevil\\nline" in result.stdout
    assert printable("a\nb\x1b") == "a\\nb\\x1b"
    odd = tmp_path / "odd\nname.mp4"
    result = run("decode", odd, "-m", corpus.model, "-o", tmp_path / "o.mp4")
    assert result.stderr.count("\n") == 1 and "odd\\nname" in result.stderr


def test_diffusers_config_is_validated(tmp_path, corpus):
    from vaecli.model.svd.layout import to_layout

    state, _ = to_layout(corpus.state, fuzzcases.CONFIG, "diffusers")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    for config, text in (("[1, 2]", "must be a JSON object"), ('{"a":' * 5000 + "1" + "}" * 5000, "nested too deep"),
                         ('{"scaling_factor": "abc"}', "scaling_factor 'abc' is not a number")):
        (tmp_path / "config.json").write_text(config)
        one_error(run("info", tmp_path), 1, text)


def test_output_checks_unit(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        files.check_outputs([files.Output(tmp_path / "d")], overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        files.check_outputs([files.Output(tmp_path / "nope" / "x")], overwrite=False)
    with pytest.raises(OutputError, match="named twice"):
        files.check_outputs([files.Output(tmp_path / "x"), files.Output(tmp_path / "x")], overwrite=False)
    with files.atomic_output(tmp_path / "f.txt") as tmp:
        assert files._TEMP.match(tmp.name) and tmp.is_file()
        tmp.write_text("ok")
    assert (tmp_path / "f.txt").read_text() == "ok"
    assert oct((tmp_path / "f.txt").stat().st_mode & 0o777) == oct(0o666 & ~files._umask())


# ------------------------------------------------------------------------------------------ CLI polish (issue 14)


def test_batch_inputs_with_one_output_name_are_refused(tmp_path, corpus):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "clip.mp4").write_bytes(corpus.video_bytes)
    (tmp_path / "o").mkdir()
    result = run("encode", tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4", "--out-dir", tmp_path / "o",
                 "-m", corpus.model, "--skip-existing")
    one_error(result, 2, "would both write")
    assert not list((tmp_path / "o").iterdir())


def test_stride_stores_the_effective_rate(tmp_path, corpus):
    out = tmp_path / "s.latents.safetensors"
    assert run("encode", corpus.video, "-m", corpus.model, "-o", out, "--stride", "2", "-q").exit_code == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["fps"] == "15000/1001"


def test_option_conflicts_and_ranges(tmp_path, corpus):
    one_error(run("encode", corpus.video, "-m", corpus.model, "--seed", "3"), 2, "--seed only applies with --sample")
    one_error(run("encode", corpus.video, "-m", corpus.model, "--skip-existing", "--overwrite"), 2, "contradict")
    one_error(decode(corpus, "-o", tmp_path / "o.mp4", "--crf", "60"), 2, "out of range for mp4 (0-51)")
    assert decode(corpus, "-o", tmp_path / "o.webm", "--crf", "60").exit_code == 0
    one_error(decode(corpus, "-o", tmp_path / "o2.mp4", "--crf", "99"), 2)


def test_decode_of_a_video_or_folder_says_so(tmp_path, corpus):
    one_error(run("decode", corpus.video, "-m", corpus.model), 1, "is a video or image, not a latent file")
    one_error(run("decode", tmp_path, "-m", corpus.model), 1, "is a folder")


def test_manifest_paths_are_relative_to_the_manifest(tmp_path, corpus, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (tmp_path / "clip.mp4").write_bytes(corpus.video_bytes)
    (lists / "todo.txt").write_text("# inputs\n../clip.mp4   # the only one\n\n")
    monkeypatch.chdir("/")
    result = run("encode", "--manifest", lists / "todo.txt", "-m", corpus.model, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "clip.latents.safetensors").is_file()


def test_debug_after_the_subcommand_and_bundled_model_by_name(tmp_path):
    result = run("info", tmp_path / "missing.safetensors", "--debug")
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert run("plan", tmp_path / "missing.mp4", "-m", "vaecli-small").stderr.count("error:") == 1
    result = run("info", "vaecli-small", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["path"].endswith("vaecli-small.safetensors")
    out = tmp_path / "small.safetensors"
    assert run("convert", "vaecli-small", "-o", out).exit_code == 0
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~files._umask())  # not mkstemp's 0600


def test_names_too_long_or_with_nul_are_one_line(tmp_path, corpus):
    long = "x" * 300 + ".mp4"
    one_error(run("encode", long, "-m", corpus.model), 1, "longer than a file name can be")
    one_error(run("encode", str(tmp_path / "a") + "/" + "y" * 5000, "-m", corpus.model), 1, "longer than")
    one_error(run("info", "z" * 400), 1, "longer than")
    one_error(run("decode", corpus.latents, "-m", "m" * 300 + "/x"), 1, "longer than")
    one_error(run("decode", corpus.latents, "-m", corpus.model, "-o", "o" * 300 + ".mp4"), 1, "longer than")
    with pytest.raises(InputError, match="NUL byte"):
        validate.path_text("a\0b")


def test_help_shows_flags_without_types_and_completion_is_on():
    text = run("decode", "--help").stdout
    assert "<bool>" not in text and "--no-" not in text
    assert "--overwrite " in text and "--native-size " in text and "--revision" in text
    assert "--install-completion" in run("--help").stdout
    # what --show-completion prints (it detects the shell from the parent process, which is pytest here)
    script = subprocess.run([sys.executable, "-m", "vaecli"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "_VAECLI_COMPLETE": "source_bash"})
    assert script.returncode == 0 and "_VAECLI_COMPLETE=complete_bash" in script.stdout
    env = {**os.environ, "_VAECLI_COMPLETE": "complete_bash", "COMP_WORDS": "vaecli decode --allow-n",
           "COMP_CWORD": "2"}
    words = subprocess.run([sys.executable, "-m", "vaecli"], capture_output=True, text=True, env=env, timeout=120)
    assert words.stdout.split() == ["--allow-nonfinite"]


def test_info_alone_describes_the_bundled_model():
    result = run("info")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("file:") and lines[0].endswith("vaecli/weights/vaecli-small.safetensors")
    assert lines[1].startswith("bundled:     yes")
    assert json.loads(run("info", "--json").stdout)["bundled"] is True
