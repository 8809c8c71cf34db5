"""Evaluate a model on the held-out set: PSNR, SSIM and flicker, temporal decode against per-frame decode.

    python scripts/eval_model.py                         # the bundled model
    python scripts/eval_model.py -m runs/small/final.safetensors --json

Held-out clips (fixed seeds): scikit-image photos never used in training (chelsea, coffee, rocket) animated
with the training script's smooth camera (scripts/train.py: camera_path; pans, zoom, slow turns, some shake), and
procedural clips with seeds ≥ 10**6 (training draws below). Version 1 of the model card was measured with the
version-1 camera (`--camera v1`), whose clips jumped about.
Flicker: mean |Δ reconstruction - Δ source| between consecutive frames, 0-255 units (lower is better).
"""

from __future__ import annotations

import argparse
import json
import tomllib

import numpy as np
import torch

from train import CAMERAS, camera_clip, photo_pool  # scripts/ is on sys.path when run as a script
from vaecli.model.checkpoint import load_vae
from vaecli.pipeline.frames import ssim
from vaecli.pipeline.metrics import flicker
from vaecli.pipeline.synthetic import synthetic_clip


def held_out_clips(recipe: dict, camera: str = "smooth", clips_per_photo: int = 2) -> list[tuple[str, np.ndarray]]:
    frames, (width, height) = recipe["eval"]["clip_frames"], recipe["eval"]["size"]
    _, held = photo_pool(recipe["eval"]["held_out_photos"])
    rng = np.random.default_rng(2024)
    out = []
    for i, photo in enumerate(held):
        for j in range(clips_per_photo):
            clip = camera_clip(photo, frames, min(width, height), rng, camera)  # (T, 3, S, S) in [0, 1]
            out.append((f"photo{i}-{j}", (clip.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)))
    for seed in range(10**6, 10**6 + 4):
        out.append((f"synthetic{seed}", synthetic_clip(frames, height, width, seed=seed)))
    return out


def metrics(reference: np.ndarray, reconstruction: np.ndarray) -> dict:
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return {"psnr": 10 * np.log10(255**2 / mse), "ssim": ssim(reference, reconstruction),
            "flicker": flicker(reference, reconstruction)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="checkpoint (default: the bundled model)")
    parser.add_argument("--recipe", default="configs/train/vaecli-small.toml")
    parser.add_argument("--camera", default="smooth", choices=sorted(CAMERAS), help="held-out photo clips' camera")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with open(args.recipe, "rb") as f:
        recipe = tomllib.load(f)
    vae = load_vae(args.model)
    rows = []
    for name, clip in held_out_clips(recipe, args.camera):
        x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W) in [-1, 1]
        with torch.inference_mode():
            z = vae.encode(x)
            outs = {"temporal": vae.decode(z), "per_frame": vae.decode(z, per_frame=True)}
        row = {"clip": name}
        for mode, y in outs.items():
            rec = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            row.update({f"{mode}_{k}": round(float(v), 4) for k, v in metrics(clip, rec).items()})
        rows.append(row)
        if not args.json:
            print(f"{name:18} temporal: PSNR {row['temporal_psnr']:.2f} SSIM {row['temporal_ssim']:.4f} "
                  f"flicker {row['temporal_flicker']:.2f} | per-frame: PSNR {row['per_frame_psnr']:.2f} "
                  f"flicker {row['per_frame_flicker']:.2f}")
    groups = {"photos": [r for r in rows if r["clip"].startswith("photo")],
              "synthetic": [r for r in rows if r["clip"].startswith("synthetic")], "all": rows}
    summary = {g: {k: round(float(np.mean([r[k] for r in rs])), 3) for k in rs[0] if k != "clip"}
               for g, rs in groups.items()}
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))
    else:
        for g, s in summary.items():
            print(f"{g:10} temporal PSNR {s['temporal_psnr']:.2f} dB, SSIM {s['temporal_ssim']:.4f}, flicker "
                  f"{s['temporal_flicker']:.2f} | per-frame PSNR {s['per_frame_psnr']:.2f} dB, flicker "
                  f"{s['per_frame_flicker']:.2f}")


if __name__ == "__main__":
    main()
