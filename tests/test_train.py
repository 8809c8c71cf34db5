"""The training script runs end to end (a few steps per stage on CPU) and exports a loadable model."""

import json
import subprocess
import sys
from pathlib import Path

import torch

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
