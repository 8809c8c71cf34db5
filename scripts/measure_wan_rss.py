"""Peak resident memory of whole Wan decodes at the real size: `vaecli decode` (its default plan on this machine)
against diffusers' AutoencoderKLWan untiled, each a fresh process under GNU time, the same random weights of the
released block structure, the same random latents.

    python scripts/measure_wan_rss.py                                  # 2.1, 832x480, 21 and 41 frames, bf16
    python scripts/measure_wan_rss.py --version 2.1 --size 832x480 --frames 21 41 81 --dtype bf16 --json rss.json
    python scripts/measure_wan_rss.py --no-diffusers --frames 21      # vaecli alone

vaecli writes an mp4 (frames handed to the writer as they are decoded); diffusers' `decode(z).sample` returns the
whole clip, which it holds: that is its real cost. Latents are stored normalised ((μ − mean) / std), one file per
frame count; each command's time is reported beside its peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from measure_plans import ROOT, wan_checkpoint  # scripts/ is on sys.path when run as a script

DIFFUSERS = """
import sys, torch
from safetensors.torch import load_file
from diffusers import AutoencoderKLWan
sys.path.insert(0, {scripts!r})
from bench_wan import released
from vaecli.model.wan.keymap import original_to_diffusers
from vaecli.model.wan.layout import diffusers_config
torch.set_grad_enabled(False)
dtype = getattr(torch, {dtype!r})
config = released({version!r})
with torch.device("meta"):
    vae = AutoencoderKLWan(**{{k: v for k, v in diffusers_config(config).items() if k != "_class_name"}})
state = load_file({model!r})
names = original_to_diffusers(state.keys(), config)
vae.load_state_dict({{names[k]: v for k, v in state.items()}}, assign=True, strict=True)
vae = vae.to(dtype).eval()
z = load_file({latents!r})["latents"]  # (t, C, h, w), normalised
mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (config.latents_mean, config.latents_std))
z = (z * std + mean).permute(1, 0, 2, 3)[None].to(dtype)
frames = vae.decode(z).sample
print(tuple(frames.shape))
"""


def timed(args: list[str]) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, stdout) of one command in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... failed: {done.stderr[-2000:]}")
    return int(done.stderr.strip().splitlines()[-1]) * 1024, time.perf_counter() - start, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", choices=("2.1", "2.2"), default="2.1")
    ap.add_argument("--size", default="832x480", help="WIDTHxHEIGHT of the decoded frames")
    ap.add_argument("--frames", type=int, nargs="+", default=[21, 41], help="decoded frames, 1 + 4k each")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="vaecli-wanrss-"))
    model = tmp / "wan.safetensors"
    wan_checkpoint(args.version, model)
    factor, channels = (8, 16) if args.version == "2.1" else (16, 48)
    rows = []
    for frames in args.frames:
        latents = tmp / f"z{frames}.latents.safetensors"
        z = torch.randn((frames - 1) // 4 + 1, channels, height // factor, width // factor,
                        generator=torch.Generator().manual_seed(frames))
        save_file({"latents": z}, str(latents), metadata={"latents.space": "normalized"})
        peak, seconds, out = timed([sys.executable, "-m", "vaecli", "decode", str(latents), "-m", str(model),
                                    "--dtype", args.dtype, "--fps", "16", "-o", str(tmp / f"v{frames}.mp4"), "--json"])
        plan = json.loads(out.splitlines()[-1])["plan"]
        rows.append({"tool": "vaecli", "frames": frames, "peak_bytes": peak, "seconds": round(seconds, 1),
                     "predicted_bytes": plan["predicted_peak_bytes"], "pieces": plan["pieces"]})
        if not args.no_diffusers:
            code = DIFFUSERS.format(scripts=str(ROOT / "scripts"), dtype={"bf16": "bfloat16"}.get(args.dtype, "float32"),
                                    version=args.version, model=str(model), latents=str(latents))
            peak, seconds, _ = timed([sys.executable, "-c", code])
            rows.append({"tool": "diffusers (untiled)", "frames": frames, "peak_bytes": peak,
                         "seconds": round(seconds, 1)})
        for r in rows[-2 if not args.no_diffusers else -1:]:
            extra = f", predicted {r['predicted_bytes'] / 2**30:.2f} GiB" if "predicted_bytes" in r else ""
            print(f"{r['tool']:20} {frames:4} frames: peak RSS {r['peak_bytes'] / 2**30:.2f} GiB{extra}, "
                  f"{r['seconds']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
