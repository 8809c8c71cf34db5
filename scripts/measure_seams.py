"""Seams where decode windows meet: PSNR of hard-cut and cross-faded windows against the one-clip decode.

    python scripts/measure_seams.py                          # tiny random-weight model (what docs/memory.md reports)
    python scripts/measure_seams.py -m model.safetensors --size 256x144 --frames 25

Encodes a synthetic moving clip (scripts/make_sample_clip.py's pattern), decodes its latents as one clip and with
windows of each (chunk, overlap), and prints a Markdown table: PSNR over all frames and over the frames next to
each cut.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from make_sample_clip import pattern  # scripts/ is on sys.path when run as a script
from vaecli.model.checkpoint import load_vae
from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.vae import VAE, randomize_weights_
from vaecli.pipeline.chunking import WindowBlender, windows


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4 / ((a - b) ** 2).mean())).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="checkpoint (default: a tiny random-weight model, seed 70)")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", default="128x96")
    parser.add_argument("--plans", default="14:0,14:2,14:4,8:0,8:2,8:4", help="chunk:overlap pairs")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    if args.model:
        vae = load_vae(args.model)
    else:
        config = VAEConfig(name="tiny8", ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
        vae = randomize_weights_(VAE(config), seed=70).eval()
    frames = np.stack([pattern(i, width, height) for i in range(args.frames)])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W) in [-1, 1]
    print("| window | overlap | windows run | PSNR, all frames | PSNR, frames at the cuts |\n|---|---|---|---|---|")
    with torch.inference_mode():
        z = vae.encode(x)
        one_clip = vae.decode(z)
        for item in args.plans.split(","):
            chunk, overlap = (int(v) for v in item.split(":"))
            plan = windows(args.frames, chunk, overlap)
            blender = WindowBlender(plan)
            out = torch.cat([blender.push(vae.decode(z[w.start:w.end])) for w in plan])
            cut_starts = {w.start for w in windows(args.frames, chunk, 0)[1:]} | {w.start for w in plan[1:]}
            cuts = sorted({i for s in cut_starts for i in (s - 1, s)})
            print(f"| {chunk} | {overlap}{' (sgm)' if overlap == 0 else ''} | {len(plan)} | "
                  f"{psnr(out, one_clip):.2f} dB | {psnr(out[cuts], one_clip[cuts]):.2f} dB |")


if __name__ == "__main__":
    main()
