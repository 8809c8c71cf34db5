"""Time modes, blend semantics, clip semantics and the posterior, checked against hand-written computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import frames, latents, random_vae, randomize_, tiny_config
from vaecli.errors import UsageError
from vaecli.model.svd.blocks import Clips, ResnetBlock
from vaecli.model.svd.decoder import Decoder
from vaecli.model.posterior import DiagonalGaussian
from vaecli.model.svd.temporal import AE3DConv, VideoBlock, VideoResBlock, frame_embedding
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend

MATH = AttentionBackend("math")


@pytest.mark.parametrize("mode", ["image", "conv-only", "all", "attn-only", "only-last-conv"])
def test_every_time_mode_builds_runs_and_keeps_shapes(mode):
    vae = random_vae(tiny_config(mode, attn_levels=(1,)), seed=11)
    x = frames(6, 16, 24)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (6, 4, 8, 12)
        for clip in (None, 3, 2, 1):
            y = vae.decode(z, clip)
            assert y.shape == (6, 3, 16, 24) and torch.isfinite(y).all()
        assert vae.decode(z, per_frame=True).shape == (6, 3, 16, 24)


def test_time_modes_build_the_documented_blocks():
    expected = {  # mid ResnetBlock, mid attention, conv_out
        "image": (ResnetBlock, "AttnBlock", torch.nn.Conv2d),
        "conv-only": (VideoResBlock, "AttnBlock", AE3DConv),
        "all": (VideoResBlock, "VideoBlock", AE3DConv),
        "attn-only": (ResnetBlock, "VideoBlock", torch.nn.Conv2d),
        "only-last-conv": (ResnetBlock, "AttnBlock", AE3DConv),
    }
    for mode, (res, attn, out) in expected.items():
        dec = Decoder(tiny_config(mode))
        assert type(dec.mid.block_1) is res, mode
        assert type(dec.mid.attn_1).__name__ == attn, mode
        assert type(dec.conv_out) is out, mode
        assert all(type(b) is res for level in dec.up for b in level.block), mode


def spatial_state(state):
    return {k: v for k, v in state.items()
            if not any(s in k for s in ("time_stack", "mix_factor", "time_mix", "video_time_embed"))}


def image_twin(vae):
    """The 2D image VAE with the spatial weights of `vae`."""
    twin = VAE(vae.config.replace(time_mode="image"), MATH).eval()
    twin.load_state_dict(spatial_state(vae.state_dict()), strict=True)
    return twin


@pytest.mark.parametrize("mode", ["conv-only", "all", "attn-only", "only-last-conv"])
def test_per_frame_mode_is_bit_identical_to_the_2d_decoder(mode):
    vae = random_vae(tiny_config(mode), seed=12)
    z = latents(5, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, per_frame=True), image_twin(vae).decode(z))


def test_one_frame_clips_are_not_the_image_decoder():
    vae = random_vae(tiny_config(), seed=12)
    z = latents(3, 8, 8)
    with torch.no_grad():
        assert (vae.decode(z, 1) - vae.decode(z, per_frame=True)).abs().max() > 1e-2


def test_clips_decode_independently_and_grouping_is_checked():
    vae = random_vae(tiny_config(), seed=13)
    z = latents(6, 8, 8)
    with torch.no_grad():
        grouped = vae.decode(z, num_frames=2)
        separate = torch.cat([vae.decode(z[i:i + 2]) for i in (0, 2, 4)])
    assert (grouped - separate).abs().max() <= 1e-5
    with pytest.raises(UsageError, match="do not split into clips of 4"):
        vae.decode(z, num_frames=4)


def test_only_last_conv_is_the_2d_decoder_then_a_temporal_conv():
    vae = random_vae(tiny_config("only-last-conv"), seed=14)
    z = latents(6, 8, 8)
    conv = vae.decoder.conv_out.time_mix_conv
    with torch.no_grad():
        out = vae.decode(z, num_frames=3)
        flat = image_twin(vae).decode(z)  # (6, 3, H, W)
        clips = flat.reshape(2, 3, *flat.shape[1:]).permute(0, 2, 1, 3, 4)  # (clip, c, t, h, w)
        by_hand = F.conv3d(clips, conv.weight, conv.bias, padding=(1, 0, 0)).permute(0, 2, 1, 3, 4).reshape(flat.shape)
    assert (out - by_hand).abs().max() <= 1e-5


def test_attn_only_with_alpha_one_is_the_image_decoder():
    vae = random_vae(tiny_config("attn-only"), seed=15)
    with torch.no_grad():
        vae.decoder.mid.attn_1.mix_factor.fill_(60.0)  # sigmoid = 1: the spatial branch only
        z = latents(4, 8, 8)
        assert (vae.decode(z) - image_twin(vae).decode(z)).abs().max() <= 1e-5


def group_norm_clip(x, norm):
    """GroupNorm over (C/groups, T, H, W) of one clip x: (C, T, H, W)."""
    return F.group_norm(x[None], 32, norm.weight, norm.bias, norm.eps)[0]


@pytest.mark.parametrize("strategy,mix", [("learned", 0.7), ("fixed", 0.3)])
def test_video_res_block_blends_temporal_with_alpha(strategy, mix):
    block = randomize_(VideoResBlock(32, 64, (3, 1, 1), strategy), seed=16).eval()
    with torch.no_grad():
        block.mix_factor.fill_(mix)
        x = torch.randn(6, 32, 4, 4)
        spatial = ResnetBlock.forward(block, x)
        alpha = mix if strategy == "fixed" else 1 / (1 + math.exp(-mix))
        ts = block.time_stack
        expected = torch.empty_like(spatial)
        for c in range(2):  # two clips of three frames
            xs = spatial[3 * c:3 * c + 3].permute(1, 0, 2, 3)  # (C, T, H, W)
            h = F.conv3d(F.silu(group_norm_clip(xs, ts.in_layers[0]))[None], ts.in_layers[2].weight,
                         ts.in_layers[2].bias, padding=(1, 0, 0))[0]
            h = F.conv3d(F.silu(group_norm_clip(h, ts.out_layers[0]))[None], ts.out_layers[3].weight,
                         ts.out_layers[3].bias, padding=(1, 0, 0))[0]
            temporal = xs + h
            expected[3 * c:3 * c + 3] = (alpha * temporal + (1 - alpha) * xs).permute(1, 0, 2, 3)
        assert (block(x, Clips(3)) - expected).abs().max() <= 1e-5
    names = dict(block.named_buffers()) if strategy == "fixed" else dict(block.named_parameters())
    assert "mix_factor" in names and "mix_factor" in block.state_dict()


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def feed_forward(x, ff):
    proj = linear(x, ff.net[0].proj)
    value, gate = proj[..., : proj.shape[-1] // 2], proj[..., proj.shape[-1] // 2:]
    return linear(value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))), ff.net[2])


def self_attention(x, attn):
    q, k, v = linear(x, attn.to_q), linear(x, attn.to_k), linear(x, attn.to_v)
    weights = torch.softmax(q @ k.T / math.sqrt(x.shape[-1]), dim=-1)
    return linear(weights @ v, attn.to_out[0])


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, 1e-5)


def video_block_by_hand(block, x, t):
    """sgm VideoBlock written out with loops over frames, clips and positions."""
    n, c, height, width = x.shape
    hn = F.group_norm(x, 32, block.norm.weight, block.norm.bias, 1e-6)
    conv1x1 = lambda layer, y: torch.einsum("oc,nchw->nohw", layer.weight[:, :, 0, 0], y) + layer.bias[:, None, None]  # noqa: E731
    q, k, v = conv1x1(block.q, hn), conv1x1(block.k, hn), conv1x1(block.v, hn)
    tokens = torch.empty(n, height * width, c)
    for i in range(n):  # spatial attention frame by frame
        qi, ki, vi = (a[i].reshape(c, -1).T for a in (q, k, v))
        tokens[i] = torch.softmax(qi @ ki.T / math.sqrt(c), dim=-1) @ vi
    half = c // 2
    freqs = torch.tensor([math.exp(-math.log(10000) * j / half) for j in range(half)])
    mixed = torch.empty_like(tokens)
    for i in range(n):
        frame = i % t
        emb = torch.cat([torch.cos(frame * freqs), torch.sin(frame * freqs)])  # cos first
        emb = linear(F.silu(linear(emb, block.video_time_embed[0])), block.video_time_embed[2])
        mixed[i] = tokens[i] + emb
    tb = block.time_mix_block
    out_mixed = torch.empty_like(mixed)
    for clip in range(n // t):
        for s in range(height * width):
            seq = mixed[clip * t:(clip + 1) * t, s]  # (t, C): one position through time
            seq = feed_forward(layer_norm(seq, tb.norm_in), tb.ff_in) + seq
            seq = self_attention(layer_norm(seq, tb.norm1), tb.attn1) + seq
            seq = self_attention(layer_norm(seq, tb.norm2), tb.attn2) + seq
            seq = feed_forward(layer_norm(seq, tb.norm3), tb.ff) + seq
            out_mixed[clip * t:(clip + 1) * t, s] = seq
    alpha = torch.sigmoid(block.mix_factor)
    h = alpha * tokens + (1 - alpha) * out_mixed  # alpha weights the spatial branch
    h = h.permute(0, 2, 1).reshape(n, c, height, width)
    return x + conv1x1(block.proj_out, h)


@pytest.mark.parametrize("mode", ["attn-only", "all"])
def test_video_block_matches_the_handwritten_sgm_semantics(mode):
    vae = random_vae(tiny_config(mode), seed=17)
    block = vae.decoder.mid.attn_1
    assert isinstance(block, VideoBlock)
    x = torch.randn(6, 64, 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (block(x, Clips(3, attention=MATH)) - video_block_by_hand(block, x, 3)).abs().max() <= 1e-5
        assert torch.equal(block(x, Clips(3, skip_video=True, attention=MATH)), block.proj_out(block.attend(x, MATH)) + x)


def test_frame_embedding_is_cos_first_like_diffusers_flip_sin_to_cos():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.arange(25)
    ours = frame_embedding(t, 64)
    assert torch.equal(ours, get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0))
    assert torch.equal(ours[0, :32], torch.ones(32)) and torch.equal(ours[0, 32:], torch.zeros(32))
    assert frame_embedding(t, 7).shape == (25, 7)


def test_learned_with_images_sends_flagged_frames_through_the_spatial_path():
    config = tiny_config("all", merge_strategy="learned_with_images")
    vae = random_vae(config, seed=18)
    flags = torch.tensor([True, False, False, True, False, False])
    x = torch.randn(6, 64, 2, 2)
    with torch.no_grad():
        res = vae.decoder.mid.block_1
        out = res(x, Clips(3, image_only=flags))
        spatial = ResnetBlock.forward(res, x)
        assert torch.equal(out[flags], spatial[flags])
        assert (out[~flags] - spatial[~flags]).abs().max() > 1e-3
        assert torch.allclose(out[~flags], res(x, Clips(3))[~flags], atol=1e-6)
        attn = vae.decoder.mid.attn_1
        out = attn(x, Clips(3, image_only=flags))
        assert torch.allclose(out[flags], attn(x, Clips(3, skip_video=True))[flags], atol=1e-6)
        assert vae.decode(latents(6, 4, 4), 3, image_only=flags).shape == (6, 3, 8, 8)
    with pytest.raises(UsageError, match="image_only"):
        vae.decode(latents(6, 4, 4), 3, image_only=flags[:4])


def test_posterior_mode_sample_and_clamp():
    vae = random_vae(tiny_config(), seed=19)
    x = frames(2, 16, 16)
    with torch.no_grad():
        post = vae.encode_moments(x)
        assert torch.equal(vae.encode(x), post.mean)
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, post.mean + torch.exp(0.5 * post.logvar) * noise, atol=1e-6)
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1))
    assert clamped.logvar.max() == 20.0
    assert DiagonalGaussian(torch.full((1, 8, 1, 1), -100.0)).logvar.min() == -30.0


def test_encode_and_decode_check_their_inputs():
    vae = random_vae(tiny_config(), seed=20)
    with pytest.raises(UsageError, match=r"frames must be \(T, 3, H, W\)"):
        vae.encode(torch.zeros(2, 4, 16, 16))
    with pytest.raises(UsageError, match="multiples of 2"):
        vae.encode(torch.zeros(2, 3, 15, 16))
    with pytest.raises(UsageError, match=r"latents must be \(T, 4, H, W\)"):
        vae.decode(torch.zeros(2, 8, 4, 4))
