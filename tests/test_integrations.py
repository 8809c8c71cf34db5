"""vaecli inside diffusers: `use_vaecli` on diffusers' own VAE modules (random weights) gives their frames and
moments, on their weights, under any memory budget, and `undo()` restores them."""

import re

import pytest
import torch

from helpers import diffusers_model, latents, random_vae, tiny_config
from vaecli.errors import OutOfMemory, VaecliError
from vaecli.integrations.diffusers import use_vaecli

BOUND = 1e-4  # fp32


@pytest.fixture(scope="module")
def svd():
    cfg = tiny_config("conv-only", ch_mult=(1, 2))
    return diffusers_model(cfg, random_vae(cfg, seed=3).state_dict())


def wan(name: str):
    from test_wan import CONFIGS, pair

    return CONFIGS[name], pair(CONFIGS[name], seed=2)[1]


def smallest_ceiling(module, stage: str, shape) -> int:
    """The --max-memory figure a refusal names for this work: the smallest plan's (streamed, for a decode)."""
    with use_vaecli(module, max_memory=1 << 20) as handle, torch.no_grad():
        with pytest.raises(OutOfMemory) as refused:
            (module.decode if stage == "decode" else module.encode)(torch.zeros(shape))
    assert handle.calls == []
    return int(re.search(r"needs about (\d+) MiB", str(refused.value)).group(1)) << 20


def test_svd_decode_and_encode_equal_diffusers_and_undo_restores(svd):
    z, x = latents(6, 8, 8), torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = {n: svd.decode(z, num_frames=n).sample for n in (6, 3)}
        moments = svd.encode(x).latent_dist
    handle = use_vaecli(svd)
    assert "decode" in svd.__dict__ and "encode" in svd.__dict__
    with torch.no_grad():
        for n in (6, 3):  # clips of num_frames frames, as diffusers groups them
            got = svd.decode(z, num_frames=n)
            assert type(got).__name__ == "DecoderOutput" and got.sample.shape == want[n].shape
            assert (got.sample - want[n]).abs().max().item() <= BOUND, n
        (tup,) = svd.decode(z, num_frames=6, return_dict=False)
        assert torch.equal(tup, svd.decode(z, num_frames=6).sample)
        out = svd.encode(x)
    assert type(out).__name__ == "AutoencoderKLOutput"
    assert (out.latent_dist.mean - moments.mean).abs().max().item() <= BOUND
    assert (out.latent_dist.logvar - moments.logvar).abs().max().item() <= BOUND
    assert [stage for stage, _ in handle.calls] == ["decode", "decode", "decode", "decode", "decode", "encode"]
    assert all(plan.exact for _, plan in handle.calls)
    handle.undo()
    assert "decode" not in svd.__dict__ and "encode" not in svd.__dict__
    with torch.no_grad():
        assert torch.equal(svd.decode(z, num_frames=6).sample, want[6])


def test_a_tight_budget_streams_the_same_frames(svd):
    z = latents(6, 32, 32)  # 256x256 frames: one clip holds far more than a streamed piece
    with torch.no_grad():
        want = svd.decode(z, num_frames=6).sample
    ceiling = smallest_ceiling(svd, "decode", z.shape)
    with use_vaecli(svd, max_memory=ceiling) as handle, torch.no_grad():
        got = svd.decode(z, num_frames=6).sample
    (stage, plan), = handle.calls
    assert plan.strategy == "stream" and plan.exact and plan.fits and plan.predicted_peak_bytes <= ceiling
    assert (got - want).abs().max().item() <= BOUND


@pytest.mark.parametrize("name", ["tiny", "tiny22"])
def test_wan_decode_and_encode_equal_diffusers(name):
    config, module = wan(name)
    f = 16 if config.patch_size == 2 else 8
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 9, 32, 32), generator=g) * 2 - 1
    z = torch.randn((2, config.z_dim, 3, 32 // f, 32 // f), generator=g)
    with torch.no_grad():
        want, moments = module.decode(z).sample, module.encode(x).latent_dist.parameters
    with use_vaecli(module) as handle, torch.no_grad():
        got = module.decode(z)
        got_moments = module.encode(x).latent_dist.parameters
    assert got.sample.shape == want.shape == (2, 3, 9, 32, 32)
    assert (got.sample - want).abs().max().item() <= BOUND
    assert (got_moments - moments).abs().max().item() <= BOUND
    assert [s for s, _ in handle.calls] == ["decode", "decode", "encode", "encode"]  # one clip per batch item
    assert "decode" not in module.__dict__


def test_a_pipeline_is_wrapped_through_its_vae_and_offload_hooks_run(svd):
    """A stand-in for a pipeline with model CPU offload: `.vae` is wrapped, and the module's accelerate hook
    (pre_forward / post_forward, as diffusers' `apply_forward_hook` calls them) runs around each call."""
    events = []

    class Hook:
        def pre_forward(self, module, *args):
            events.append("pre")

        def post_forward(self, module, output):
            events.append("post")

    class Pipeline:
        vae = svd

    svd._hf_hook = Hook()
    try:
        with use_vaecli(Pipeline()), torch.no_grad():
            Pipeline.vae.decode(latents(2, 8, 8), num_frames=2)
    finally:
        del svd._hf_hook
    assert events == ["pre", "post"]


def test_what_vaecli_cannot_run_is_refused_up_front():
    with pytest.raises(VaecliError):
        use_vaecli(torch.nn.Linear(2, 2))

    class NotAVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def decode(self, z):
            return z

    with pytest.raises(VaecliError, match="no VAE found"):
        use_vaecli(NotAVAE())


def test_an_image_vae_decodes_and_encodes_as_diffusers():
    cfg = tiny_config("image", ch_mult=(1, 2))
    module = diffusers_model(cfg, random_vae(cfg, seed=4).state_dict())
    assert type(module).__name__ == "AutoencoderKL"
    z, x = latents(3, 8, 8), torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want, mean = module.decode(z).sample, module.encode(x).latent_dist.mean
    with use_vaecli(module), torch.no_grad():
        got, got_mean = module.decode(z).sample, module.encode(x).latent_dist.mean
    assert (got - want).abs().max().item() <= BOUND and (got_mean - mean).abs().max().item() <= BOUND
