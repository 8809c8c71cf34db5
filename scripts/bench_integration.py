"""The effect of `use_vaecli` inside diffusers: a VAE's own decode against vaecli's, same weights, one run each in
a fresh process (peak RSS is per process), then the frames' difference.

    python scripts/bench_integration.py --model svd --frames 25 --size 256x256      # both implementations
    python scripts/bench_integration.py --model wan --frames 81 --size 128x128 --dtype bf16

svd: diffusers' AutoencoderKLTemporalDecoder with SVD's released config (random weights, seed 0), decoding the
clip as StableVideoDiffusionPipeline does by default (decode_chunk_size = the frame count: one call); wan:
AutoencoderKLWan with Wan 2.1's released config, one `decode` call as WanPipeline makes. Prints one JSON line per
implementation (seconds, peak RSS) and the max |Δ| between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(model: str):
    from diffusers import AutoencoderKLTemporalDecoder, AutoencoderKLWan

    torch.manual_seed(0)
    svd = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               layers_per_block=2, latent_channels=4)  # stable-video-diffusion-img2vid(-xt)'s vae/config.json
    vae = AutoencoderKLTemporalDecoder(**svd) if model == "svd" else AutoencoderKLWan()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 and ("norm" in name or "gamma" in name) else
                    noise / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.05 * noise)
    return vae.eval().requires_grad_(False)


def run(args) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    vae = build(args.model).to(dtype)
    w, h = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(1)
    if args.model == "svd":
        z = torch.randn((args.frames, 4, h // 8, w // 8), generator=g).to(dtype)
        call = lambda: vae.decode(z, num_frames=args.frames).sample  # noqa: E731
    else:
        z = torch.randn((1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8), generator=g).to(dtype)
        call = lambda: vae.decode(z).sample  # noqa: E731
    if args.impl == "vaecli":
        from vaecli.integrations.diffusers import use_vaecli

        use_vaecli(vae)
    start = time.perf_counter()
    with torch.no_grad():
        out = call()
    seconds = time.perf_counter() - start
    torch.save(out.float(), args.out)  # our own file, read back by the parent process
    print(json.dumps({"impl": args.impl, "model": args.model, "frames": args.frames, "size": args.size,
                      "dtype": args.dtype, "seconds": round(seconds, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("svd", "wan"), default="svd")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--impl", choices=("diffusers", "vaecli"))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.impl:
        return run(args)
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for impl in ("diffusers", "vaecli"):
            out = str(Path(tmp) / f"{impl}.pt")
            cmd = [sys.executable, __file__, "--impl", impl, "--out", out, "--model", args.model, "--frames",
                   str(args.frames), "--size", args.size, "--dtype", args.dtype]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
            outs.append(torch.load(out, weights_only=True))
        print(json.dumps({"max_abs_diff": float((outs[0] - outs[1]).abs().max()), "shape": list(outs[0].shape)}))


if __name__ == "__main__":
    main()
