"""Speed of the exact streaming executor against the one-clip decode of the same latents (one process, alternated).

    python scripts/bench_stream.py                       # the bundled model, 16 frames of 256x320, CPU
    python scripts/bench_stream.py --frames 25 --size 576x1024 --device cuda --dtype bf16 --model svd_xt.safetensors

Each cut is written like bench.py's --stream: f (frames per 2D chunk), t (2D tile), tf (frames per temporal
piece), tt (temporal tile), in latent px, and park. Prints the median time of each, its ratio to one clip, and the
largest difference to the one-clip frames.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from vaecli.model.checkpoint import bundled_model_path, read_checkpoint
from vaecli.model.svd.layout import build_vae
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.device import parse_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import parse_pieces  # noqa: E402

DEFAULT_CUTS = ["f4", "f4,tf4", "f2,tf2", "f2,t16,tt16", "f1,t8,tf4,tt8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="256x320", help="HxW of the decoded frames")
    parser.add_argument("--cuts", nargs="+", default=DEFAULT_CUTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    ckpt = read_checkpoint(args.model or bundled_model_path())
    vae = build_vae(ckpt.config, ckpt.state, device=device, dtype=dtype, attention=AttentionBackend("sdpa"))
    f = ckpt.config.downscale
    h, w = (int(v) // f for v in args.size.split("x"))
    z = torch.randn(args.frames, ckpt.config.latent_channels, h, w, generator=torch.Generator().manual_seed(0))
    z = z.to(device, dtype)
    runs = {"one-clip": lambda: vae.decode(z)}
    for cut in args.cuts:
        runs[cut] = lambda p=parse_pieces(cut): vae.decode(z, pieces=p)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    times = {name: [] for name in runs}
    with torch.inference_mode():
        ref = runs["one-clip"]().float()
        diffs = {name: (fn().float() - ref).abs().max().item() for name, fn in runs.items()}  # also a warm-up
        for _ in range(args.repeats):  # alternated
            for name, fn in runs.items():
                times[name].append(timed(fn)[0])
    base = statistics.median(times["one-clip"])
    print(f"{args.frames} frames {args.size}, {ckpt.config.name}, {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'cut':16} {'seconds':>8} {'ratio':>6} {'max |Δ|':>9}")
    for name in runs:
        t = statistics.median(times[name])
        print(f"{name:16} {t:8.2f} {t / base:5.2f}x {diffs[name]:9.1e}")


if __name__ == "__main__":
    main()
