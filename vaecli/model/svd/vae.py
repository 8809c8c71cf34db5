"""`VAE`: encoder + decoder (+ optional quant convs), with the public encode/decode API."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from vaecli.errors import UsageError
from vaecli.model.posterior import DiagonalGaussian
from vaecli.model.svd.blocks import Clips, Stage, frame_batches
from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.decoder import Decoder
from vaecli.model.svd.encoder import Encoder
from vaecli.model.svd.streaming import Pieces, Streamer, stream_frames
from vaecli.ops.attention import AttentionBackend


def _check_frame_batch(frame_batch: int | None) -> None:
    if frame_batch is not None and frame_batch < 1:
        raise UsageError(f"frame_batch must be at least 1, got {frame_batch}")


class VAE(nn.Module):
    """A KL VAE whose decoder may mix frames (SVD) or code them one by one (SD image VAE).

    State-dict keys are the sgm/ldm keys without prefix: `encoder.*`, `decoder.*`, and `quant_conv.*` /
    `post_quant_conv.*` where the config has them. `attention` is the default backend of every attention layer;
    encode/decode take another per call (`attention=`: the plan's), and the modules never store one.
    Inputs of any memory format are accepted; the model computes channels-last (memory order N, H, W, C) and
    returns channels-last tensors (same values; call `.contiguous()` for NCHW memory).
    """

    def __init__(self, config: VAEConfig, attention: AttentionBackend | None = None):
        super().__init__()
        self.config = config
        self.attention = attention if attention is not None else AttentionBackend("sdpa")
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        if config.post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def _check_frames(self, x: torch.Tensor, channels: int, what: str, multiple: int = 1) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise UsageError(f"{what} must be (T, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise UsageError(f"{what} height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")

    def _check_latents(self, z: torch.Tensor, num_frames: int | None, image_only: torch.Tensor | None
                       ) -> tuple[int, int]:
        """Validate decode arguments; returns (frames, frames per clip)."""
        self._check_frames(z, self.config.latent_channels, "latents")
        frames = z.shape[0]
        num_frames = frames if num_frames is None else num_frames
        if num_frames < 1 or frames % num_frames:
            raise UsageError(f"{frames} latent frames do not split into clips of {num_frames} frames")
        if image_only is not None and image_only.shape != (frames,):
            raise UsageError(f"image_only must have shape ({frames},), got {tuple(image_only.shape)}")
        return frames, num_frames

    def moments(self, x: torch.Tensor, frame_batch: int | None = None, pieces: Pieces | None = None,
                sample_tiles: bool = False, attention: AttentionBackend | None = None,
                device: torch.device | None = None) -> torch.Tensor:
        """Frames (T, 3, H, W) in [-1, 1] -> the posterior's moments (T, 2C, H/8, W/8): mean, then log-variance.

        frame_batch: encode this many frames at a time into one output (same result, lower peak memory).
        pieces: run the encoder layer by layer in exact spatial tiles (`vaecli.model.svd.streaming`): the same
            moments within rounding, for frames too large to encode whole (x may then live on the host).
        attention: the backend of this call (default: the model's).
        """
        attention = attention or self.attention
        self._check_frames(x, self.config.in_channels, "frames", self.config.downscale)
        _check_frame_batch(frame_batch)
        if pieces is not None:
            stages = self.encoder.stages(attention)
            if self.config.quant_conv:
                stages.append(Stage("conv", self.quant_conv, self.quant_conv))
            f = self.config.downscale
            streamer = Streamer(pieces, device or self._device(), (x.shape[-2] // f, x.shape[-1] // f),
                                sample_tiles=sample_tiles, attention=attention)
            return streamer.run(stages, x.contiguous(memory_format=torch.channels_last)).gather()
        layers = [partial(self.encoder, attention=attention)] + ([self.quant_conv] if self.config.quant_conv else [])
        return frame_batches(layers, x.contiguous(memory_format=torch.channels_last), frame_batch)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_moments(self, x: torch.Tensor, frame_batch: int | None = None,
                       pieces: Pieces | None = None, attention: AttentionBackend | None = None) -> DiagonalGaussian:
        """Frames (T, 3, H, W) in [-1, 1] -> the posterior over latents (T, C, H/8, W/8)."""
        return DiagonalGaussian(self.moments(x, frame_batch, pieces, attention=attention))

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               frame_batch: int | None = None, pieces: Pieces | None = None,
               attention: AttentionBackend | None = None) -> torch.Tensor:
        """Frames (T, 3, H, W) in [-1, 1] -> unscaled latents (T, C, H/8, W/8): the posterior mode, or a sample."""
        posterior = self.encode_moments(x, frame_batch, pieces, attention)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode(self, z: torch.Tensor, num_frames: int | None = None, *, per_frame: bool = False,
               image_only: torch.Tensor | None = None, frame_batch: int | None = None,
               pieces: Pieces | None = None, attention: AttentionBackend | None = None) -> torch.Tensor:
        """Unscaled latents (T, C, h, w) -> frames (T, 3, 8h, 8w), ≈[-1, 1].

        num_frames: consecutive groups of this many frames are decoded as independent clips (temporal convs
            zero-pad at each clip's edges, temporal GroupNorm spans each clip); default: all T frames, one clip.
        per_frame: decode every frame alone with the spatial path (the 2D decoder on the same weights).
        image_only: bool (T,), frames treated as still images (merge strategy "learned_with_images").
        frame_batch: run the 2D layers this many frames at a time (same result, lower peak memory; see `Clips`).
        pieces: run the decoder layer by layer over frame chunks and/or spatial tiles (`decode_stream`): the same
            frames within rounding, in a fraction of the memory.
        attention: the backend of this call (default: the model's).
        An image VAE (time_mode "image") always decodes frame by frame.
        """
        attention = attention or self.attention
        if pieces is not None:
            parts = [x for _, x in self.decode_stream(z, pieces, num_frames, per_frame=per_frame,
                                                      image_only=image_only, attention=attention)]
            return torch.cat(parts).contiguous(memory_format=torch.channels_last)
        frames, num_frames = self._check_latents(z, num_frames, image_only)
        _check_frame_batch(frame_batch)
        z = z.contiguous(memory_format=torch.channels_last)
        if self.config.post_quant_conv:
            z = self.post_quant_conv(z)
        if not self.config.is_video or per_frame:
            return self.decoder(z, Clips(num_frames, skip_video=True, frame_batch=frame_batch, attention=attention))
        return self.decoder(z, Clips(num_frames, image_only=image_only, frame_batch=frame_batch, attention=attention))

    def decode_stream(self, z: torch.Tensor, pieces: Pieces, num_frames: int | None = None, *,
                      per_frame: bool = False, image_only: torch.Tensor | None = None, check_finite: bool = False,
                      out_chunk: int | None = None, sample_tiles: bool = False,
                      phase: Callable[[str], None] | None = None,
                      attention: AttentionBackend | None = None,
                      device: torch.device | None = None, scratch=None) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode exactly like `decode`, layer by layer over `pieces` (`vaecli.model.svd.streaming`); yields
        (first frame, frames (n, 3, 8h, 8w)) in order, `out_chunk` frames at a time (default: pieces.frames).

        z may live on the host (with pieces.park the clip's activations stay there too). check_finite: raise
        `NonFiniteActivation` as soon as a half-precision piece holds inf/NaN. sample_tiles, phase: memory traces
        only (see `Streamer`). device: where the executor computes (default: the weights'; counting runs of a
        model on the meta device name the device they price). scratch: where `pieces.disk` keeps the clip (a
        `vaecli.ops.scratch.Scratch`, or `CountedScratch` when priced).
        """
        frames, num_frames = self._check_latents(z, num_frames, image_only)
        skip = not self.config.is_video or per_frame
        attention = attention or self.attention
        stages = self.decoder.stages(Clips(num_frames, skip_video=skip, attention=attention))
        if self.config.post_quant_conv:
            stages.insert(0, Stage("conv", self.post_quant_conv, self.post_quant_conv))
        streamer = Streamer(pieces, device or self._device(), (z.shape[-2], z.shape[-1]), check_finite,
                            sample_tiles, phase, attention, scratch)
        for start in range(0, frames, num_frames):
            flags = None if image_only is None else image_only[start:start + num_frames]
            store = streamer.run(stages, z[start:start + num_frames].contiguous(memory_format=torch.channels_last),
                                 flags)
            for first, x in stream_frames(store, out_chunk or pieces.frames):
                yield start + first, x

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Reconstruct frames: decode(encode(x)) with the posterior mode."""
        return self.decode(self.encode(x), num_frames)


def randomize_weights_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and float buffer with seeded random values (for tests, benchmarks, demos).

    Unlike a training init, nothing is left at zero: weights ~ N(0, 1/fan_in) keep activations O(1), norm
    scales ~ 1 ± 0.2, biases ~ N(0, 0.1), mix_factor ~ N(0, 2) so that sigmoid(mix_factor) spans (0, 1), and the
    zero-initialised output convs of the temporal blocks get real values, so every path is exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "mix_factor":
                value = 2.0 * noise
            elif tensor.ndim == 1 and leaf == "weight":  # GroupNorm / LayerNorm scale
                value = 1.0 + 0.2 * noise
            elif leaf == "bias":
                value = 0.1 * noise
            else:
                value = noise / math.sqrt(math.prod(tensor.shape[1:]))
            tensor.copy_(value.to(tensor.dtype))
    return module
