"""Reconstruction metrics, computed as frames arrive: PSNR, SSIM and flicker per clip."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vaecli.errors import InputError
from vaecli.pipeline.frames import ssim

def flicker(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean |Δ reconstruction - Δ source| over consecutive frames, in 0-255 units: how much the frame-to-frame
    change of a reconstruction differs from the source's (0 = the same motion, no added flicker).
    reference, reconstruction: uint8 (T, H, W, 3), T >= 2."""
    ref, rec = reference.astype(np.float32), reconstruction.astype(np.float32)
    return float(np.abs((rec[1:] - rec[:-1]) - (ref[1:] - ref[:-1])).mean())


class RoundtripMeter:
    """Compares decoded frames with the same source frames as they arrive: PSNR, SSIM and flicker per clip.

    reference: the selected source frames, uint8 (H, W, 3), in order (streamed, not stored);
    clip_frames: frames per reported clip (None = one clip for the whole video).
    """

    def __init__(self, reference: Iterator[tuple[int, np.ndarray]], clip_frames: int | None = None):
        self.reference = reference
        self.clip_frames = clip_frames
        self.clips: list[dict] = []
        self._squared, self._ssim, self._flicker = [], [], []
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, decoded: np.ndarray) -> None:
        for image in decoded:
            _, ref = next(self.reference)
            if ref.shape != image.shape:
                raise InputError(f"reconstruction is {image.shape[1]}x{image.shape[0]}, source {ref.shape[1]}x{ref.shape[0]}")
            self._squared.append(float(np.mean((ref.astype(np.float64) - image.astype(np.float64)) ** 2)))
            self._ssim.append(ssim(ref[None], image[None]))
            if self._previous is not None:
                self._flicker.append(flicker(np.stack([self._previous[0], ref]), np.stack([self._previous[1], image])))
            self._previous = (ref, image)
            if self.clip_frames and len(self._squared) == self.clip_frames:
                self._flush()

    def _flush(self) -> None:
        if not self._squared:
            return
        mse = float(np.mean(self._squared))
        value = float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
        self.clips.append({"clip": len(self.clips), "frames": len(self._squared), "psnr": round(value, 3),
                           "ssim": round(float(np.mean(self._ssim)), 5),
                           "flicker": round(float(np.mean(self._flicker)), 4) if self._flicker else None})
        self._squared, self._ssim, self._flicker = [], [], []

    def summary(self) -> dict:
        self._flush()
        frames = sum(c["frames"] for c in self.clips)
        weights = [c["frames"] / frames for c in self.clips]
        flickers = [(w, c["flicker"]) for w, c in zip(weights, self.clips) if c["flicker"] is not None]
        total = sum(w for w, _ in flickers)
        return {"frames": frames, "psnr": round(sum(w * c["psnr"] for w, c in zip(weights, self.clips)), 3),
                "ssim": round(sum(w * c["ssim"] for w, c in zip(weights, self.clips)), 5),
                "flicker": round(sum(w * f for w, f in flickers) / total, 4) if total else None, "clips": self.clips}
