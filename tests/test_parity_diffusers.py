"""vaecli against diffusers built with the same random weights (every parameter randomised)."""

import json

import warnings

import pytest
import torch
from safetensors.torch import save_file

from helpers import diffusers_model, frames, latents, random_vae, tiny_config
from vaecli.model.svd import keymap
from vaecli.model.checkpoint import load_vae

TOL = 1e-4

TEMPORAL_CONFIGS = [
    tiny_config(),
    tiny_config(ch_mult=(1, 2, 2), z_channels=4),
    tiny_config(ch=64, ch_mult=(1, 1), z_channels=8, embed_dim=8),
]


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("config", TEMPORAL_CONFIGS, ids=lambda c: f"{c.ch}x{c.ch_mult}z{c.z_channels}")
def test_temporal_vae_matches_diffusers(config):
    vae = random_vae(config, seed=3)
    ref = diffusers_model(config, vae.state_dict())
    x = frames(6, 32, 48)
    with torch.no_grad():
        ours, theirs = vae.encode_moments(x), ref.encode(x).latent_dist
        assert max_diff(ours.mean, theirs.mean) <= TOL
        assert max_diff(ours.logvar, theirs.logvar) <= TOL
        assert ours.mean.abs().max() > 0.1  # not a degenerate all-zero comparison
        z = latents(6, 6, 8, c=config.latent_channels)
        for clip in (6, 3, 2, 1):
            out = vae.decode(z, num_frames=clip)
            assert out.shape == (6, 3, 6 * config.downscale, 8 * config.downscale)
            assert max_diff(out, ref.decode(z, num_frames=clip).sample) <= TOL


def test_clip_grouping_matters_and_clips_are_independent():
    vae = random_vae(tiny_config(), seed=4)
    z = latents(6, 4, 4)
    with torch.no_grad():
        one_clip = vae.decode(z)
        two_clips = vae.decode(z, num_frames=3)
        first_alone = vae.decode(z[:3])
    assert max_diff(one_clip, two_clips) > 1e-2
    assert max_diff(two_clips[:3], first_alone) <= 1e-5


def _write(state, path, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def temporal_files(tmp_path_factory):
    """One random tiny SVD VAE written in every layout, and diffusers' model with those weights."""
    config = tiny_config()
    vae = random_vae(config, seed=5)
    state = vae.state_dict()
    root = tmp_path_factory.mktemp("layouts")
    full = {f"first_stage_model.{k}": v for k, v in state.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 8, 3, 3)
    full["conditioner.embedders.3.encoder.encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    ref = diffusers_model(config, state)
    folder = root / "diffusers_folder" / "vae"
    folder.mkdir(parents=True)
    _write(ref.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"scaling_factor": 0.18215}))
    diff_state = keymap.to_diffusers(state, temporal=True)  # diffusers names, but no quant_conv
    files = {
        "sgm": _write(state, root / "sgm.safetensors"),
        "full-checkpoint": _write(full, root / "svd_full.safetensors"),
        "diffusers-file": _write(ref.state_dict(), root / "diffusers.safetensors"),
        "diffusers-folder": root / "diffusers_folder",
        "diffusers-no-quant": _write(diff_state, root / "diffusers_no_quant.safetensors"),
        "sgm-fp16": _write({k: v.half() for k, v in state.items()}, root / "sgm_fp16.safetensors"),
    }
    return config, ref, files


@pytest.mark.parametrize("layout", ["sgm", "full-checkpoint", "diffusers-file", "diffusers-folder",
                                    "diffusers-no-quant"])
def test_every_temporal_layout_loads_and_matches_diffusers(temporal_files, layout):
    config, ref, files = temporal_files
    vae = load_vae(files[layout], attention="math")
    assert vae.config.time_mode == "conv-only" and vae.config.latent_channels == 4
    x, z = frames(4, 32, 32), latents(4, 8, 8)
    with torch.no_grad():
        assert max_diff(vae.encode(x), ref.encode(x).latent_dist.mode()) <= TOL
        assert max_diff(vae.decode(z, 2), ref.decode(z, num_frames=2).sample) <= TOL
        assert max_diff(vae.decode(z), ref.decode(z, num_frames=4).sample) <= TOL


def test_half_precision_file_loads_into_requested_dtype(temporal_files):
    config, ref, files = temporal_files
    from_half = load_vae(files["sgm-fp16"], dtype="fp32", attention="math")
    exact = load_vae(files["sgm"], attention="math")
    for (name, a), b in zip(from_half.state_dict().items(), exact.state_dict().values()):
        assert a.dtype == torch.float32, name
        assert torch.equal(a, b.half().float()), name
    with warnings.catch_warnings():  # "bf16 ... emulated" on CPUs without native bf16: expected here
        warnings.simplefilter("ignore", UserWarning)
        bf16 = load_vae(files["sgm"], dtype=torch.bfloat16, attention="sdpa")
    assert all(t.dtype == torch.bfloat16 for t in bf16.state_dict().values())
    z = latents(4, 8, 8)
    with torch.no_grad():
        low = bf16.decode(z.bfloat16()).float()
        high = exact.decode(z)
    assert torch.isfinite(low).all()
    assert max_diff(low, high) < 0.25 and (low - high).abs().mean() < 0.03


@pytest.mark.parametrize("layout", ["ldm", "ldm-full", "diffusers"])
def test_image_vae_matches_diffusers_autoencoderkl(tmp_path, layout):
    config = tiny_config("image", quant_conv=True, post_quant_conv=True)
    vae = random_vae(config, seed=6)
    ref = diffusers_model(config, vae.state_dict())
    if layout == "ldm":
        path = _write(vae.state_dict(), tmp_path / "vae.safetensors")
    elif layout == "ldm-full":
        path = _write({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}, tmp_path / "sd.safetensors")
    else:
        path = _write(ref.state_dict(), tmp_path / "vae.safetensors")
    loaded = load_vae(path, attention="math")
    assert loaded.config.time_mode == "image" and loaded.config.quant_conv and loaded.config.post_quant_conv
    x, z = frames(3, 32, 32), latents(3, 8, 8)
    with torch.no_grad():
        assert max_diff(loaded.encode(x), ref.encode(x).latent_dist.mode()) <= TOL
        # an image VAE decodes frame by frame whatever num_frames says
        assert max_diff(loaded.decode(z, num_frames=3), ref.decode(z).sample) <= TOL
