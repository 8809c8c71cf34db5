"""Predicted against measured memory of whole decodes and encodes on CPU: the cost model's calibration table.

    python scripts/measure_plans.py                      # bundled model, a 24-frame 320x192 sample clip
    python scripts/measure_plans.py --frames 40 --size 640x272 --out docs/plans.json
    python scripts/measure_plans.py --wan 2.1 --frames 17 --size 256x256   # a random Wan of the released structure

For each plan (forced with --tile / --chunk or by a --max-memory ceiling), `vaecli plan --json` gives the predicted
peak (activations + weights + runtime), then the same command runs in a fresh subprocess and its peak resident set
(GNU time's maximum resident set) is measured. Prints one row per plan: strategy, predicted, measured,
predicted/measured, wall seconds, pieces. --stages decode (or encode) measures one stage only; --unforced
only the defaults and the --max-memory ceilings.
With --wan, the model is a random Wan 2.1 or 2.2 of the released block structure (written to a temporary
checkpoint), and the forced cuts are Wan's: latent frames per call (--chunk) and tiles (--tile).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vaecli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaecli", *args], capture_output=True, text=True, cwd=ROOT)


def peak_rss(*args: str) -> tuple[int, float, dict]:
    """Peak RSS (bytes) and wall seconds of one vaecli command in a fresh process (GNU time's %M and %e), and
    its JSON result."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "vaecli", *args],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"vaecli {' '.join(args)} failed: {done.stderr}")
    rss, seconds = done.stderr.strip().splitlines()[-1].split()
    return int(rss) * 1024, float(seconds), json.loads(done.stdout.splitlines()[-1])


def wan_checkpoint(version: str, path: Path) -> None:
    """A Wan VAE of the released structure with seeded random weights, in the original key layout."""
    from safetensors.torch import save_file

    from bench_wan import models  # scripts/ is on sys.path when run as a script

    ours, _ = models(version, None, seed=0)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))


def cases_for(wan: bool, whole: int) -> list[tuple[str, list[str]]]:
    """The commands to measure: the defaults, forced cuts, and ceilings from the default's prediction down."""
    if wan:
        cases = [("encode", []), ("encode", ["--batch", "8"]), ("decode", []), ("decode", ["--chunk", "2"]),
                 ("decode", ["--chunk", "4"]), ("decode", ["--tile", "16"]), ("decode", ["--tile", "8"])]
        return cases + [("decode", ["--max-memory", str(int(whole * f))]) for f in (0.9, 0.7)]
    cases = [("encode", []), ("encode", ["--batch", "1"])]
    cases += [("decode", []), ("decode", ["--tile", "16"]), ("decode", ["--tile", "8"]), ("decode", ["--tile", "4"]),
              ("decode", ["--chunk", "8", "--overlap", "2"]), ("decode", ["--chunk", "8", "--overlap", "0"])]
    return cases + [("decode", ["--max-memory", str(int(whole * f))]) for f in (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", default="320x192")
    ap.add_argument("--wan", choices=("2.1", "2.2"), help="measure a random Wan VAE of this version instead")
    ap.add_argument("--stages", nargs="+", choices=("encode", "decode"), default=["encode", "decode"])
    ap.add_argument("--unforced", action="store_true", help="the defaults and the ceilings only (no --chunk/--tile)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vaecli-plans-"))
    model = []
    if args.wan:
        wan_checkpoint(args.wan, tmp / "wan.safetensors")
        model = ["-m", str(tmp / "wan.safetensors")]
    clip = tmp / "clip.mp4"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_clip.py"), "-o", str(clip), "--frames",
                    str(args.frames), "--size", args.size], check=True, capture_output=True)
    latents = tmp / "clip.latents.safetensors"
    done = vaecli("encode", str(clip), "-o", str(latents), "--json", *model)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    whole = json.loads(vaecli("plan", str(latents), "--json", *model).stdout)["predicted_peak_bytes"]
    cases = [case for case in cases_for(bool(args.wan), whole) if case[0] in args.stages
             and not (args.unforced and {"--chunk", "--tile", "--batch"} & set(case[1]))]
    rows = []
    for k, (stage, extra) in enumerate(cases):
        source = str(clip) if stage == "encode" else str(latents)
        options, extra = " ".join(extra) or "(default)", extra + model
        asked = vaecli("plan", source, "--json", *extra)
        if asked.returncode != 0:  # a ceiling below the smallest plan: refused before any work
            print(f"{stage:6} {options:28} refused: {asked.stderr.strip()}", flush=True)
            continue
        shown = json.loads(asked.stdout)
        planned = shown["encode"] if stage == "encode" else shown
        out = tmp / (f"e{k}.latents.safetensors" if stage == "encode" else f"d{k}.mp4")
        measured, seconds, result = peak_rss(stage, source, "-o", str(out), "--json", *extra)
        same = ("strategy", "pieces", "chunk_frames", "batch_frames", "frame_batch", "attention")
        assert all(result["plan"][k] == planned[k] for k in same), (stage, extra)  # the plan shown is the one run
        rows.append({"stage": stage, "options": options, "strategy": planned["strategy"],
                     "exact": planned["exact"], "pieces": planned["pieces"],
                     "predicted": planned["predicted_peak_bytes"], "measured": measured, "seconds": seconds,
                     "ratio": round(planned["predicted_peak_bytes"] / measured, 3)})
        r = rows[-1]
        print(f"{stage:6} {r['options']:28} {r['strategy']:9} predicted {r['predicted'] / 2**20:8.1f} MiB  measured "
              f"{r['measured'] / 2**20:8.1f} MiB  ratio {r['ratio']:.3f}  {seconds:7.1f} s  {r['pieces']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
