"""One 3x3x3 convolution in channels-last 3-D against the contiguous layout, at the shapes of Wan's decoders (CPU).

    python scripts/bench_conv_layout.py                    # 2 threads, best of 3
    python scripts/bench_conv_layout.py --repeats 5 --threads 1

Each shape is (in channels, out channels, frames, height, width) of the padded buffer a `CausalConv3d` convolves;
input and weight both in the layout measured. Prints milliseconds for each and channels-last / contiguous.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = ((96, 96, 6, 130, 130), (192, 192, 6, 66, 66), (256, 256, 6, 66, 66), (384, 384, 6, 34, 34),
          (512, 512, 6, 34, 34), (512, 512, 3, 66, 66), (1024, 1024, 4, 18, 18), (1024, 1024, 3, 10, 10))


def best(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        F.conv3d(x, weight, bias)  # warm-up: oneDNN picks and caches its primitive
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv3d(x, weight, bias)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for ci, co, t, h, w in SHAPES:
        x = torch.randn((1, ci, t, h, w), generator=g)
        weight = torch.randn((co, ci, 3, 3, 3), generator=g) / (27 * ci) ** 0.5
        bias = torch.zeros(co)
        ms = {}
        for name, layout in (("channels-last", torch.channels_last_3d), ("contiguous", torch.contiguous_format)):
            ms[name] = 1e3 * best(x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout), bias,
                                  args.repeats)
        print(f"{ci:5d} -> {co:5d}, {t} x {h}x{w}: channels-last {ms['channels-last']:7.1f} ms, contiguous "
              f"{ms['contiguous']:7.1f} ms, ratio {ms['channels-last'] / ms['contiguous']:.2f}", flush=True)


if __name__ == "__main__":
    main()
