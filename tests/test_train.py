"""The training script runs end to end (a few steps per stage on CPU) and exports a loadable model."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

from helpers import train_script
from vaecli.model.checkpoint import load_vae

ROOT = Path(__file__).resolve().parent.parent


def test_training_smoke_run_exports_a_working_model(tmp_path):
    out = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--recipe",
                           str(ROOT / "configs" / "train" / "vaecli-small.toml"), "--run", str(tmp_path / "run"),
                           "--smoke", "--threads", "2", "--export", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"image", "temporal", "done"}
    assert (tmp_path / "run" / "state.safetensors").is_file()
    vae = load_vae(out)
    assert vae.config.name == "vaecli-small" and vae.config.scaling_factor == rows[-1]["scaling_factor"]
    with torch.no_grad():
        assert vae.decode(torch.zeros(2, 4, 2, 2)).shape == (2, 3, 16, 16)
    # resuming a finished run trains nothing more and exports again
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--recipe",
                            str(ROOT / "configs" / "train" / "vaecli-small.toml"), "--run", str(tmp_path / "run"),
                            "--smoke", "--resume", "--threads", "2"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"stage": "image"' not in again.stdout and '"stage": "done"' in again.stdout


def test_camera_clips_move_smoothly():
    """Training and held-out photo clips: content drifts steadily, so frames further apart differ more (the
    version-1 camera jumped to a random point of its path every frame, which the temporal layers cannot learn)."""
    train = train_script()
    photos, held = train.photo_pool(["chelsea.png", "coffee.png", "rocket.jpg"])
    assert len(held) == 3 and len(photos) >= 20
    rng = np.random.default_rng(0)
    gaps = {1: [], 2: [], 4: []}
    for k in range(24):
        clip = train.camera_clip(photos[k % len(photos)], 9, 48, rng)
        assert clip.shape == (9, 3, 48, 48) and 0 <= clip.min() and clip.max() <= 1
        for g in gaps:
            gaps[g].append((clip[g:] - clip[:-g]).abs().mean().item())
    d1, d2, d4 = (float(np.mean(gaps[g])) for g in (1, 2, 4))
    assert d1 < d2 < d4 and d4 > 1.5 * d1


def test_camera_v1_recipes_still_use_the_version_1_camera():
    train = train_script()
    for name in ("vaecli-small", "vaecli-small-continue", "vaecli-small-run3", "vaecli-small-run3-temporal"):
        with open(ROOT / "configs" / "train" / f"{name}.toml", "rb") as f:
            assert tomllib.load(f)["camera"] == "v1"
    a = train.camera_path(300, 400, 6, np.random.default_rng(3))
    b = train.camera_path_v1(300, 400, 6, np.random.default_rng(3))
    assert np.asarray(a).shape == np.asarray(b).shape == (6, 2, 3) and not np.allclose(a, b)
