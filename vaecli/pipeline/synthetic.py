"""Procedural test and training clips: moving, deforming shapes over gradients and textures, text, noise and
lighting changes. Deterministic for a seed; no data is downloaded. Used by `vaecli demo` and `scripts/train.py`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _background(rng: np.random.Generator, height: int, width: int, t: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1]: a drifting two-colour gradient plus a sinusoidal texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * math.pi)
    drift = rng.uniform(-0.02, 0.02)
    proj = (x * math.cos(angle) + y * math.sin(angle)) / max(height, width)
    ramp = (proj[None] + drift * t[:, None, None]) % 1.0  # (T, H, W)
    bg = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    freq, amp = rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.25)
    phase_speed = rng.uniform(-0.3, 0.3)
    tex = np.sin(x * freq + y * freq * rng.uniform(-1, 1) + phase_speed * t[:, None, None])
    return np.clip(bg + amp * tex[..., None] * rng.uniform(-1, 1, 3), 0, 1)


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0, text: str | None = None) -> np.ndarray:
    """A clip (frames, height, width, 3) uint8 RGB of moving content.

    Shapes (ellipses, rectangles, polygons) move along straight paths and bounce, grow and rotate; an optional
    text line scrolls; the whole frame gets a slow lighting change and a little sensor noise.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(frames, dtype=np.float32)
    base = _background(rng, height, width, t)
    shapes = []
    for _ in range(int(rng.integers(2, 7))):
        shapes.append({
            "kind": rng.choice(["ellipse", "rect", "poly"]), "color": tuple(int(c) for c in rng.integers(0, 256, 3)),
            "pos": rng.uniform(0, 1, 2) * (width, height), "vel": rng.normal(0, 0.02, 2) * (width, height),
            "size": rng.uniform(0.08, 0.35) * min(height, width), "grow": rng.uniform(-0.01, 0.01),
            "angle": rng.uniform(0, 2 * math.pi), "spin": rng.normal(0, 0.08), "sides": int(rng.integers(3, 7)),
        })
    label = text if text is not None else (None if rng.uniform() < 0.5 else "vaecli %d" % seed)
    font = ImageFont.load_default()
    text_pos = rng.uniform(0, 1, 2) * (width, height)
    text_vel = rng.normal(0, 0.01, 2) * (width, height)
    light = rng.uniform(-0.15, 0.15)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        img = Image.fromarray((base[i] * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for s in shapes:
            cx, cy = s["pos"] + s["vel"] * i
            cx, cy = abs((cx % (2 * width)) - width) if cx < 0 or cx > width else cx, \
                abs((cy % (2 * height)) - height) if cy < 0 or cy > height else cy  # bounce
            r = max(2.0, s["size"] * (1 + s["grow"] * i))
            if s["kind"] == "ellipse":
                draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=s["color"])
            elif s["kind"] == "rect":
                draw.rectangle([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=s["color"])
            else:
                a = s["angle"] + s["spin"] * i
                pts = [(cx + r * math.cos(a + 2 * math.pi * k / s["sides"]),
                        cy + r * math.sin(a + 2 * math.pi * k / s["sides"])) for k in range(s["sides"])]
                draw.polygon(pts, fill=s["color"])
        if label:
            tx, ty = text_pos + text_vel * i
            draw.text((tx % width, ty % height), label, fill=(255, 255, 255), font=font)
        frame = np.asarray(img, dtype=np.float32) / 255.0
        frame = frame * (1 + light * i / max(1, frames - 1))
        frame = frame + rng.normal(0, 0.01, frame.shape)
        out[i] = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    return out
