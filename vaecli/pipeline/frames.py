"""Frame geometry and pixel conversions: fitting sizes to the model's multiple, undoing it, metrics.

Frames travel between stages as uint8 numpy arrays `(H, W, 3)` RGB, and into the model as float tensors
`(T, 3, H, W)` in [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vaecli.errors import UsageError

FITS = ("pad", "crop", "resize")


@dataclass(frozen=True)
class Geometry:
    """How source frames became model frames, and how to undo it.

    source: (W, H) of the frames as read (after rotation); resized: (W, H) after `--size` (= source if none);
    processed: (W, H) given to the model (multiples of the model's factor); fit: "pad", "crop" or "resize";
    box: (left, top, right, bottom) of the resized content inside the processed frame (pad) or of the processed
    frame inside the resized content (crop); all zero for resize.
    """

    source: tuple[int, int]
    resized: tuple[int, int]
    processed: tuple[int, int]
    fit: str
    box: tuple[int, int, int, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Geometry":
        d = json.loads(text)
        return cls(tuple(d["source"]), tuple(d["resized"]), tuple(d["processed"]), d["fit"], tuple(d["box"]))


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"640x360" -> (640, 360)."""
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must look like 640x360, not {text!r}") from None
    if w < 1 or h < 1:
        raise UsageError(f"--size must be positive, not {text!r}")
    return w, h


def plan_geometry(source: tuple[int, int], multiple: int, fit: str = "pad",
                  size: tuple[int, int] | None = None) -> Geometry:
    """Decide the processed size for frames of `source` (W, H)."""
    if fit not in FITS:
        raise UsageError(f"--fit must be one of {', '.join(FITS)}, not {fit!r}")
    resized = size or source
    w, h = resized
    if fit == "pad":
        pw, ph = -(-w // multiple) * multiple, -(-h // multiple) * multiple
        left, top = (pw - w) // 2, (ph - h) // 2
        return Geometry(source, resized, (pw, ph), fit, (left, top, left + w, top + h))
    if fit == "crop":
        cw, ch = w // multiple * multiple, h // multiple * multiple
        if cw == 0 or ch == 0:
            raise UsageError(f"frames of {w}x{h} are smaller than {multiple} pixels; use --fit pad")
        left, top = (w - cw) // 2, (h - ch) // 2
        return Geometry(source, resized, (cw, ch), fit, (left, top, left + cw, top + ch))
    rw, rh = max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)
    return Geometry(source, resized, (rw, rh), fit, (0, 0, 0, 0))


def to_model(frames: list[np.ndarray], geometry: Geometry, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 frames [(H, W, 3)] -> (T, 3, H', W') in [-1, 1] at the processed size, on `device`."""
    x = torch.from_numpy(np.stack(frames))  # (T, H, W, 3) uint8: a quarter of the float bytes cross the bus
    if device.type == "cuda":
        x = x.pin_memory()  # page-locked, so the copy below is asynchronous
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    if geometry.resized != geometry.source:
        x = resize(x, geometry.resized)
    left, top, right, bottom = geometry.box
    if geometry.fit == "pad" and geometry.processed != geometry.resized:
        pw, ph = geometry.processed
        pads = (left, pw - right, top, ph - bottom)
        mode = "reflect" if max(pads[:2]) < x.shape[-1] and max(pads[2:]) < x.shape[-2] else "replicate"
        x = F.pad(x, pads, mode=mode)
    elif geometry.fit == "crop":
        x = x[:, :, top:bottom, left:right]
    elif geometry.fit == "resize" and geometry.processed != geometry.resized:
        x = resize(x, geometry.processed)
    return x.to(dtype)


def from_model(x: torch.Tensor, geometry: Geometry | None, native: bool = False) -> np.ndarray:
    """(T, 3, H', W') ≈[-1, 1] -> uint8 (T, H, W, 3), undoing the fit and resize (unless `native`)."""
    x = x.float()
    if geometry is not None and not native:
        left, top, right, bottom = geometry.box
        if geometry.fit == "pad":
            x = x[:, :, top:bottom, left:right]
        elif geometry.fit == "crop":  # the cropped border is gone: repeat the edge pixels to the old size
            rw, rh = geometry.resized
            x = F.pad(x, (left, rw - right, top, rh - bottom), mode="replicate")
        elif geometry.fit == "resize" and geometry.processed != geometry.resized:
            x = resize(x, geometry.resized)
        if geometry.resized != geometry.source:
            x = resize(x, geometry.source)
    x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, C, H, W) float -> (T, C, size[1], size[0]), bicubic with antialiasing when shrinking."""
    w, h = size
    if (x.shape[-1], x.shape[-2]) == (w, h):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 videos (T, H, W, 3): 11x11 Gaussian window, σ = 1.5, per channel."""
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255.0  # (T, 3, H, W)
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 255.0
    size = min(11, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())
