"""Benchmark vaecli's Wan VAE against diffusers' AutoencoderKLWan on the same weights and inputs, one process,
alternating.

    python scripts/bench_wan.py                                   # Wan 2.1 structure, CPU fp32, 9 frames 64x64
    python scripts/bench_wan.py --version 2.2 --frames 17 --size 128x128
    python scripts/bench_wan.py --width 32 --frames 17 --size 96x96 --repeats 3 --json wan.json
    python scripts/bench_wan.py --version 2.2 --size 128x128 --repeats 1 --profile   # where the time goes

Both models get one random state (every parameter randomised; `--width` narrows the released structure's base
width, default the released 96 for 2.1 / 160 and 256 for 2.2), the same frames and latents. vaecli decodes as its
planner does on CPU (`--chunk`: latent frames per call, default 1), diffusers one latent frame per call (its own
loop); encode: vaecli the first frame then `--encode-chunk` frames per call (default 4, as its planner on CPU),
diffusers 1 then 4. Reported: median seconds of each, the ratio diffusers / vaecli, and max |Δ| between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.keymap import original_to_diffusers
from vaecli.model.wan.layout import diffusers_config
from vaecli.model.wan.conv import channels_last_
from vaecli.model.wan.modules import WanVAE
from vaecli.ops.attention import AttentionBackend


def released(version: str, width: int | None = None) -> WanConfig:
    """The released block structure of Wan 2.1 or 2.2 5B; `width` narrows the base width."""
    if version == "2.1":
        return WanConfig(dim=width or 96)
    return WanConfig(dim=width or 160, decoder_dim=(width or 160) * 8 // 5, z_dim=48, in_channels=12,
                     out_channels=12, residual=True, patch_size=2, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48)


def models(version: str, width: int | None, seed: int):
    """(vaecli's WanVAE, diffusers' AutoencoderKLWan) of the released structure with the same random weights."""
    from diffusers import AutoencoderKLWan

    config = released(version, width)
    ours = WanVAE(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if name.endswith("gamma") else
                    noise / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1 * noise)
    theirs = AutoencoderKLWan(**{k: v for k, v in diffusers_config(config).items() if k != "_class_name"})
    mapping = original_to_diffusers(ours.state_dict().keys(), config)
    theirs.load_state_dict({mapping[k]: v for k, v in ours.state_dict().items()}, strict=True)
    return channels_last_(ours), theirs.eval().requires_grad_(False)


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - start, out


def profile(stage: str, runs: dict, top: int = 8) -> None:
    """One run of each tool's `stage` under torch.profiler: the ops by self time, and the convolutions by shape."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    for tool, fn in runs.items():
        with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            timed(fn)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        print(f"{stage} {tool}: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in ops))
        convs = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mkldnn_convolution"]
        for e in sorted(convs, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"    conv {e.self_cpu_time_total / 1e3:7.0f} ms  {e.count:3d} calls  input, weight "
                  f"{e.input_shapes[0]}, {e.input_shapes[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", choices=("2.1", "2.2"), default="2.1")
    ap.add_argument("--width", type=int, help="base width (default: the released model's)")
    ap.add_argument("--frames", type=int, default=9, help="pixel frames, 1 + 4k")
    ap.add_argument("--size", default="64x64", help="WxH, multiples of 8 (2.1) or 16 (2.2)")
    ap.add_argument("--chunk", type=int, default=1, help="vaecli's latent frames per decoder call")
    ap.add_argument("--encode-chunk", type=int, default=4, help="vaecli's pixel frames per encoder call, 4k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--profile", action="store_true", help="also profile one run of each (ops, convolution shapes)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    ours, theirs = models(args.version, args.width, seed=0)
    f = ours.config.spatial_factor
    g = torch.Generator().manual_seed(1)
    x = torch.rand((1, 3, args.frames, height, width), generator=g) * 2 - 1
    t = (args.frames - 1) // 4 + 1
    z = torch.randn((1, ours.config.z_dim, t, height // f, width // f), generator=g)
    attention = AttentionBackend("sdpa")
    cases = {"decode": (lambda: ours.decode(z, attention, chunk=args.chunk), lambda: theirs.decode(z).sample),
             "encode": (lambda: ours.moments(x, attention, chunk=args.encode_chunk),
                        lambda: theirs.encode(x).latent_dist.parameters)}
    results = {"version": args.version, "width": ours.config.dim, "frames": args.frames, "size": [width, height],
               "chunk": args.chunk, "encode_chunk": args.encode_chunk, "threads": torch.get_num_threads()}
    for stage, (mine, reference) in cases.items():
        timed(mine), timed(reference)  # warm-up
        times = {"vaecli": [], "diffusers": []}
        for _ in range(args.repeats):
            s, a = timed(mine)
            times["vaecli"].append(s)
            s, b = timed(reference)
            times["diffusers"].append(s)
        a = a if stage == "decode" else torch.cat([a.chunk(2, 1)[0], a.chunk(2, 1)[1].clamp(-30, 20)], 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[stage] = {"vaecli_s": round(med["vaecli"], 3), "diffusers_s": round(med["diffusers"], 3),
                          "ratio": round(med["diffusers"] / med["vaecli"], 2), "max_abs_diff": float((a - b).abs().max())}
        print(f"{stage}: vaecli {med['vaecli']:.3f} s, diffusers {med['diffusers']:.3f} s, "
              f"ratio {results[stage]['ratio']:.2f}x, max |Δ| {results[stage]['max_abs_diff']:.2e}", flush=True)
        if args.profile:
            profile(stage, {"vaecli": mine, "diffusers": reference})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
