"""The activation memory of the SVD family's code, by running that code under counting execution.

There is no second description of the model or the executor here: each function calls the real entry point —
`VAE.decode` (one clip, 2D layers optionally in frame batches), `VAE.moments` (encode, whole frames or exact
tiles), `VAE.decode_stream` (the streaming executor) — on a model built on the meta device, with `Sym` inputs,
under `vaecli.ops.counting`, and reads the peak off the ledger. Streamed runs visit one representative piece per
loop (`Streamer(sample_tiles=True)`: the largest tile, and the first, second-to-last and last frame chunks) —
the executor's own statement of where its peak is, checked against full runs in `tests/test_memory_model.py`.
The meta-device trace (`vaecli.ops.memtrace`) stays the independent oracle there.

Layouts: latents (T, C, h, w) and frames (T, 3, H, W) channels-last, as the jobs hand them to the model.
"""

from __future__ import annotations

import torch

from vaecli.model.svd.streaming import Pieces
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.counting import Counting, Ledger, count
from vaecli.ops.scratch import CountedScratch

HOST = torch.device("cpu")


def _input(m: Counting, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    return m.new(shape, dtype, device, channels_last=True)


def decode_peak(vae: VAE, frames: int, h: int, w: int, *, dtype: torch.dtype, device: torch.device,
                attention: AttentionBackend, frame_batch: int | None = None) -> int:
    """Peak device bytes of `VAE.decode` of (frames, C, h, w) latents as one clip (input and result included)."""
    def run(m: Counting) -> None:
        z = _input(m, (frames, vae.config.latent_channels, h, w), dtype, device)
        out = vae.decode(z, frame_batch=frame_batch, attention=attention)
        del z, out

    return count(run, device).peak["device"]


def encode_peak(vae: VAE, frames: int, height: int, width: int, *, dtype: torch.dtype, device: torch.device,
                attention: AttentionBackend, pieces: Pieces | None = None) -> Ledger:
    """The ledger of `VAE.moments` of (frames, 3, height, width) frames (input and moments included); with
    `pieces`, the exact tiled encoder (the frames on the host when parked)."""
    def run(m: Counting) -> None:
        where = HOST if pieces is not None and pieces.park else device
        x = _input(m, (frames, vae.config.in_channels, height, width), dtype, where)
        out = vae.moments(x, pieces=pieces, sample_tiles=pieces is not None, attention=attention, device=device)
        del x, out

    return count(run, device)


def stream_peaks(vae: VAE, frames: int, h: int, w: int, pieces: Pieces, *, dtype: torch.dtype,
                 device: torch.device, attention: AttentionBackend) -> Ledger:
    """The ledger of a streamed decode (`VAE.decode_stream`) of (frames, C, h, w) latents: device peak overall
    and per phase ("2d", "temporal", "out": while frames are handed out), host peak (the parked clip), disk peak
    (the clip in scratch files)."""
    def run(m: Counting) -> None:
        z = _input(m, (frames, vae.config.latent_channels, h, w), dtype, HOST if pieces.park else device)
        scratch = CountedScratch(m.ledger) if pieces.disk else None
        for _ in vae.decode_stream(z, pieces, sample_tiles=True, phase=m.ledger.set_phase, attention=attention,
                                   device=device, scratch=scratch):
            m.ledger.set_phase("out")
        del z

    return count(run, device)
