"""The Wan VAE's frozen config and the per-channel latent statistics of the released 2.1 model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# diffusers' `latents_mean` / `latents_std` for the released Wan 2.1 VAE (16 channels)
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class WanConfig:
    """dim: base width; z_dim: latent channels; dim_mult: width multipliers per level (len L: 2^(L-1)× in
    space); num_res_blocks: residual blocks per encoder level (decoder: one more); temperal_downsample: which of
    the L-1 downsamples also halve time (the decoder mirrors it); attn_scales: levels with attention (none in
    the released models)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    attn_scales: tuple[float, ...] = ()
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_MEAN
    latents_std: tuple[float, ...] = WAN21_STD
    name: str = "wan2.1"

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
