"""Write a synthetic test clip (moving gradients and a bouncing square) with PyAV.

    python scripts/make_sample_clip.py -o sample.mp4 --frames 48 --size 256x144 --fps 24
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def pattern(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: drifting colour gradients with a square bouncing across them, uint8 (H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 3 + i) % 256, (y * 2 + 2 * i) % 256, ((x + y + i) * 5) % 256], -1).astype(np.uint8)
    side = max(4, min(width, height) // 5)
    px = (i * 3) % max(1, 2 * (width - side))
    px = px if px < width - side else 2 * (width - side) - px
    py = (height - side) // 2
    img[py:py + side, px:px + side] = (250, 240, 40)
    return img


def write_clip(path: Path, frames: int, width: int, height: int, fps: Fraction = Fraction(24)) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")))
        container.mux(stream.encode(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", default="sample.mp4")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="256x144")
    parser.add_argument("--fps", default="24")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    write_clip(Path(args.out), args.frames, width, height, Fraction(args.fps))
    print(args.out)


if __name__ == "__main__":
    main()
