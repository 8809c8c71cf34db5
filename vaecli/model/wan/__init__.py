"""The Wan 2.1 video VAE family (Wan 2.1, Wan 2.2 14B, Qwen-Image, Cosmos-Predict2): 4× causal in time, 8× in
space, 16 latent channels normalised per channel."""

from vaecli.model.wan.family import FAMILY  # noqa: F401  (the registry reads it)
