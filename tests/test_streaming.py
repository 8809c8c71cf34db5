"""The exact streaming executor: every cut of a clip gives the one-clip decode (and whole-frame encode)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import latents, random_vae, tiny_config
from vaecli.cli import app
from vaecli.model.svd.store import FrameStore, Moments
from vaecli.ops.tiles import spans
from vaecli.model.svd.streaming import Pieces
from vaecli.model.svd.vae import VAE

BOUND = 1e-4  # fp32 max abs difference to the one-clip decode (measured ≤ 1e-5)

CONFIGS = {
    # 3 levels, SVD's conv-only mode
    "conv-only-3": tiny_config("conv-only", ch_mult=(1, 2, 2)),
    # 4 levels, temporal attention at a level (time mode "all") and in the mid block
    "all-4": tiny_config("all", ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_levels=(1,)),
    "attn-only-3": tiny_config("attn-only", ch_mult=(1, 2, 2)),
    "only-last-conv-2": tiny_config("only-last-conv"),
    # mixed widths (32, 96, 64) and a 5-tap temporal kernel
    "wide-k5": tiny_config("conv-only", ch_mult=(1, 3, 2), video_kernel_size=(5, 1, 1), num_res_blocks=1),
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def models():
    # randomize_weights_ draws mix_factor ~ N(0, 2): strongly temporal blends; norms, biases and all else random
    return {name: random_vae(cfg, seed=11) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_frame_chunk_equals_one_clip(models, name):
    vae = models[name]
    z = latents(6, 7, 9)  # odd latent sizes
    with torch.no_grad():
        ref = vae.decode(z)
        for chunk in range(1, 6):
            for pieces in (Pieces(chunk), Pieces(chunk, time_frames=chunk), Pieces(6, time_frames=chunk)):
                assert max_diff(vae.decode(z, pieces=pieces), ref) <= BOUND, pieces


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiles_chunks_and_parking_equal_one_clip(models, name):
    vae = models[name]
    z = latents(5, 13, 10, seed=5)  # odd rows; tiles of 3..16 latent px cut it into 1 to 5 × 4 pieces
    with torch.no_grad():
        ref = vae.decode(z)
        cuts = [Pieces(5, tile=8, time_tile=8), Pieces(1, tile=8, time_tile=8), Pieces(2, tile=5, time_frames=2,
                time_tile=3), Pieces(3, tile=16, time_frames=4, time_tile=9, park=True), Pieces(1, park=True),
                Pieces(2, tile=3, time_frames=1, time_tile=4, park=True), Pieces(1, tile=5, keep=True),
                Pieces(2, tile=4, time_tile=8, park=True, keep=True), Pieces(2, time_frames=3, time_tile=3, band=True)]
        for pieces in cuts:
            assert max_diff(vae.decode(z, pieces=pieces), ref) <= BOUND, pieces


def test_clips_flags_and_per_frame_mode_stream_exactly():
    config = tiny_config("all", merge_strategy="learned_with_images")
    vae = random_vae(config, seed=4)
    z = latents(6, 8, 10)
    flags = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    pieces = Pieces(2, tile=4, time_frames=2, time_tile=5)
    with torch.no_grad():
        assert max_diff(vae.decode(z, image_only=flags, pieces=pieces), vae.decode(z, image_only=flags)) <= BOUND
        assert max_diff(vae.decode(z, num_frames=3, pieces=pieces), vae.decode(z, num_frames=3)) <= BOUND
        assert max_diff(vae.decode(z, per_frame=True, pieces=pieces), vae.decode(z, per_frame=True)) <= BOUND
        # a one-frame clip (no temporal neighbours) and an image VAE with quant convs
        assert max_diff(vae.decode(z[:1], pieces=pieces), vae.decode(z[:1])) <= BOUND
    image = random_vae(tiny_config("image", quant_conv=True, post_quant_conv=True), seed=6)
    with torch.no_grad():
        assert max_diff(image.decode(z, pieces=pieces), image.decode(z)) <= BOUND


@pytest.mark.parametrize("name", ["conv-only-3", "all-4", "wide-k5"])
def test_encoder_tiles_equal_whole_frames(models, name):
    vae = models[name]
    f = vae.config.downscale
    x = torch.rand(2, 3, 9 * f, 7 * f, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = vae.moments(x)
        for pieces in (Pieces(1, tile=1), Pieces(2, tile=2), Pieces(1, tile=4, park=True), Pieces(2, tile=8)):
            assert max_diff(vae.moments(x, pieces=pieces), ref) <= BOUND, pieces
    quant = random_vae(tiny_config("image", quant_conv=True, post_quant_conv=True), seed=8)
    x = x[:, :, :32, :24]
    with torch.no_grad():
        assert max_diff(quant.moments(x, pieces=Pieces(1, tile=3)), quant.moments(x)) <= BOUND


def test_statistics_are_exact_not_a_mean_of_piece_variances():
    """Pieces with very different means: the merged variance is the clip's, about the global mean."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, 5, 7, generator=gen) + torch.arange(6.0)[:, None, None, None] * 10
    x = x.contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-5)
    clip = Moments(32, per_frame=False)
    for a, b in spans(6, 2):
        for rows in (slice(0, 2), slice(2, 5)):
            clip.add(x[a:b, :, rows])
    scale, shift = clip.affine(norm)
    expected = torch.nn.functional.group_norm(x.double().permute(1, 0, 2, 3)[None].flatten(2)[..., None], 32,
                                              norm.weight.double(), norm.bias.double(), 1e-5)[0, :, :, 0]
    ours = (x * scale + shift).double().permute(1, 0, 2, 3).flatten(1)
    assert max_diff(ours, expected) <= 1e-5
    frames = Moments(32, per_frame=True)
    for cols in (slice(0, 3), slice(3, 7)):
        frames.add(x[:, :, :, cols])
    scale, shift = frames.affine(norm)
    exact = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-5)
    assert max_diff((x * scale + shift).double(), exact) <= 1e-5  # fp64 reference (torch's fp32 norm is off by 1e-3 here)


def test_store_reads_views_and_regions():
    store = FrameStore(4, torch.device("cpu"))
    block = torch.randn(4, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    store.put(0, block)
    whole = store.read(1, 3)
    assert whole.data_ptr() == block[1:3].data_ptr()  # frames written together read back as a view
    part = store.read(0, 4, slice(1, 4), slice(2, 5))
    assert torch.equal(part, block[:, :, 1:4, 2:5]) and store.holds(part, 0)  # regions are views too
    apart = FrameStore(2, torch.device("cpu"))
    apart.put(0, block[:1].clone())
    apart.put(1, block[1:2].clone())
    copied = apart.read(0, 2, slice(1, 4), slice(2, 5))  # frames in two tensors: one contiguous copy
    assert torch.equal(copied, block[:2, :, 1:4, 2:5]) and copied.is_contiguous(memory_format=torch.channels_last)
    assert not apart.holds(copied, 0)
    parked = FrameStore(4, torch.device("cpu"), park=True)
    parked.put(0, block)
    assert torch.equal(parked.read(0, 4), block) and parked.read(0, 4).data_ptr() != block.data_ptr()


def test_cli_streams_exactly_and_says_so(tmp_path):
    vae = random_vae(CONFIGS["conv-only-3"], seed=11)
    model = tmp_path / "m.safetensors"
    save_file(vae.state_dict(), str(model))
    z = latents(6, 8, 8) * vae.config.scaling_factor
    save_file({"latents": z.contiguous()}, str(tmp_path / "l.safetensors"))
    runner = CliRunner()
    outs = {}
    # on CPU a --max-memory ceiling that nothing fits is refused before any work
    tight = runner.invoke(app, ["decode", str(tmp_path / "l.safetensors"), "-m", str(model), "--fps", "8",
                                "-o", f"{tmp_path}/tight/", "--max-memory", "1MiB"])
    assert tight.exit_code == 1 and "--max-memory 1.00 MiB is too small" in tight.stderr
    assert not (tmp_path / "tight").exists()
    for name, extra in (("one", ["--chunk", "0"]), ("tiles", ["--tile", "4"])):
        result = runner.invoke(app, ["decode", str(tmp_path / "l.safetensors"), "-m", str(model), "--fps", "8",
                                     "-o", f"{tmp_path}/{name}/", "--json", *extra])
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        outs[name] = data
    assert outs["one"]["plan"]["strategy"] == "one-clip" and outs["one"]["plan"]["exact"]
    assert outs["tiles"]["plan"]["strategy"] == "stream" and outs["tiles"]["plan"]["pieces"]["tile_latent"] == 4
    import imageio.v3 as iio

    frames = {k: np.stack([iio.imread(p).astype(int) for p in sorted((tmp_path / k).iterdir())]) for k in outs}
    assert frames["one"].shape == (6, 32, 32, 3)
    assert np.abs(frames["tiles"] - frames["one"]).max() <= 1  # the same frames (a level of rounding at most)
    plan = runner.invoke(app, ["plan", str(tmp_path / "l.safetensors"), "-m", str(model), "--tile", "4"])
    assert plan.exit_code == 0 and "decode: stream (exact)" in plan.stdout and "pieces:" in plan.stdout


def test_oom_while_streaming_recovers_with_smaller_pieces(tmp_path, monkeypatch):
    vae = random_vae(CONFIGS["conv-only-3"], seed=11)
    model = tmp_path / "m.safetensors"
    save_file(vae.state_dict(), str(model))
    save_file({"latents": latents(6, 8, 8).contiguous()}, str(tmp_path / "l.safetensors"))
    real_stream = VAE.decode_stream

    def one_clip_fails(self, z, *a, **kw):
        if isinstance(z, torch.Tensor) and kw.get("pieces") is None:  # not the planner's counting runs
            raise torch.OutOfMemoryError("CUDA out of memory (injected, one clip)")
        return real_decode(self, z, *a, **kw)

    streamed = []

    def first_stream_fails(self, z, pieces, *a, **kw):
        if isinstance(z, torch.Tensor):
            streamed.append(pieces)
            if len(streamed) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected, streamed)")
        return real_stream(self, z, pieces, *a, **kw)

    real_decode = VAE.decode
    monkeypatch.setattr(VAE, "decode", one_clip_fails)
    monkeypatch.setattr(VAE, "decode_stream", first_stream_fails)
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "l.safetensors"), "-m", str(model), "--fps", "8",
                                      "-o", f"{tmp_path}/out/", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    strategies = [r["plan"]["strategy"] for r in data["oom_retries"]]
    assert strategies == ["one-clip", "stream"] and "injected, streamed" in data["oom_retries"][1]["error"]
    assert data["plan"]["strategy"] == "stream" and data["plan"]["exact"]
    assert data["plan"]["activation_bytes"] <= data["oom_retries"][1]["plan"]["activation_bytes"]
    assert len(list((tmp_path / "out").iterdir())) == 6
