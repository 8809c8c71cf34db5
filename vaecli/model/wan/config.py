"""The Wan VAE's frozen config and the per-channel latent statistics of the released 2.1 and 2.2 5B models."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# diffusers' `latents_mean` / `latents_std` for the released Wan 2.1 VAE (16 channels)
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# the Wan 2.2 5B VAE's (48 channels), as in its release and diffusers' Wan2.2-TI2V-5B config
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
              0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
              -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


def released_stats(z_dim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(latents_mean, latents_std) of the released model with `z_dim` channels (16: 2.1, 48: 2.2 5B), else
    zeros and ones (no normalisation)."""
    if z_dim == 16:
        return WAN21_MEAN, WAN21_STD
    if z_dim == 48:
        return WAN22_MEAN, WAN22_STD
    return (0.0,) * z_dim, (1.0,) * z_dim


@dataclass(frozen=True)
class WanConfig:
    """dim: base width; z_dim: latent channels; dim_mult: width multipliers per level (len L: 2^(L-1)× in
    space); num_res_blocks: residual blocks per encoder level (decoder: one more); temperal_downsample: which of
    the L-1 downsamples also halve time (the decoder mirrors it); attn_scales: levels with attention (none in
    the released models); in_channels/out_channels: the model's own (3·patch_size², pixels after patching).

    Wan 2.2 5B (`residual`): levels with parameter-free shortcuts (channel-averaging down, duplicating up), an
    upsampler that keeps the width, a decoder of its own base width (`decoder_dim`; 0: `dim`) and 2×2 pixel
    patches (`patch_size` 2: 12 channels in and out)."""

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
    residual: bool = False
    patch_size: int = 1
    decoder_dim: int = 0

    @property
    def dec_dim(self) -> int:
        """The decoder's base width."""
        return self.decoder_dim or self.dim

    @property
    def pixel_channels(self) -> int:
        return self.in_channels // self.patch_size ** 2

    @property
    def version(self) -> str:
        return "2.2" if self.residual else "2.1"

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
