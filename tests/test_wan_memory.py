"""The Wan family's prices are its own code counted (`vaecli.model.wan.memory`): sampled steps, batches and
tiles against the meta-device trace of the full run (the independent oracle), for Wan 2.1 and 2.2."""

from __future__ import annotations

import pytest
import torch

from vaecli.model.wan import memory as wan_memory
from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.family import Chunks, WanCodec, build_vae
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.memtrace import traced_peak_bytes

SDPA = AttentionBackend("sdpa")
CONFIGS = {"2.1": WanConfig(dim=8, name="m21"),
           "2.2": WanConfig(dim=8, decoder_dim=16, z_dim=8, in_channels=12, out_channels=12, residual=True,
                            patch_size=2, latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8, name="m22")}


def codecs(version: str, dtype: torch.dtype = torch.float32) -> tuple[WanCodec, WanCodec]:
    """(a codec that prices for the CPU, the same modules as a codec on the meta device to trace with)."""
    vae = build_vae(CONFIGS[version], None, "cpu", dtype)
    return WanCodec(vae, "m", "", torch.device("cpu")), WanCodec(vae, "m", "", torch.device("meta"))


def traced_decode(codec: WanCodec, frames: int, hw: tuple[int, int], pieces: Chunks) -> int:
    """Every step of the runner's decode, on the meta device."""
    plan = wan_memory._plan(codec, "decode", SDPA, pieces.latent, pieces)

    def run() -> None:
        clip: dict = {}
        for a, b in codec.decode_steps(plan, frames):
            z = torch.empty((b - a, codec.latent_channels, *hw), device="meta")
            for out in codec.decode(z, plan, clip=clip):
                del out
            del z
    return traced_peak_bytes(run)


def traced_encode(codec: WanCodec, frames: int, hw: tuple[int, int], batch: int) -> int:
    plan = wan_memory._plan(codec, "encode", SDPA, batch)

    def run() -> None:
        clip: dict = {}
        sizes = [batch + 1] + [batch] * ((frames - batch - 1) // batch)
        for n in sizes:
            x = torch.empty((n, codec.in_channels, *hw), device="meta")
            out = codec.moments(x, plan, clip=clip)
            del x, out
    return traced_peak_bytes(run)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_counted_decode_prices_equal_the_traced_full_run(version):
    """Whole frames (3 of 12 steps visited; 2 of 6 latent frames per call), 8-px tiles step by step (3 of 4 steps;
    of the 9 tiles only those of each region shape that hold the peak), and tile-major tiles (3 of 4 calls of the stem
    and of one tile of each region shape): within 0.5 % of the trace of every step and tile."""
    pricer, tracer = codecs(version)
    halo = pricer.vae.decoder.halo()
    cuts = [(12, (40, 48), Chunks(1)), (12, (40, 48), Chunks(2)), (7, (40, 48), Chunks(3)),
            (4, (24, 24), Chunks(1, 8, halo)), (7, (15, 24), Chunks(2, 8, halo, True))]
    for frames, hw, pieces in cuts:
        counted = wan_memory.decode_peak(pricer, frames, hw, pieces, SDPA)
        traced = traced_decode(tracer, frames, hw, pieces)
        assert abs(counted - traced) <= 0.005 * traced, (frames, pieces, counted, traced)
    # the price of more frames grows by their raw latents only (the clip keeps them for a redo), not by frames
    short, long = (wan_memory.decode_peak(pricer, n, (40, 48), Chunks(1), SDPA) for n in (12, 48))
    assert long - short == 36 * pricer.latent_channels * 40 * 48 * 4


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_counted_encode_prices_equal_the_traced_full_run(version):
    """3 of 7 batches visited (29 frames, 4 per call after the first 5), and short clips whole."""
    pricer, tracer = codecs(version)
    hw = (64, 96)
    for frames, batch in ((29, 4), (13, 4), (9, 8), (5, 4)):
        counted = wan_memory.encode_peak(pricer, frames, hw, batch, SDPA)
        assert counted == traced_encode(tracer, frames, hw, batch), (frames, batch)


def test_plans_carry_the_counted_prices_and_prefer_fewer_frames_per_call_under_a_tight_budget():
    """A GPU-like planner (no CPU frame cap) picks the most latent frames per call whose counted price fits."""
    from vaecli.model.plan import Budget

    pricer, _ = codecs("2.1")
    cpu = torch.device("cpu")
    prices = {c: pricer._decode_price(9, (40, 48), Chunks(c), SDPA) for c in range(1, 10)}
    assert prices[1] < min(prices[c] for c in range(2, 10)) and prices[9] == max(prices.values())
    plan = pricer.plan_decode(9, (40, 48), Budget(cpu, prices[1] + 1), attention="sdpa")
    assert plan.pieces.latent == 1 and plan.activation_bytes == prices[1] and plan.fits
    enc = pricer.plan_encode(13, (64, 96), Budget(cpu, 1 << 40), attention="sdpa")
    assert enc.activation_bytes == pricer._encode_price(13, (64, 96), enc.chunk_frames, SDPA)
