"""vaecli: encode videos into latents and decode latents back into videos with the SVD temporal VAE.

Public API (imported lazily, so `import vaecli` stays cheap):
    load_vae(source=None, *, device="cpu", dtype=torch.float32, attention="auto") -> VAE
    VAE, VAEConfig, Pieces (how the exact streaming executor cuts a clip)
"""

from __future__ import annotations

from vaecli._version import __version__

__all__ = ["load_vae", "VAE", "VAEConfig", "Pieces", "__version__"]


def __getattr__(name: str):
    if name == "load_vae":
        from vaecli.model.checkpoint import load_vae

        return load_vae
    if name == "VAE":
        from vaecli.model.svd.vae import VAE

        return VAE
    if name == "Pieces":
        from vaecli.model.svd.streaming import Pieces

        return Pieces
    if name == "VAEConfig":
        from vaecli.model.svd.config import VAEConfig

        return VAEConfig
    raise AttributeError(f"module 'vaecli' has no attribute {name!r}")
