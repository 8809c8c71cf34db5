"""The diagonal Gaussian posterior of a KL VAE's encoder (every family here has one)."""

from __future__ import annotations

import torch


class DiagonalGaussian:
    """The KL posterior: moments (N, 2C, h, w) split into mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε, ε ~ N(0, 1) drawn from `generator` (on the generator's device, then moved)."""
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)
