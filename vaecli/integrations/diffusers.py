"""vaecli inside diffusers: `use_vaecli(pipe_or_vae)` makes the VAE's `decode` and `encode` run through vaecli.

The VAE's own weights are used (read from the module at each call, shared, not copied, so CPU offload hooks that
move the module keep working: `_hf_hook.pre_forward` runs first, as diffusers' own `apply_forward_hook` does),
on the module's device and dtype; vaecli's memory planner picks an exact plan within the free memory (or
`max_memory`). Signatures and return types are diffusers': `decode` returns `DecoderOutput` (or a tuple with
`return_dict=False`), `encode` returns `AutoencoderKLOutput` with a `DiagonalGaussianDistribution`.

Layouts (diffusers'): SVD's `AutoencoderKLTemporalDecoder` decodes latents `(B·T, C, h, w)` with `num_frames`
(consecutive groups of `num_frames` frames are clips) to frames `(B·T, 3, H, W)`; Wan's `AutoencoderKLWan`
decodes `(B, C, t, h, w)` to `(B, 3, T, H, W)` clamped to [-1, 1], and encodes the reverse. Latents are raw
(the pipeline applies scaling_factor or latents_mean/std itself, as without vaecli).

For the SVD pipeline, pass `decode_chunk_size` ≥ the frame count (the pipeline then hands the whole clip to one
`decode` call) to get the exact one-clip decode; with a smaller chunk size each chunk arrives as its own call and
is decoded as its own clip, as diffusers does.

diffusers is optional (the `diffusers` extra); it is imported when a result is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vaecli.errors import UsageError
from vaecli.integrations.common import codec_of, decode_clip, encode_clip
from vaecli.model.checkpoint import module_checkpoint
from vaecli.pipeline.planner import parse_bytes


@dataclass
class Handle:
    """What `use_vaecli` changed; `undo()` restores the VAE's own `decode`/`encode` (also on leaving a `with`)."""

    vae: Any
    saved: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)  # the plans run, for inspection: (stage, Plan)

    def undo(self) -> None:
        for name, previous in self.saved.items():
            if previous is None:
                self.vae.__dict__.pop(name, None)
            else:
                self.vae.__dict__[name] = previous
        self.saved = {}

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def use_vaecli(target: Any, *, max_memory: str | int | None = None, attention: str = "auto") -> Handle:
    """Route `target.vae` (a diffusers pipeline) or `target` (a diffusers VAE) through vaecli; returns a `Handle`.

    max_memory: a ceiling for the planner ("8GiB" or bytes; default: the free memory, a share of it on CPU)."""
    vae = getattr(target, "vae", target)
    if not isinstance(vae, torch.nn.Module) or not callable(getattr(vae, "decode", None)):
        raise UsageError("use_vaecli takes a diffusers pipeline with a .vae or a diffusers VAE module")
    module_checkpoint(vae)  # refuses now what vaecli cannot run (names the family layouts it tried)
    limit = parse_bytes(max_memory) if isinstance(max_memory, str) else max_memory
    handle = Handle(vae)
    runner = _Runner(vae, limit, attention, handle.calls)
    for name in ("decode", "encode"):
        handle.saved[name] = vae.__dict__.get(name)
        vae.__dict__[name] = getattr(runner, name)
    return handle


class _Runner:
    def __init__(self, vae, max_memory: int | None, attention: str, calls: list):
        self.vae, self.max_memory, self.attention, self.calls = vae, max_memory, attention, calls

    def _codec(self):
        """vaecli's codec over the module's current weights (after an offload hook put them in place)."""
        hook = getattr(self.vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.vae)
        return codec_of(self.vae, self.attention)

    def _done(self) -> None:
        hook = getattr(self.vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "post_forward"):
            hook.post_forward(self.vae, None)

    def decode(self, z: torch.Tensor, num_frames: int | None = None, return_dict: bool = True, **kwargs):
        from diffusers.models.autoencoders.vae import DecoderOutput

        codec = self._codec()
        try:
            with torch.inference_mode():
                if codec.video_latents:  # (B, C, t, h, w) -> (B, 3, T, H, W)
                    clips = [self._decode_clip(codec, z[b].transpose(0, 1)).transpose(0, 1).clamp(-1, 1)
                             for b in range(z.shape[0])]
                    out = torch.stack(clips)
                else:  # (B·T, C, h, w): groups of num_frames are clips
                    n = num_frames or z.shape[0]
                    out = torch.cat([self._decode_clip(codec, z[a:a + n]) for a in range(0, z.shape[0], n)])
        finally:
            self._done()
        out = out.to(z.dtype) if out.dtype != z.dtype else out
        return DecoderOutput(sample=out) if return_dict else (out,)

    def _decode_clip(self, codec, z: torch.Tensor) -> torch.Tensor:
        return decode_clip(codec, z, self.max_memory, self.attention, self.calls)

    def encode(self, x: torch.Tensor, return_dict: bool = True, **kwargs):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        codec = self._codec()
        try:
            with torch.inference_mode():
                if codec.video_latents:  # (B, 3, T, H, W) -> moments (B, 2C, t, h, w)
                    moments = torch.stack([self._encode_clip(codec, x[b].transpose(0, 1)).transpose(0, 1)
                                           for b in range(x.shape[0])])
                else:  # (N, 3, H, W) frames -> (N, 2C, h, w)
                    moments = self._encode_clip(codec, x)
        finally:
            self._done()
        dist = DiagonalGaussianDistribution(moments.to(x.dtype))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def _encode_clip(self, codec, x: torch.Tensor) -> torch.Tensor:
        return encode_clip(codec, x, self.max_memory, self.attention, self.calls)
