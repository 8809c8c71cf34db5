"""encode / decode / roundtrip end to end on generated videos, through CliRunner and as subprocesses."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import make_video, random_vae, read_video, tiny_config
from vaecli.cli import app
from vaecli.model.checkpoint import load_vae
from vaecli.pipeline.threads import background

runner = CliRunner()
CONFIG = tiny_config(ch_mult=(1, 1, 1, 1), num_res_blocks=1, name="tiny8")  # f = 8 like SVD, small


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny8.safetensors"
    vae = random_vae(CONFIG, seed=70)
    save_file(vae.state_dict(), str(path))
    return path


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def json_lines(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("fit", ["pad", "crop", "resize"])
@pytest.mark.parametrize("size", [(38, 30), (37, 29)])
def test_round_trip_keeps_frames_fps_and_size(tmp_path, model, fit, size):
    video = tmp_path / "clip.mp4"
    make_video(video, n=7, width=size[0], height=size[1], fps=Fraction(30000, 1001))
    enc = json_lines(ok("encode", video, "-m", model, "--fit", fit, "--json"))[0]
    latents = tmp_path / "clip.latents.safetensors"
    assert enc["output"] == str(latents) and enc["frames"] == 7
    processed = {"pad": (40, 32), "crop": (32, 24), "resize": (40, 32) if size == (38, 30) else (40, 32)}[fit]
    assert enc["shape"] == [7, 4, processed[1] // 8, processed[0] // 8]
    dec = json_lines(ok("decode", latents, "-m", model, "--json"))[0]
    assert dec["output"] == str(tmp_path / "clip.decoded.mp4")
    frames, fps = read_video(tmp_path / "clip.decoded.mp4")
    assert frames.shape == (7, size[1], size[0], 3) and fps == Fraction(30000, 1001)


def encode_directly(vae, frames):
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(x)


def test_latents_equal_scaled_vae_encode_and_metadata(tmp_path, model):
    video = tmp_path / "clip.mp4"
    make_video(video, n=5, width=48, height=32)
    source, _ = read_video(video)
    ok("encode", video, "-m", model, "--batch", "2", "--save-moments")
    vae = load_vae(model)
    with safe_open(str(tmp_path / "clip.latents.safetensors"), "pt") as f:
        latents, mean, meta = f.get_tensor("latents"), f.get_tensor("mean"), f.metadata()
    expected = encode_directly(vae, source)
    assert (latents - vae.config.scaling_factor * expected).abs().max() <= 1e-5
    assert (mean - expected).abs().max() <= 1e-5
    assert meta["fps"] == "30000/1001" and meta["frame_count"] == "5" and meta["source"] == "clip.mp4"
    assert meta["model.name"] == "tiny8" and len(meta["model.hash"]) == 16 and meta["posterior"] == "mode"
    assert json.loads(meta["geometry"])["processed"] == [48, 32] and meta["vaecli.format"] == "2"


def test_pad_is_reflect_and_frame_selection(tmp_path, model):
    video = tmp_path / "clip.mp4"
    make_video(video, n=12, width=44, height=30)
    source, _ = read_video(video)
    ok("encode", video, "-m", model, "--start", 2, "--stride", 3, "--frames", 3, "-o", tmp_path / "sel.safetensors")
    vae = load_vae(model)
    with safe_open(str(tmp_path / "sel.safetensors"), "pt") as f:
        latents, meta = f.get_tensor("latents"), f.metadata()
    picked = source[[2, 5, 8]]
    x = torch.from_numpy(picked).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = F.pad(x, (2, 2, 1, 1), mode="reflect")  # 44x30 -> 48x32, centred
    with torch.no_grad():
        assert (latents - vae.config.scaling_factor * vae.encode(x)).abs().max() <= 1e-5
    assert (meta["frame_start"], meta["frame_stride"], meta["frame_count"]) == ("2", "3", "3")


def test_sampling_is_seeded_per_frame_whatever_the_batch(tmp_path, model):
    video = tmp_path / "clip.mp4"
    make_video(video, n=5, width=32, height=32)
    for name, batch, seed in (("a", 1, 3), ("b", 4, 3), ("c", 4, 4)):
        ok("encode", video, "-m", model, "--sample", "--seed", seed, "--batch", batch, "-o", tmp_path / f"{name}.safetensors")
    read = lambda n: safe_open(str(tmp_path / f"{n}.safetensors"), "pt").get_tensor("latents")  # noqa: E731
    # the same noise whatever the batch (the encoder itself rounds differently per batch size, ~1e-7)
    assert (read("a") - read("b")).abs().max() <= 1e-5
    assert (read("a") - read("c")).abs().max() > 1e-2


def test_latent_file_decodes_in_diffusers_like_vaecli(tmp_path):
    from helpers import diffusers_model

    config = tiny_config(ch_mult=(1, 1, 1, 1), num_res_blocks=2, name="tiny8x2")
    vae = random_vae(config, seed=71)
    path = tmp_path / "m.safetensors"
    save_file(vae.state_dict(), str(path))
    video = tmp_path / "clip.mp4"
    make_video(video, n=6, width=48, height=32)
    ok("encode", video, "-m", path)
    ok("decode", tmp_path / "clip.latents.safetensors", "-m", path, "-o", f"{tmp_path}/frames/")
    ours = np.stack([np.asarray(__import__("imageio.v3").v3.imread(p)) for p in sorted((tmp_path / "frames").iterdir())])
    ref = diffusers_model(config, vae.state_dict())
    with safe_open(str(tmp_path / "clip.latents.safetensors"), "pt") as f:
        latents = f.get_tensor("latents")
    with torch.no_grad():
        out = ref.decode(latents / config.scaling_factor, num_frames=latents.shape[0]).sample
    theirs = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (6, 32, 48, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_output_formats(tmp_path, model):
    video = tmp_path / "clip.mp4"
    make_video(video, n=4, width=32, height=24)
    ok("encode", video, "-m", model)
    lat = tmp_path / "clip.latents.safetensors"
    ok("decode", lat, "-m", model, "-o", tmp_path / "a.webm")
    ok("decode", lat, "-m", model, "-o", tmp_path / "a.gif")
    ok("decode", lat, "-m", model, "-o", tmp_path / "pngs" / "img_%03d.png")
    ok("decode", lat, "-m", model, "--format", "png", "-o", tmp_path / "folder")
    for name in ("a.webm", "a.gif"):
        frames, _ = read_video(tmp_path / name)
        assert frames.shape == (4, 24, 32, 3), name
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"img_{i:03d}.png" for i in range(4)]
    assert len(list((tmp_path / "folder").iterdir())) == 4
    with av.open(str(tmp_path / "a.webm")) as c:
        assert c.streams.video[0].codec_context.name == "vp9"


def test_image_folder_glob_single_image_and_gif(tmp_path, model):
    import imageio.v3 as iio

    frames = make_video(tmp_path / "v.mp4", n=4, width=24, height=16)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(frames):
        iio.imwrite(folder / f"f{i:02d}.png", f)
    iio.imwrite(tmp_path / "anim.gif", frames, duration=100, loop=0)
    results = json_lines(ok("encode", folder, f"{folder}/f0[0-2].png", folder / "f03.png", tmp_path / "anim.gif",
                            "-m", model, "--out-dir", tmp_path, "--json"))
    assert [r["frames"] for r in results] == [4, 3, 1, 4]
    assert results[3]["fps"] == "10/1"
    assert Path(results[0]["output"]).name == "imgs.latents.safetensors"
    dec = json_lines(ok("decode", Path(results[3]["output"]), "-m", model, "--json"))[0]
    assert read_video(dec["output"])[0].shape == (4, 16, 24, 3)


def test_rotation_metadata_is_applied(tmp_path, model):
    frames = make_video(tmp_path / "rot.mp4", n=3, width=32, height=16, rotation=90)
    got, _ = read_video(tmp_path / "rot.mp4")
    assert got.shape == (3, 32, 16, 3)
    quarter = np.abs(got[0].astype(int) - np.rot90(frames[0]).astype(int)).mean()  # counterclockwise
    other_way = np.abs(got[0].astype(int) - np.rot90(frames[0], 3).astype(int)).mean()
    assert quarter < 10 and quarter < other_way / 4  # (lossy chroma on a 16-pixel-wide pattern)
    enc = json_lines(ok("encode", tmp_path / "rot.mp4", "-m", model, "--json"))[0]
    assert enc["geometry"]["source"] == [16, 32]


def test_batch_with_a_broken_file_and_skip_existing(tmp_path, model):
    for name in ("a", "c"):
        make_video(tmp_path / f"{name}.mp4", n=3, width=16, height=16)
    (tmp_path / "b.mp4").write_bytes(np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# inputs\n{tmp_path / 'a.mp4'}\n\n{tmp_path / 'b.mp4'}\n{tmp_path / 'c.mp4'}\n")
    result = cli("encode", "--manifest", manifest, "-m", model, "--json")
    assert result.exit_code == 1
    lines = json_lines(result)
    assert [("error" in r) for r in lines] == [False, True, False]
    # FFmpeg may take random bytes for some container: refused either way, in one line
    assert ("b.mp4: not a readable video" in result.stderr or "b.mp4: not a video container" in result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("b.mp4") == 1
    assert "encode: 2 done, 0 skipped, 1 failed" in result.stderr
    assert (tmp_path / "a.latents.safetensors").exists() and not (tmp_path / "b.latents.safetensors").exists()
    mtime = (tmp_path / "a.latents.safetensors").stat().st_mtime_ns
    (tmp_path / "b.mp4").unlink()
    make_video(tmp_path / "b.mp4", n=3, width=16, height=16)
    lines = json_lines(ok("encode", "--manifest", manifest, "-m", model, "--json", "--skip-existing"))
    assert [r.get("skipped", False) for r in lines] == [True, False, True]
    assert (tmp_path / "a.latents.safetensors").stat().st_mtime_ns == mtime
    again = cli("encode", tmp_path / "a.mp4", "-m", model)
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.stderr


def test_comfy_export(tmp_path, model):
    make_video(tmp_path / "c.mp4", n=3, width=16, height=16)
    ok("encode", tmp_path / "c.mp4", "-m", model, "--export", "comfy")
    with safe_open(str(tmp_path / "c.latent"), "pt") as f:
        raw, marker = f.get_tensor("latent_tensor"), f.get_tensor("latent_format_version_0")
    with safe_open(str(tmp_path / "c.latents.safetensors"), "pt") as f:
        scaled = f.get_tensor("latents")
    assert marker.numel() == 0 and torch.allclose(raw * CONFIG.scaling_factor, scaled, atol=1e-6)
    dec = json_lines(ok("decode", tmp_path / "c.latent", "-m", model, "--fps", "8", "--json"))[0]
    assert dec["frames"] == 3 and dec["fps"] == "8/1"


def test_foreign_latents_need_fps(tmp_path, model):
    save_file({"latents": torch.randn(3, 4, 2, 3)}, str(tmp_path / "gen.safetensors"))
    result = cli("decode", tmp_path / "gen.safetensors", "-m", model)
    assert result.exit_code == 2 and "no vaecli metadata" in result.stderr and "--fps" in result.stderr
    dec = json_lines(ok("decode", tmp_path / "gen.safetensors", "-m", model, "--fps", "7", "--json"))[0]
    assert dec["shape"] == [3, 3, 16, 24] and dec["fps"] == "7/1"


def test_chunked_decode_equals_independent_clips(tmp_path, model):
    make_video(tmp_path / "v.mp4", n=6, width=16, height=16)
    ok("encode", tmp_path / "v.mp4", "-m", model)
    lat = tmp_path / "v.latents.safetensors"
    dec = json_lines(ok("decode", lat, "-m", model, "--chunk", 3, "--overlap", 0, "-o", f"{tmp_path}/chunks/",
                        "--json"))[0]
    plan = dec["plan"]
    assert (plan["strategy"], plan["chunk_frames"], plan["overlap"], plan["exact"]) == ("windows", 3, 0, False)
    vae = load_vae(model)
    z = safe_open(str(lat), "pt").get_tensor("latents") / CONFIG.scaling_factor
    with torch.no_grad():
        expected = vae.decode(z, num_frames=3)
    import imageio.v3 as iio

    ours = np.stack([iio.imread(p) for p in sorted((tmp_path / "chunks").iterdir())])
    ref = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_roundtrip_reports_metrics(tmp_path, model):
    make_video(tmp_path / "v.mp4", n=6, width=32, height=24)
    result = ok("roundtrip", tmp_path / "v.mp4", "-o", tmp_path / "rt.mp4", "-m", model, "--clip-frames", 3,
                "--report", tmp_path / "m.json", "--json")
    data = json.loads(result.stdout)
    assert [c["frames"] for c in data["clips"]] == [3, 3] and data["frames"] == 6
    assert all(0 < c["psnr"] < 60 and -1 <= c["ssim"] <= 1 for c in data["clips"])
    assert json.loads((tmp_path / "m.json").read_text())["psnr"] == data["psnr"]
    assert read_video(tmp_path / "rt.mp4")[0].shape == (6, 24, 32, 3)


def test_info_on_videos_and_latents(tmp_path, model):
    make_video(tmp_path / "v.mp4", n=5, width=32, height=24)
    data = json.loads(ok("info", tmp_path / "v.mp4", "--json").stdout)
    assert (data["frames"], data["width"], data["height"], data["fps"]) == (5, 32, 24, "30000/1001")
    ok("encode", tmp_path / "v.mp4", "-m", model)
    data = json.loads(ok("info", tmp_path / "v.latents.safetensors", "--json").stdout)
    assert data["shape"] == [5, 4, 3, 4] and data["metadata"]["frame_count"] == "5"
    assert "fps:" in ok("info", tmp_path / "v.latents.safetensors").stdout


def audio_only(path):
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))


@pytest.mark.parametrize("case,code,message", [
    ("missing", 1, "no such file"),
    ("corrupt", 1, "not a readable video"),
    ("audio", 1, "has no video stream"),
    ("empty", 1, "the video has no frames"),
    ("range", 1, "no frames selected (start 50, video has 3 frames)"),
    ("no-dir", 2, "is not a folder"),
    ("bad-fit", 2, "--fit must be"),
    ("bad-size", 2, "--size must look like"),
    ("no-model", 1, "missing.safetensors: no such file or folder"),
    ("two-outputs", 2, "-o takes one input"),
])
def test_encode_errors(tmp_path, model, case, code, message):
    video = tmp_path / "v.mp4"
    make_video(video, n=3, width=16, height=16)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))
    audio_only(tmp_path / "sound.wav")
    with av.open(str(tmp_path / "empty.mkv"), "w") as c:  # a video stream, no frames
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        c.start_encoding()  # writes the header though no frame follows
    args = {
        "missing": [tmp_path / "nope.mp4", "-m", model],
        "corrupt": [tmp_path / "corrupt.mp4", "-m", model],
        "audio": [tmp_path / "sound.wav", "-m", model],
        "empty": [tmp_path / "empty.mkv", "-m", model],
        "range": [video, "-m", model, "--start", 50],
        "no-dir": [video, "-m", model, "--out-dir", tmp_path / "nowhere"],
        "bad-fit": [video, "-m", model, "--fit", "stretch"],
        "bad-size": [video, "-m", model, "--size", "big"],
        "no-model": [video, "-m", tmp_path / "missing.safetensors"],
        "two-outputs": [video, video, "-o", tmp_path / "x.safetensors", "-m", model],
    }[case]
    result = cli("encode", *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("error")]) == 1
    assert not list(tmp_path.glob("*.latents.safetensors"))


@pytest.mark.parametrize("case,code,message", [
    ("truncated", 1, "truncated"),
    ("foreign", 1, "no `latents` tensor"),
    ("channels", 1, "latents have 8 channels but model tiny8 takes 4"),
    ("other-model", 1, "latents were made with model tiny8"),
    ("bad-out", 1, "does not exist; create it first"),
    ("bad-format", 2, "--format must be"),
    ("no-suffix", 2, "cannot tell the format"),
])
def test_decode_errors(tmp_path, model, case, code, message):
    make_video(tmp_path / "v.mp4", n=3, width=16, height=16)
    ok("encode", tmp_path / "v.mp4", "-m", model)
    lat = tmp_path / "v.latents.safetensors"
    other = tmp_path / "other.safetensors"
    save_file(random_vae(CONFIG, seed=99).state_dict(), str(other))
    data = lat.read_bytes()
    (tmp_path / "cut.latents.safetensors").write_bytes(data[: len(data) - 40])
    save_file({"weights": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    save_file({"latents": torch.zeros(2, 8, 2, 2)}, str(tmp_path / "eight.safetensors"))
    args = {
        "truncated": [tmp_path / "cut.latents.safetensors", "-m", model],
        "foreign": [tmp_path / "foreign.safetensors", "-m", model],
        "channels": [tmp_path / "eight.safetensors", "-m", model, "--fps", "8"],
        "other-model": [lat, "-m", other],
        "bad-out": [lat, "-m", model, "-o", tmp_path / "missing" / "x.mp4"],
        "bad-format": [lat, "-m", model, "--format", "avi"],
        "no-suffix": [lat, "-m", model, "-o", tmp_path / "out"],
    }[case]
    result = cli("decode", *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    if case == "other-model":
        assert cli("decode", lat, "-m", other, "--allow-model-mismatch").exit_code == 0


def test_disk_full_is_reported_and_leaves_nothing(tmp_path, model, monkeypatch):
    make_video(tmp_path / "v.mp4", n=3, width=16, height=16)
    import vaecli.pipeline.latents_io as lio

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lio.shutil, "copyfileobj", full)
    result = cli("encode", tmp_path / "v.mp4", "-m", model)
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_reader_runs_a_bounded_distance_ahead():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = background(items(), depth=4)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(produced) <= 4 + 2  # the queue, the item in hand and the one being put
    it.close()


def test_reader_errors_reach_the_consumer():
    def items():
        yield 1
        raise ValueError("boom")

    it = background(items())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)


def run(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "vaecli.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_decode_leaves_no_output(tmp_path, model, sig):
    # long enough that the decode is still running when the signal comes (400 frames could finish in 0.5 s)
    save_file({"latents": torch.randn(4000, 4, 8, 8)}, str(tmp_path / "long.safetensors"))
    out = tmp_path / "long.mp4"
    proc = run("decode", tmp_path / "long.safetensors", "-m", model, "--fps", "24", "--chunk", "4", "-o", out,
               "--device", "cpu")
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir()), proc.communicate()
    time.sleep(0.5)
    assert proc.poll() is None, "the decode finished before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert sorted(p.name for p in tmp_path.iterdir()) == ["long.safetensors"]


def test_subprocess_encode_decode_json(tmp_path, model):
    make_video(tmp_path / "v.mp4", n=4, width=24, height=16)
    done = subprocess.run([sys.executable, "-m", "vaecli.cli", "encode", str(tmp_path / "v.mp4"), "-m", str(model),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    enc = json.loads(done.stdout)
    assert {"input", "output", "frames", "shape", "seconds", "device", "dtype", "attention", "plan"} <= set(enc)
    assert done.stderr == ""  # no progress bars when stderr is not a terminal
    done = subprocess.run([sys.executable, "-m", "vaecli.cli", "decode", enc["output"], "-m", str(model)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "v.decoded.mp4")
