"""Peak activation memory of Wan decodes and encodes at the released sizes, traced on the meta device: vaecli's
default plan against diffusers' AutoencoderKLWan untiled and tiled, for growing frame counts.

    python scripts/measure_wan_memory.py                          # 2.1 at 832x480 and 1280x720, 2.2 at 1280x704
    python scripts/measure_wan_memory.py --frames 21 41 81 --dtype bf16 --max-memory 8GiB --json wan-mem.json
    python scripts/measure_wan_memory.py --dtype fp32 --plans-only     # the plans and predictions, no traces

Both models run their own code on tensors of the meta device (`vaecli.ops.memtrace`): every allocation and free
in order, no arithmetic, so a 121-frame 720p decode is traced in seconds on a laptop. The traced peak is the
activations eager execution holds (weights, allocator rounding and kernel workspaces not included; the planner's
prediction adds them). vaecli runs as `vaecli decode` does: the planner's default plan for this machine (or
--max-memory), the runner's steps, every block dropped once handed out (the writer turns it into uint8 frames);
diffusers' `decode(z).sample` keeps the whole clip it returns, which is its real cost.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_wan import released  # scripts/ is on sys.path when run as a script
from vaecli.errors import OutOfMemory
from vaecli.model.plan import format_bytes
from vaecli.model.wan.family import WanCodec, build_vae
from vaecli.model.wan.layout import diffusers_config
from vaecli.ops.memtrace import traced_peak_bytes
from vaecli.pipeline.planner import decode_plan, encode_plan, parse_bytes

CASES = (("2.1", 480, 832), ("2.1", 720, 1280), ("2.2", 704, 1280))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def codecs(version: str, dtype: torch.dtype) -> tuple[WanCodec, WanCodec]:
    """(a codec on the meta device that plans for this machine's CPU, the same modules to trace with)."""
    vae = build_vae(released(version), None, "meta", dtype)
    return WanCodec(vae, f"wan{version}", "", torch.device("cpu")), WanCodec(vae, f"wan{version}", "",
                                                                              torch.device("meta"))


def theirs(version: str, dtype: torch.dtype, tiled: bool):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**{k: v for k, v in diffusers_config(released(version)).items() if k != "_class_name"})
    vae = vae.to(dtype).eval().requires_grad_(False)
    if tiled:
        vae.enable_tiling()
    return vae


def vaecli_decode(planner: WanCodec, tracer: WanCodec, frames: int, hw, dtype, max_memory, trace=True) -> dict:
    f = planner.spatial_factor
    t, latent_hw = (frames - 1) // 4 + 1, (hw[0] // f, hw[1] // f)
    plan = decode_plan(planner, t, latent_hw, max_memory=max_memory)
    z = torch.empty((t, planner.latent_channels, *latent_hw), device="meta", dtype=dtype)

    def run() -> None:
        clip: dict = {}
        for a, b in tracer.decode_steps(plan, t):
            for block in tracer.decode(z[a:b], plan, clip=clip):
                del block

    return {"peak": traced_peak_bytes(run) if trace else None, "predicted": plan.predicted_peak_bytes,
            "plan": plan.pieces.describe(), "budget": plan.budget_bytes, "work": plan.work}


def vaecli_encode(planner: WanCodec, tracer: WanCodec, frames: int, hw, dtype, max_memory, trace=True) -> dict:
    plan = encode_plan(planner, frames, hw, max_memory=max_memory)
    x = torch.empty((frames, planner.in_channels if planner.config.patch_size == 1 else 3, *hw), device="meta",
                    dtype=dtype)
    n = plan.chunk_frames

    def run() -> None:
        clip: dict = {}
        for a in [0, *range(n + 1, frames, n)]:
            out = tracer.moments(x[a:n + 1 if a == 0 else a + n], plan, clip=clip)
            del out

    return {"peak": traced_peak_bytes(run) if trace else None, "predicted": plan.predicted_peak_bytes,
            "plan": f"the first {n + 1} frames, then {n} per call", "budget": plan.budget_bytes, "work": plan.work}


def diffusers_peak(vae, stage: str, frames: int, hw, version: str, dtype) -> int:
    f = 16 if version == "2.2" else 8
    if stage == "decode":
        z = torch.empty((1, vae.config.z_dim, (frames - 1) // 4 + 1, hw[0] // f, hw[1] // f), device="meta",
                        dtype=dtype)
        return traced_peak_bytes(lambda: vae.decode(z).sample)
    x = torch.empty((1, 3, frames, *hw), device="meta", dtype=dtype)
    return traced_peak_bytes(lambda: vae.encode(x).latent_dist.mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[21, 41, 81], help="pixel frames, 1 + 4k each")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--max-memory", help="vaecli's ceiling (default: its CPU default on this machine)")
    ap.add_argument("--stages", nargs="+", default=["decode", "encode"], choices=("decode", "encode"))
    ap.add_argument("--plans-only", action="store_true", help="vaecli's plans and predictions only, no traces")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    dtype, max_memory = DTYPES[args.dtype], parse_bytes(args.max_memory) if args.max_memory else None
    rows = []
    for version, h, w in CASES:
        planner, tracer = codecs(version, dtype)
        frame_counts = args.frames + ([121] if version == "2.2" and 121 not in args.frames else [])
        for stage in args.stages:
            for frames in frame_counts:
                try:
                    ours = (vaecli_decode if stage == "decode" else vaecli_encode)(planner, tracer, frames, (h, w),
                                                                                  dtype, max_memory, not args.plans_only)
                except OutOfMemory as e:  # refused before any work, as the command would be
                    print(f"Wan {version} {stage} {frames:3d} frames {w}x{h} {args.dtype}: vaecli refuses: {e}")
                    continue
                if args.plans_only:
                    print(f"Wan {version} {stage} {frames:3d} frames {w}x{h} {args.dtype}: predicted "
                          f"{format_bytes(ours['predicted'])}, work {ours['work']:.2f}; {ours['plan']}", flush=True)
                    continue
                row = {"version": version, "size": f"{w}x{h}", "frames": frames, "stage": stage, "dtype": args.dtype,
                       "vaecli": ours["peak"], "vaecli_predicted": ours["predicted"], "vaecli_plan": ours["plan"],
                       "budget": ours["budget"]}
                for tiled in (False, True):
                    row["diffusers_tiled" if tiled else "diffusers"] = diffusers_peak(
                        theirs(version, dtype, tiled), stage, frames, (h, w), version, dtype)
                rows.append(row)
                print(f"Wan {version} {stage} {frames:3d} frames {w}x{h} {args.dtype}: vaecli "
                      f"{format_bytes(row['vaecli'])} (predicted {format_bytes(row['vaecli_predicted'])}; "
                      f"{row['vaecli_plan']}), diffusers {format_bytes(row['diffusers'])}, tiled "
                      f"{format_bytes(row['diffusers_tiled'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
