"""Calibrate the planner's cost model: measured activation peaks against the meta-device trace.

    python scripts/calibrate_memory.py --device cuda                   # the issue's grid on a GPU
    python scripts/calibrate_memory.py --device cpu --quick            # a small grid on CPU (peak RSS)
    python scripts/calibrate_memory.py --device cuda --out docs/memory-calibration.json

CUDA: peak = torch.cuda.max_memory_allocated() during the call, minus what was allocated before it (the
weights and inputs). CPU: peak RSS of a fresh subprocess running one call, minus its RSS just before the call.
The script fits `measured ≈ scale · traced + overhead` (least squares) and prints, per point, the traced,
predicted (with the fitted and with the shipped CostModel) and measured bytes and the relative error. Random
weights are used: memory does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from vaecli.model.svd.config import load_config
from vaecli.model.svd.vae import VAE, randomize_weights_
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.device import parse_dtype
from vaecli.model.plan import COST_MODELS, CostModel
from vaecli.model.svd.planning import Estimator

SIZES = {"256x256": (256, 256), "576x1024": (576, 1024), "720p": (720, 1280), "1080p": (1088, 1920)}


def measure(stage: str, config, frames: int, hw: tuple[int, int], dtype: torch.dtype, device: torch.device,
            attention: str) -> int:
    """Measured activation peak in bytes for one call (run in this process)."""
    vae = randomize_weights_(VAE(config, AttentionBackend(attention))).to(device, dtype).eval()
    f = config.downscale
    if stage == "decode":
        x = torch.randn(frames, config.latent_channels, hw[0] // f, hw[1] // f, device=device, dtype=dtype)
        call = lambda: vae.decode(x)  # noqa: E731
    else:
        x = torch.rand(frames, 3, hw[0], hw[1], device=device, dtype=dtype) * 2 - 1
        call = lambda: vae.encode(x)  # noqa: E731
    with torch.inference_mode():
        if device.type == "cuda":
            call()  # warm-up: cuDNN autotuning and lazy allocations
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - base
            del out
            return peak
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = call()
        del out
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def traced(stage: str, config, frames: int, hw: tuple[int, int], dtype: torch.dtype, attention: str) -> int:
    est = Estimator(config, dtype, CostModel())
    f = config.downscale
    h, w = (hw[0] // f, hw[1] // f) if stage == "decode" else hw
    return est.activations(stage, AttentionBackend(attention), frames, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="svd-vae")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--quick", action="store_true", help="a small grid (CPU-sized)")
    parser.add_argument("--out", help="write the points and the fit as JSON")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point, print bytes
    args = parser.parse_args()
    config = load_config(args.config)
    device = torch.device(args.device)
    if args.point:
        stage, frames, size, dtype = args.point.split(",")
        print(measure(stage, config, int(frames), SIZES.get(size) or tuple(map(int, size.split("x"))),
                      parse_dtype(dtype), device, args.attention))
        return
    if args.quick:
        grid = [(s, t, "256x256", "fp32") for s in ("decode", "encode") for t in (1, 2, 4)]
    else:
        grid = [(s, t, size, dt) for s in ("decode", "encode") for size in SIZES for t in (1, 4, 14, 25)
                for dt in ("fp16", "bf16", "fp32")]
    points = []
    for stage, frames, size, dt in grid:
        hw = SIZES.get(size) or tuple(map(int, size.split("x")))
        try:
            if device.type == "cuda":
                measured = measure(stage, config, frames, hw, parse_dtype(dt), device, args.attention)
                torch.cuda.empty_cache()
            else:  # a fresh process per point: RSS only grows
                done = subprocess.run([sys.executable, __file__, "--device", "cpu", "--config", args.config,
                                       "--attention", args.attention, "--point", f"{stage},{frames},{size},{dt}"],
                                      capture_output=True, text=True, check=True)
                measured = int(done.stdout.strip().splitlines()[-1])
        except (torch.OutOfMemoryError, subprocess.CalledProcessError) as e:
            print(f"skip {stage} {frames} {size} {dt}: {type(e).__name__}", file=sys.stderr)
            continue
        t = traced(stage, config, frames, hw, parse_dtype(dt), args.attention)
        points.append({"stage": stage, "frames": frames, "size": size, "dtype": dt, "traced": t, "measured": measured})
        print(json.dumps(points[-1]), flush=True)
    n = len(points)
    xs, ys = [p["traced"] for p in points], [p["measured"] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    scale = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 1.0
    overhead = my - scale * mx
    shipped = COST_MODELS[device.type]
    print(f"\nfit: measured ≈ {scale:.3f} · traced + {overhead / 2**20:.1f} MiB   (shipped: {shipped})")
    print(f"{'stage':7} {'frames':>6} {'size':>9} {'dtype':5} {'traced':>10} {'measured':>10} {'fit err':>8} {'shipped err':>11}")
    worst = 0.0
    for p in points:
        fit = scale * p["traced"] + overhead
        err = (fit - p["measured"]) / p["measured"]
        err_shipped = (shipped.predict(p["traced"]) - p["measured"]) / p["measured"]
        worst = max(worst, abs(err_shipped))
        p.update(fit_error=err, shipped_error=err_shipped)
        print(f"{p['stage']:7} {p['frames']:>6} {p['size']:>9} {p['dtype']:5} {p['traced'] / 2**20:>9.0f}M "
              f"{p['measured'] / 2**20:>9.0f}M {err:>+7.1%} {err_shipped:>+10.1%}")
    print(f"worst error of the shipped cost model: {worst:.1%}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": str(device), "config": args.config, "scale": scale, "overhead": overhead,
                       "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
