"""The activation memory of the Wan family's code, by running that code under counting execution
(`vaecli.ops.counting`), as `vaecli.model.svd.memory` does for SVD: there is no second description of the
model here. Each function calls the codec's own entry point — `WanCodec.decode` step by step with the clip's
causal cache carried, `WanCodec.moments` batch by batch — on `Sym` inputs, and reads the peak off the ledger.

Decodes visit the first `STEPS` steps: the first starts the causal caches, the second replaces the first's, and
from the third on every step allocates and frees the same (the caches are two frames per convolution whatever
the step). What the steps not visited add is the raw latents each step leaves in the clip for a redo in a wider
dtype (`WanCodec.decode`'s history), one step's latents per step, added here. Tiled decodes run the tiles of
each region shape that hold the peak (`decode_tiled(sample=True)`). Encodes visit the first `STEPS` batches.
`tests/test_wan_memory.py` checks both samplings against full runs and the meta-device trace.

Layouts: latents (T, C, h, w) and frames (T, 3, H, W), as the runner hands them to the codec.
"""

from __future__ import annotations

import torch

from vaecli.model.plan import Plan
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.counting import Counting, count
from vaecli.ops.device import dtype_name

STEPS = 3


def _plan(codec, stage: str, attention: AttentionBackend, chunk: int, pieces=None) -> Plan:
    """The smallest plan the codec's entry points read (the backend and the cut)."""
    return Plan(stage, str(codec.device), dtype_name(codec.dtype), attention, "stream" if pieces else "batches",
                chunk, 0, 0, 0, 0, pieces=pieces)


def decode_peak(codec, frames: int, latent_hw: tuple[int, int], pieces, attention: AttentionBackend) -> int:
    """Peak device bytes of decoding `frames` latent frames of `latent_hw` as the runner does: a step's raw
    latents (fp32, read from the file) in, its frames out and dropped, `pieces` (a `Chunks`) per step."""
    plan = _plan(codec, "decode", attention, pieces.latent, pieces)
    steps = codec.decode_steps(plan, frames)
    shape = (codec.latent_channels, *latent_hw)

    def run(m: Counting) -> None:
        clip: dict = {}
        for a, b in steps[:STEPS]:
            z = m.new((b - a, *shape), torch.float32, codec.device)
            for out in codec.decode(z, plan, clip=clip, sample=True):
                del out
            del z

    peak = count(run, codec.device).peak["device"]
    later = sum(b - a for a, b in steps[STEPS:])  # latent frames whose raw latents the clip keeps as well
    return peak + later * shape[0] * shape[1] * shape[2] * torch.float32.itemsize


def encode_peak(codec, frames: int, size_hw: tuple[int, int], batch: int, attention: AttentionBackend) -> int:
    """Peak device bytes of encoding `frames` frames of `size_hw` pixels as the runner does: the first 1 + batch
    frames, then `batch` at a time (fp32 frames in, moments out and dropped), the causal cache carried."""
    plan = _plan(codec, "encode", attention, batch)
    sizes = [min(frames, batch + 1)]
    while len(sizes) < STEPS and sum(sizes) < frames:
        sizes.append(min(batch, frames - sum(sizes)))

    def run(m: Counting) -> None:
        clip: dict = {}
        for n in sizes:
            x = m.new((n, codec.in_channels, *size_hw), torch.float32, codec.device)
            out = codec.moments(x, plan, clip=clip)
            del x, out

    return count(run, codec.device).peak["device"]
