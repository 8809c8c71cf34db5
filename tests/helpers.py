"""Shared test helpers: tiny seeded models, randomised weights, diffusers references."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import torch

from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.vae import VAE, randomize_weights_ as randomize_
from vaecli.ops.attention import AttentionBackend


def tiny_config(time_mode: str = "conv-only", **changes) -> VAEConfig:
    """Two levels of 32/64 channels, 2 ResnetBlocks per encoder level: fast on 2 CPU cores."""
    base = dict(name="tiny", ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=4, embed_dim=4,
                time_mode=time_mode)
    base.update(changes)
    return VAEConfig(**base)


def random_vae(config: VAEConfig, seed: int = 0, attention: str = "math") -> VAE:
    return randomize_(VAE(config, AttentionBackend(attention)), seed).eval().requires_grad_(False)


def train_script():
    """scripts/train.py as a module (its photo pool and camera), imported without leaving scripts/ on sys.path."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train


def frames(t: int = 4, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    """Random frames (t, 3, h, w) in [-1, 1]."""
    return torch.rand(t, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(t: int = 4, h: int = 8, w: int = 8, c: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(t, c, h, w, generator=torch.Generator().manual_seed(seed))


def diffusers_model(config: VAEConfig, sgm_state: dict):
    """diffusers' AutoencoderKLTemporalDecoder (temporal) or AutoencoderKL (image) holding the same weights,
    built from vaecli's own layout conversion and diffusers config."""
    import diffusers

    from vaecli.model.svd.layout import diffusers_config, to_layout

    state, cfg = to_layout(sgm_state, config, "diffusers")
    settings = diffusers_config(cfg)
    ref = getattr(diffusers, settings.pop("_class_name"))(**settings)
    ref.load_state_dict(state, strict=True)
    return ref.eval().requires_grad_(False)


def make_video(path, n: int = 6, width: int = 38, height: int = 30, fps=None, codec: str = "libx264",
               rotation: int | None = None, seed: int = 0):
    """Write a smooth moving test pattern with PyAV; returns the uint8 frames written (n, H, W, 3)."""
    from fractions import Fraction

    import av
    import numpy as np

    fps = fps or Fraction(30000, 1001)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(3,))
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        if codec == "libx264":
            stream.options = {"crf": "10"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            img = np.stack([(x * 5 + i * 9 + base[0]) % 256, (y * 7 + i * 4 + base[1]) % 256,
                            ((x + y) * 3 + base[2]) % 256], axis=-1).astype(np.uint8)
            frames.append(img)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))
    return np.stack(frames)


def read_video(path):
    """All frames of a video as uint8 (n, H, W, 3), with the frame rate."""
    from vaecli.pipeline.video_io import FrameSource

    source = FrameSource(path)
    import numpy as np

    return np.stack([f for _, f in source.frames()]), source.fps


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)):
    """Lay files out as huggingface_hub's cache does: blobs named by hash, snapshot entries linking to them, and
    refs naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = repo / "snapshots" / commit / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), γ ~ 1 + N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * noise)
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise)
