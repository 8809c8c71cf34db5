"""The effect of `use_vaecli` inside diffusers: a VAE's own decode against vaecli's, same weights, one run each in
a fresh process (peak RSS is per process), then the frames' difference.

    python scripts/bench_integration.py --model svd --frames 25 --size 256x256      # both implementations
    python scripts/bench_integration.py --model wan --frames 81 --size 128x128 --dtype bf16

svd: diffusers' AutoencoderKLTemporalDecoder with SVD's released config (random weights, seed 0), decoding the
clip as StableVideoDiffusionPipeline does by default (decode_chunk_size = the frame count: one call); wan:
AutoencoderKLWan with Wan 2.1's released config, one `decode` call as WanPipeline makes. With `--chunked` a third
run: the pipeline's memory-saving setting — SVD with `decode_chunk_size=--chunk` (each chunk its own clip), Wan
with `enable_tiling()` at tiles scaled to the small size (`--tile` px, blended over a quarter of a tile). Prints one
JSON line per implementation (seconds, peak RSS) and each output's max |Δ| and PSNR against vaecli's exact one.
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
        n = args.chunk if args.impl == "diffusers-chunked" else args.frames
        call = lambda: torch.cat([vae.decode(z[a:a + n], num_frames=min(n, args.frames - a)).sample  # noqa: E731
                                  for a in range(0, args.frames, n)])
    else:
        z = torch.randn((1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8), generator=g).to(dtype)
        call = lambda: vae.decode(z).sample  # noqa: E731
        if args.impl == "diffusers-chunked":
            stride = args.tile * 3 // 4
            vae.enable_tiling(tile_sample_min_height=args.tile, tile_sample_min_width=args.tile,
                              tile_sample_stride_height=stride, tile_sample_stride_width=stride)
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
    ap.add_argument("--chunked", action="store_true", help="also the pipeline's chunked (SVD) / tiled (Wan) decode")
    ap.add_argument("--chunk", type=int, default=8, help="SVD decode_chunk_size for --chunked")
    ap.add_argument("--tile", type=int, default=64, help="Wan tile size in pixels for --chunked")
    ap.add_argument("--impl", choices=("diffusers", "vaecli", "diffusers-chunked"))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.impl:
        return run(args)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for impl in ("diffusers", "vaecli") + (("diffusers-chunked",) if args.chunked else ()):
            out = str(Path(tmp) / f"{impl}.pt")
            cmd = [sys.executable, __file__, "--impl", impl, "--out", out, "--model", args.model, "--frames",
                   str(args.frames), "--size", args.size, "--dtype", args.dtype, "--chunk", str(args.chunk),
                   "--tile", str(args.tile)]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
            outs[impl] = torch.load(out, weights_only=True)
        exact = outs["vaecli"].clamp(-1, 1)
        for impl, out in outs.items():
            if impl != "vaecli":
                mse = float((out.clamp(-1, 1) - exact).pow(2).mean())
                psnr = 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()  # range [-1, 1]
                diff = float((out.clamp(-1, 1) - exact).abs().max())
                print(json.dumps({"against_vaecli": impl, "max_abs_diff": diff,
                                  "psnr_db": round(psnr, 1), "shape": list(out.shape)}))


if __name__ == "__main__":
    main()
