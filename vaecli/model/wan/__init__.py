"""The Wan video VAE family: the Wan 2.1 VAE (Wan 2.1, Wan 2.2 14B, Qwen-Image, Cosmos-Predict2; 8× in space, 16
latent channels) and the Wan 2.2 5B VAE (16× in space, 48 channels), both 4× causal in time, latents normalised
per channel."""

from vaecli.model.wan.family import FAMILY  # noqa: F401  (the registry reads it)
