"""Benchmark vaecli against diffusers on the same weights and inputs, in one process, alternating.

    python scripts/bench.py --device cpu --small                      # CI-sized: tiny config, CPU, fp32
    python scripts/bench.py --device cpu --config bundled --frames 8 --size 128x128 --threads 2
    python scripts/bench.py --device cuda --dtype bf16 --frames 14 25 --size 576x1024
    python scripts/bench.py --device cuda --dtype fp16 --frames 14 --chunk 8 --json bench.json

Both models are built from one random state dict (SVD configuration unless --config small|bundled, or --model
CKPT), get the same latents / frames, and run alternately after a warm-up; times are medians (CUDA events on GPU,
perf_counter on CPU). Reported per case: median seconds, peak memory above the weights (CUDA), the activation
peak traced on the meta device for both (device-independent; see vaecli/ops/memtrace.py), the speed ratio
diffusers/vaecli, and the output difference against an fp32 reference (TF32 off): PSNR (range [-1, 1]) and max |Δ|.
vaecli runs as the CLI plans it: 2D layers in batches of 4 frames on CUDA (and for --trace-only), all at once on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vaecli.model.checkpoint import read_checkpoint
from vaecli.model.svd.layout import diffusers_config, to_layout
from vaecli.model.svd.config import VAEConfig, load_config
from vaecli.model.svd.streaming import Pieces
from vaecli.model.svd.vae import VAE, randomize_weights_
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.device import parse_dtype
from vaecli.ops.memtrace import traced_peak_bytes
from vaecli.model.plan import format_bytes

CONFIGS = {"small": dict(ch=32, ch_mult=(1, 2), name="small"),  # 2 levels (f = 2): CI-sized
           "bundled": dict(ch=64, ch_mult=(1, 1, 2, 2), name="vaecli-small-arch"),  # the bundled model's shape
           "narrow": dict(ch=32, ch_mult=(1, 2, 4, 4), name="svd-narrow")}  # SVD's blocks at a quarter of its width


def diffusers_model(config: VAEConfig, state: dict | None, dtype: torch.dtype | None = None):
    """diffusers' model with `state` (vaecli's layout, converted); state None: uninitialised (for meta traces)."""
    import diffusers

    if state is None:
        settings = diffusers_config(config)
        return getattr(diffusers, settings.pop("_class_name"))(**settings).to(dtype).eval()
    converted, cfg = to_layout(state, config, "diffusers")
    settings = diffusers_config(cfg)
    ref = getattr(diffusers, settings.pop("_class_name"))(**settings)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, out
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def peak(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def traced(build, run) -> int:
    """Activation peak of run(model) with build() made on the meta device (nothing is computed)."""
    with torch.device("meta"):
        model = build().to("meta")
        return traced_peak_bytes(lambda: run(model))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def parse_pieces(spec: str) -> Pieces:
    """"f1,t16,tt16,park" -> Pieces(frames=1, tile=16, time_tile=16, park=True)."""
    values = {"f": 1, "t": None, "tf": None, "tt": None}
    park = keep = False
    for token in spec.split(","):
        if token in ("park", "keep"):
            park, keep = park or token == "park", keep or token == "keep"
            continue
        key = token.rstrip("0123456789")
        if key not in values or key == token:
            raise SystemExit(f"--stream: cannot read {token!r} (f, t, tf, tt followed by a number, park or keep)")
        values[key] = int(token[len(key):])
    return Pieces(values["f"], values["t"], values["tf"], values["tt"], park, keep)


def stream_decode(model, z, pieces, sample=False):
    for _ in model.decode_stream(z, pieces, sample_tiles=sample):
        pass


def print_table(rows: list[dict], gib) -> None:
    print(f"{'case':24} {'vaecli':>9} {'diffusers':>10} {'speedup':>8} {'vaecli peak':>12} {'diff. peak':>11} "
          f"{'vaecli traced':>14} {'diff. traced':>13} {'PSNR vs fp32':>13} {'max |Δ|':>9}")
    for r in rows:
        print(f"{r['case']:24} {r['vaecli_s']:>8.3f}s {r['diffusers_s']:>9.3f}s {r['speedup']:>7.2f}x "
              f"{gib(r['vaecli_peak']):>12} {gib(r['diffusers_peak']):>11} {gib(r['vaecli_traced']):>14} "
              f"{gib(r['diffusers_traced']):>13} {r['vaecli_psnr']:>12.1f} {r['vaecli_max_abs']:>9.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--small", action="store_true", help="same as --config small")
    parser.add_argument("--config", choices=["svd", *CONFIGS], default="svd", help="architecture for random weights")
    parser.add_argument("--frame-batch", type=int, default=None,
                        help="vaecli's 2D layers N frames at a time (0: off; default as the CLI plans: 4 on CUDA, off on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--trace-only", action="store_true",
                        help="only the traced activation peaks (meta device: any size on any machine, in seconds)")
    parser.add_argument("--model", help="a checkpoint instead of random weights at the SVD configuration")
    parser.add_argument("--frames", type=int, nargs="+", default=None)
    parser.add_argument("--size", default=None, help="HxW of the frames, e.g. 576x1024")
    parser.add_argument("--chunk", type=int, default=None, help="also decode in chunks of N frames (num_frames=N)")
    parser.add_argument("--stream", default=None, metavar="SPEC",
                        help="run vaecli with the exact streaming executor, e.g. f2,tt16 or f1,t16,tt16,park "
                             "(f: frames per 2D chunk, t: 2D tile, tf: frames per temporal piece, tt: temporal tile, "
                             "latent px; park: clip in host memory; keep: conv1 outputs kept per chunk in tiled 2D layers). Traces then count device bytes only, one "
                             "piece per loop (equal to the full trace: tests/test_planner.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="decode,encode")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.small:
        args.config = "small"
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.frame_batch is None:
        args.frame_batch = 4 if device.type == "cuda" or args.trace_only else 0
    fb = args.frame_batch or None
    pieces = parse_pieces(args.stream) if args.stream else None
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.model:
        ckpt = read_checkpoint(args.model)
        config, state = ckpt.config, {k: v.float() for k, v in ckpt.state.items()}
    else:
        config = load_config("svd-vae")
        if args.config != "svd":
            config = config.replace(**CONFIGS[args.config])
        state = None if args.trace_only else randomize_weights_(VAE(config)).state_dict()
    small = args.config != "svd"
    frames = args.frames or ([6] if small else [14])
    h, w = (int(v) for v in (args.size or ("64x64" if small else "576x1024")).split("x"))
    f = config.downscale
    ours = theirs = ref32 = None
    if not args.trace_only:
        ours = VAE(config, AttentionBackend("sdpa"))
        ours.load_state_dict(state)
        ours = ours.to(device, dtype).eval()
        theirs = diffusers_model(config, state).to(device, dtype)
        ref32 = VAE(config, AttentionBackend("math"))
        ref32.load_state_dict(state)
        ref32 = ref32.to(device).eval()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for t in frames:
        z = torch.randn(t, config.latent_channels, h // f, w // f, generator=gen).to(device)
        x = (torch.rand(t, 3, h, w, generator=gen) * 2 - 1).to(device)
        cases = []
        if "decode" in args.stages:
            clip = t if args.chunk is None else args.chunk
            zc = torch.empty(clip, *z.shape[1:], device="meta", dtype=dtype)
            ours_trace = (lambda m: m.decode(zc, frame_batch=fb)) if pieces is None else \
                (lambda m: stream_decode(m, zc, pieces, sample=True))
            cases.append((f"decode {t}f" + (f" chunks of {clip}" if clip < t else "") +
                          (f" stream {args.stream}" if pieces else ""),
                          lambda: torch.cat([ours.decode(z[i:i + clip].to(dtype), num_frames=min(clip, t - i),
                                                         frame_batch=fb, pieces=pieces) for i in range(0, t, clip)]),
                          lambda: torch.cat([theirs.decode(z[i:i + clip].to(dtype), num_frames=min(clip, t - i)).sample
                                             for i in range(0, t, clip)]),
                          lambda: torch.cat([ref32.decode(z[i:i + clip], num_frames=min(clip, t - i))
                                             for i in range(0, t, clip)]),
                          lambda: traced(lambda: VAE(config).to(dtype), ours_trace),
                          lambda: traced(lambda: diffusers_model(config, None, dtype),
                                         lambda m: m.decode(zc, num_frames=clip).sample)))
        if "encode" in args.stages:
            xm = torch.empty(t, 3, h, w, device="meta", dtype=dtype)
            enc_trace = (lambda m: m.encode(xm, frame_batch=fb)) if pieces is None else \
                (lambda m: m.moments(xm, pieces=pieces, sample_tiles=True))
            cases.append((f"encode {t}f" + (f" stream {args.stream}" if pieces else ""),
                          lambda: ours.encode(x.to(dtype), frame_batch=fb, pieces=pieces),
                          lambda: theirs.encode(x.to(dtype)).latent_dist.mode(), lambda: ref32.encode(x),
                          lambda: traced(lambda: VAE(config).to(dtype), enc_trace),
                          lambda: traced(lambda: diffusers_model(config, None, dtype),
                                         lambda m: m.encode(xm).latent_dist.mode())))
        for name, fa, fb_, fr, trace_a, trace_b in cases:
            if args.trace_only:
                ta, tb = trace_a(), trace_b()
                rows.append({"case": name, "size": f"{h}x{w}", "dtype": args.dtype, "frame_batch": fb,
                             "vaecli_traced": ta, "diffusers_traced": tb, "memory_ratio": tb / ta})
                continue
            with torch.inference_mode():
                ref = fr()
                fa(), fb_()  # warm-up
                times_a, times_b = [], []
                for _ in range(args.repeats):  # alternate
                    ta, out_a = timed(fa, device)
                    tb, out_b = timed(fb_, device)
                    times_a.append(ta)
                    times_b.append(tb)
                pa, pb = peak(fa, device), peak(fb_, device)
            ta, tb = trace_a(), trace_b()
            row = {"case": name, "size": f"{h}x{w}", "dtype": args.dtype, "device": str(device),
                   "vaecli_s": statistics.median(times_a), "diffusers_s": statistics.median(times_b),
                   "vaecli_peak": pa, "diffusers_peak": pb, "vaecli_traced": ta, "diffusers_traced": tb,
                   "frame_batch": fb, "threads": torch.get_num_threads(),
                   "speedup": statistics.median(times_b) / statistics.median(times_a),
                   "vaecli_psnr": psnr(out_a, ref), "diffusers_psnr": psnr(out_b, ref),
                   "vaecli_max_abs": (out_a.float() - ref.float()).abs().max().item(),
                   "diffusers_max_abs": (out_b.float() - ref.float()).abs().max().item(),
                   "nonfinite": int((~torch.isfinite(out_a)).sum().item())}
            rows.append(row)
    gib = lambda n: "-" if n is None else format_bytes(n)  # noqa: E731
    if args.trace_only:
        print(f"{'case':40} {'size':>9} {'dtype':>5} {'vaecli traced':>14} {'diffusers traced':>17} {'ratio':>6}")
        for r in rows:
            print(f"{r['case']:40} {r['size']:>9} {r['dtype']:>5} {gib(r['vaecli_traced']):>14} "
                  f"{gib(r['diffusers_traced']):>17} {r['memory_ratio']:>5.2f}x")
    else:
        print_table(rows, gib)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
