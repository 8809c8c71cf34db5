"""Show that encode streams: peak RSS of `vaecli encode` on a short and a 10x longer generated clip.

    python scripts/measure_encode_memory.py --frames 300 3000 --size 128x128

Writes the clips (H.264, PyAV) and a random tiny checkpoint into a temporary folder, runs `vaecli encode`
on each in a fresh subprocess and reports the child's peak resident memory (os.wait4 rusage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_sample_clip import write_clip  # scripts/ is on sys.path when run as a script
from safetensors.torch import save_file

from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.vae import VAE, randomize_weights_


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    """Run cmd; return (peak RSS in bytes, seconds, exit code)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024, time.perf_counter() - started, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--size", default="128x128")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny.safetensors"
        config = VAEConfig(name="tiny8", ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
        save_file(randomize_weights_(VAE(config)).state_dict(), str(model))
        for n in args.frames:
            clip = Path(tmp) / f"clip{n}.mp4"
            write_clip(clip, n, width, height)
            cmd = [sys.executable, "-m", "vaecli.cli", "encode", str(clip), "-m", str(model), "--device", "cpu", "--quiet"]
            rss, seconds, code = peak_rss(cmd)
            rows.append({"frames": n, "size": args.size, "peak_rss_mib": round(rss / 2**20, 1),
                         "seconds": round(seconds, 2), "exit_code": code,
                         "latents_mib": round((Path(tmp) / f"clip{n}.latents.safetensors").stat().st_size / 2**20, 2)})
            print(json.dumps(rows[-1]))
    base = rows[0]["peak_rss_mib"]
    for row in rows[1:]:
        print(f"{row['frames']} frames: peak RSS {row['peak_rss_mib']} MiB vs {base} MiB for {rows[0]['frames']} "
              f"frames ({row['peak_rss_mib'] - base:+.1f} MiB)")


if __name__ == "__main__":
    main()
