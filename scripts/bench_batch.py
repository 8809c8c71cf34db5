"""Batch throughput under torchrun, and dynamic claiming against a static split, on the same generated inputs.

    python scripts/bench_batch.py --workers 1,2 --size 128x96 --long 96 --short 8 --count 12

For each worker count N:
- dynamic: `torchrun --standalone --nproc-per-node N -m vaecli encode ... --out-dir ...` (inputs claimed from the
  store's counter, largest first);
- static: N independent `vaecli encode` processes, process r taking inputs r, r+N, r+2N... of the sorted list (the
  fixed index split of the training repos' latent caching scripts);
both with OMP_NUM_THREADS=1 per worker, so N workers use N cores. The inputs are one long clip among short ones
(skewed lengths). Prints a Markdown table (wall time, frames/s, speedup over 1 worker, dynamic/static makespan)
and writes the numbers as JSON with --json-out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_inputs(folder: Path, long: int, short: int, count: int, size: tuple[int, int]) -> list[str]:
    from vaecli.pipeline.synthetic import synthetic_clip
    from vaecli.pipeline.video_io import VideoWriter
    from fractions import Fraction

    paths = []
    for i in range(count):
        frames = long if i == count // 2 else short  # the long one in the middle of the name order
        path = folder / f"clip{i:03d}.mp4"
        writer = VideoWriter(path, "mp4", Fraction(24), size, crf=12)
        for image in synthetic_clip(frames, size[1], size[0], seed=i):
            writer.write(image)
        writer.close()
        paths.append(str(path))
    return paths


def run(cmds: list[list[str]], env: dict) -> float:
    """Start every command at once; the wall time until the last one ends."""
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    for proc, cmd in zip(procs, cmds):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd[:6])} ...\n{err[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--size", default="128x96")
    parser.add_argument("--long", type=int, default=96, help="frames of the long clip")
    parser.add_argument("--short", type=int, default=8, help="frames of each short clip")
    parser.add_argument("--count", type=int, default=12, help="clips in all")
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    counts = [int(n) for n in args.workers.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = ["-m", args.model] if args.model else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="vaecli-bench-batch-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, args.long, args.short, args.count, (width, height))
        frames = args.long + args.short * (args.count - 1)
        ordered = sorted(inputs)
        for n in counts:
            out = root / f"dyn{n}"
            out.mkdir()
            dynamic = run([[sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                            "-m", "vaecli", "encode", *inputs, "--out-dir", str(out), "-q", *model]], env)
            static_out = root / f"static{n}"
            static_out.mkdir()
            static = run([[sys.executable, "-m", "vaecli", "encode", *ordered[r::n], "--out-dir", str(static_out),
                           "-q", *model] for r in range(n)], env)
            rows.append({"workers": n, "dynamic_s": round(dynamic, 2), "static_s": round(static, 2),
                         "frames": frames, "dynamic_fps": round(frames / dynamic, 2)})
            shutil.rmtree(out)
            shutil.rmtree(static_out)
    base = rows[0]["dynamic_s"]
    print(f"inputs: {args.count} clips of {width}x{height}: one of {args.long} frames, {args.count - 1} of "
          f"{args.short}; {frames} frames; model {args.model or 'vaecli-small'}; OMP_NUM_THREADS=1 per worker")
    print("| workers | dynamic (torchrun) s | frames/s | speedup | static split s | static / dynamic |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["speedup"] = round(base / row["dynamic_s"], 2)
        row["static_over_dynamic"] = round(row["static_s"] / row["dynamic_s"], 2)
        print(f"| {row['workers']} | {row['dynamic_s']:.2f} | {row['dynamic_fps']:.1f} | {row['speedup']:.2f}x | "
              f"{row['static_s']:.2f} | {row['static_over_dynamic']:.2f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args) | {"json_out": str(args.json_out)}, "rows": rows},
                                            indent=2) + "\n")


if __name__ == "__main__":
    main()
