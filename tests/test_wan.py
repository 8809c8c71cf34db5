"""The Wan 2.1 and 2.2 5B VAEs against diffusers' `AutoencoderKLWan` with every parameter randomised (γ included),
fp32: posterior moments and decoded frames within 1e-4, for the tiny oracle configs and ones with the released
block structures at a narrow width; chunked encodes and decodes equal the one-call results."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.keymap import original_to_diffusers
from vaecli.model.wan.modules import WanVAE

from helpers import randomise

CONFIGS = {
    # the tiny oracle of ../shared/reference/video-vaes.md
    "tiny": WanConfig(dim=3, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1, name="tiny"),
    # the released 2.1 structure (widths ×1,2,4,4; two blocks per level), narrow
    "narrow": WanConfig(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, name="narrow"),
    # Wan 2.2 5B: the tiny oracle, and the released structure (decoder wider than the encoder) narrow
    "tiny22": WanConfig(dim=3, z_dim=48, dim_mult=(1, 1, 1, 1), num_res_blocks=1, in_channels=12, out_channels=12,
                        residual=True, patch_size=2, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48,
                        name="tiny22"),
    "narrow22": WanConfig(dim=4, decoder_dim=6, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=12,
                          out_channels=12, residual=True, patch_size=2, latents_mean=(0.0,) * 48,
                          latents_std=(1.0,) * 48, name="narrow22"),
}


def pair(config: WanConfig, seed: int = 0):
    """(vaecli's WanVAE, diffusers' AutoencoderKLWan) with the same random weights."""

    from vaecli.model.wan.layout import diffusers_config

    ours = WanVAE(config).eval()
    randomise(ours, seed)
    kwargs = {k: v for k, v in diffusers_config(config).items() if k != "_class_name"}
    theirs = AutoencoderKLWan(**kwargs).eval()
    mapping = original_to_diffusers(ours.state_dict().keys(), config)
    theirs.load_state_dict({mapping[k]: v for k, v in ours.state_dict().items()}, strict=True)
    return ours, theirs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    return request.param, *pair(CONFIGS[request.param], seed=len(request.param))


def clip(frames: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((1, 3, frames, size, size), generator=g) * 2 - 1)


def test_encode_and_decode_match_diffusers(models):
    name, ours, theirs = models
    z_dim, f = ours.config.z_dim, ours.config.spatial_factor
    x = clip(9, 32)
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        moments = ours.moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        assert mean.shape == (1, z_dim, 3, 32 // f, 32 // f)
        assert torch.allclose(mean, dist.mean, atol=1e-4), (mean - dist.mean).abs().max()
        assert torch.allclose(logvar.clamp(-30, 20), dist.logvar, atol=1e-4)
        z = torch.randn(1, z_dim, 4, 32 // f, 32 // f, generator=torch.Generator().manual_seed(2))
        frames = ours.decode(z)
        reference = theirs.decode(z).sample
    assert frames.shape == reference.shape == (1, 3, 13, 32, 32)
    assert 0.05 < frames.std() and frames.abs().max() <= 1  # not saturated: the comparison can fail
    assert torch.allclose(frames, reference, atol=1e-4), (frames - reference).abs().max()


def test_every_chunking_equals_one_call(models, monkeypatch):
    """Encode: first chunks of 1 + 4k frames, then multiples of 4; decode: every chunk size 1..T-1; each with the
    largest frames whole and one at a time (`frame_by_frame`, forced at this size). In float64 to 1e-12 (the same
    sums); in float32 to rounding: a clip's first frame alone skips the taps on zeros (a 2-D convolution, summed
    in another order), 3e-5 at most here; 2.2's shortcuts make activations larger, 1e-4.)"""
    from vaecli.model.wan import modules

    name, ours, _ = models
    x = clip(13, 32, seed=3)
    z = torch.randn(1, ours.config.z_dim, 5, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-4 if ours.config.residual else 3e-5)):
            model = copy.deepcopy(ours).to(dtype)  # float64: the same arithmetic, not only the same to rounding
            monkeypatch.setattr(modules, "FRAME_BY_FRAME_HEIGHT", 1 << 20)
            whole, one = model.moments(x.to(dtype), first=13), model.decode(z.to(dtype), chunk=5)
            for height in (1 << 20, 1):
                monkeypatch.setattr(modules, "FRAME_BY_FRAME_HEIGHT", height)
                for first, chunk in ((1, 4), (1, 8), (1, 12), (5, 4), (9, 4), (13, 4)):
                    got = model.moments(x.to(dtype), chunk=chunk, first=first)
                    assert torch.allclose(got, whole, atol=atol), (dtype, height, first, chunk)
                for chunk in range(1, 6):
                    got = model.decode(z.to(dtype), chunk=chunk)
                    assert torch.allclose(got, one, atol=atol), (dtype, height, chunk)


def test_tiles_down_to_8_latent_px_equal_one_call(models):
    """Exact spatial tiles (the stem on whole frames, the tail per tile with the decoder's halo, a cache per
    tile), streamed one latent frame at a time: fp64 equal to one call; fp32 equal to the untiled stream within
    1e-5; a halo too small differs, so the comparison can fail."""
    from vaecli.model.wan.tiles import decode_tiled
    from vaecli.ops.attention import AttentionBackend

    name, ours, _ = models
    attention = AttentionBackend("math")
    z = torch.randn(1, ours.config.z_dim, 2, 19, 10, generator=torch.Generator().manual_seed(5))

    def tiled(vae, latents, tile, halo=None):
        state: dict = {}
        return torch.cat([decode_tiled(vae, latents[:, :, t:t + 1], state, attention, tile, halo)
                          for t in range(latents.shape[2])], dim=2)

    with torch.no_grad():
        wide = WanVAE(ours.config).double().eval()
        wide.load_state_dict(ours.state_dict())
        one = wide.decode(z.double(), attention, chunk=2)
        assert torch.allclose(tiled(wide, z.double(), 8), one, atol=1e-9, rtol=0)  # tiles of 8, 8, 3 × 8, 2
        stream = ours.decode(z, attention, chunk=1)
        assert torch.allclose(tiled(ours, z, 8), stream, atol=1e-5)
        assert (tiled(ours, z, 8, halo=1) - stream).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["narrow", "tiny22"])  # the released 2.1 structure; 2.2's shortcuts and patches
def test_tile_major_tiles_equal_one_call(name):
    """Tile-major (`decode_columns`: each tile through the whole clip, then the next), 1 and 3 latent frames per
    call: fp64 equal to one call (the same sums); fp32 as close to the fp64 truth as the fp32 one-call decode is,
    within twice its own rounding or 1e-4 (the tiny 2.2 oracle's activations are large: its one-call decode is
    2e-4 from the truth; the stem's output is read back in slices, so sums may run in another order); a halo too
    small differs, so the comparison can fail."""
    from vaecli.model.wan.tiles import decode_columns
    from vaecli.ops.attention import AttentionBackend

    ours, _ = pair(CONFIGS[name], seed=len(name))
    attention = AttentionBackend("math")
    z = torch.randn(1, ours.config.z_dim, 3, 15, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        wide = WanVAE(ours.config).double().eval()
        wide.load_state_dict(ours.state_dict())
        truth = wide.decode(z.double(), attention, chunk=3)
        assert torch.allclose(decode_columns(wide, z.double(), attention, 2, 8), truth, atol=1e-9, rtol=0)
        one = ours.decode(z, attention, chunk=3)
        tolerance = max(1e-4, 2 * (one.double() - truth).abs().max().item())
        for chunk in (1, 3):
            columns = decode_columns(ours, z, attention, chunk, 8)
            assert columns.shape == (1, 3, 9, 15 * ours.config.spatial_factor, 10 * ours.config.spatial_factor)
            assert (columns.double() - truth).abs().max() <= tolerance, chunk
        assert (decode_columns(ours, z, attention, 3, 8, halo=1) - one).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    """The tiny Wan model in the original layout (with Kijai's `model.` prefix) and as a diffusers folder, and the
    diffusers model with the same weights."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("wan")
    ours, theirs = pair(CONFIGS["tiny"], seed=7)
    save_file({f"model.{k}": v.contiguous() for k, v in ours.state_dict().items()}, str(root / "wan.safetensors"))
    theirs.save_pretrained(root / "diffusers" / "vae")
    return root, theirs


def run(*args):
    from typer.testing import CliRunner

    from vaecli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_encode_decode_info_convert_match_diffusers(wan_files, tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from helpers import make_video, read_video

    root, theirs = wan_files
    video = tmp_path / "clip.mp4"
    make_video(video, n=9, width=32, height=32)
    seen, _ = read_video(video)
    info = json.loads(run("info", root / "wan.safetensors", "--json").stdout)
    assert info["family"] == "wan" and info["latent_channels"] == 16 and info["frame_rule"] == {"factor": 4,
                                                                                             "causal": True}
    for model, batch in ((root / "wan.safetensors", []), (root / "diffusers", ["--batch", "4"])):
        out = tmp_path / f"{Path(model).stem}.latents.safetensors"
        done = run("encode", video, "-m", model, "-o", out, "--json", *batch)  # 9 frames at once; 5, then 4
        assert done.exit_code == 0, done.output
        with safe_open(str(out), "pt") as f:
            stored, meta = f.get_tensor("latents"), f.metadata()
        x = torch.from_numpy(seen).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            mean = theirs.encode(x).latent_dist.mean[0].permute(1, 0, 2, 3)  # (t, C, h, w)
        m = torch.tensor(theirs.config.latents_mean).view(1, -1, 1, 1)
        s = torch.tensor(theirs.config.latents_std).view(1, -1, 1, 1)
        assert stored.shape == (3, 16, 4, 4) and meta["model.family"] == "wan"
        assert torch.allclose(stored, (mean - m) / s, atol=1e-4), (stored - (mean - m) / s).abs().max()
    frames_dir = tmp_path / "frames"
    done = run("decode", out, "-m", root / "wan.safetensors", "-o", frames_dir, "--format", "png", "--json")
    assert done.exit_code == 0, done.output
    pngs = sorted(frames_dir.glob("*.png"))
    assert len(pngs) == 9  # 3 latent frames -> 1 + 4·2 frames, none dropped or invented
    got = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs]).astype(int)
    with torch.no_grad():
        ref = theirs.decode((stored * s + m).permute(1, 0, 2, 3)[None]).sample[0].permute(1, 2, 3, 0)
    want = ((ref + 1) * 127.5).round().clamp(0, 255).numpy().astype(int)
    assert np.abs(got - want).max() <= 1
    converted = run("convert", root / "wan.safetensors", "--to", "diffusers", "-o", tmp_path / "conv")
    back = run("convert", tmp_path / "conv", "-o", tmp_path / "back.safetensors")
    assert converted.exit_code == 0 and back.exit_code == 0, converted.output + back.output
    with safe_open(str(root / "wan.safetensors"), "pt") as a, safe_open(str(tmp_path / "back.safetensors"), "pt") as b:
        assert sorted(k[len("model."):] for k in a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor("model." + k), b.get_tensor(k)) for k in b.keys())  # lossless


def test_cli_refuses_lengths_off_the_frame_rule(wan_files, tmp_path):
    from helpers import make_video

    root, _ = wan_files
    video = tmp_path / "clip.mp4"
    make_video(video, n=11, width=32, height=32)
    done = run("encode", video, "-m", root / "wan.safetensors", "-o", tmp_path / "x.latents.safetensors")
    assert done.exit_code == 1 and "take 9 or 13 frames" in done.output and not (tmp_path / "x.latents.safetensors").exists()


def test_mutated_wan_checkpoints_give_one_error_line(wan_files, wan22_files, tmp_path):
    """Generated bad Wan 2.1 and 2.2 files (a tensor missing, one dimension dropped, added, resized or zero, NaN,
    the other version's channels): `info` exits 1 with one `error:` line, never a traceback."""
    import random

    from safetensors.torch import load_file, save_file

    rng = random.Random(11)

    def mutations(state, prefix):
        keys = sorted(state)
        for key in rng.sample(keys, 10):
            t = state[key]
            yield f"drop {key}", {k: v for k, v in state.items() if k != key}
            if t.dim() > 1:
                yield f"flat {key}", {**state, key: t.reshape(-1)}
            yield f"extra dim {key}", {**state, key: t[None]}
            yield f"resized {key}", {**state, key: torch.zeros((t.shape[0] + 1, *t.shape[1:]))}
            yield f"zero {key}", {**state, key: torch.zeros((0, *t.shape[1:]))}
        yield "nan", {**state, keys[0]: torch.full_like(state[keys[0]], float("nan"))}
        z = state[prefix + "conv2.weight"].shape[0]
        other_z, other_pixels = (16, 3) if z == 48 else (48, 12)  # the other version's latent and input channels
        yield f"{other_z} channels", {**state, prefix + "conv2.weight": torch.zeros(other_z, other_z, 1, 1, 1)}
        yield f"{other_pixels} channels in", {**state,
                                              prefix + "encoder.conv1.weight": torch.zeros(3, other_pixels, 3, 3, 3)}

    files = ((wan_files[0] / "wan.safetensors", "model."), (wan22_files[0] / "wan2.2_vae.safetensors", ""))
    for n, (source, prefix) in enumerate(files):
        for i, (what, mutated) in enumerate(mutations(load_file(str(source)), prefix)):
            path = tmp_path / f"m{n}-{i}.safetensors"
            save_file({k: v.contiguous() for k, v in mutated.items()}, str(path))
            done = run("info", path)
            lines = done.stderr.strip().splitlines()
            assert done.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (what, done.output)
            assert "Traceback" not in done.output


def diffusers_mean(theirs, frames) -> torch.Tensor:
    """diffusers' posterior mean (t, C, h, w) of uint8 frames (n, H, W, 3)."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        return theirs.encode(x).latent_dist.mean[0].permute(1, 0, 2, 3)


def test_frames_fit_trim_and_pad_are_stored_said_and_undone(wan_files, tmp_path):
    """11 frames: trim codes the first 9 and says it dropped 2; pad codes 13 (the last frame repeated) and the
    decode gives back exactly 11."""
    import json

    import numpy as np
    from safetensors import safe_open

    from helpers import make_video, read_video

    root, theirs = wan_files
    video = tmp_path / "clip.mp4"
    make_video(video, n=11, width=32, height=32)
    seen, _ = read_video(video)
    for mode, coded, shown in (("trim", 9, 9), ("pad", 13, 11)):
        out = tmp_path / f"{mode}.latents.safetensors"
        done = run("encode", video, "-m", root / "wan.safetensors", "-o", out, "--frames-fit", mode, "--json",
                   "--latent-space", "raw")
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["frames_fit"] == {"mode": mode, "read": 11, "coded": coded}
        assert ("trimmed to 9" if mode == "trim" else "padded to 13") in done.stderr
        with safe_open(str(out), "pt") as f:
            stored, meta = f.get_tensor("latents"), f.metadata()
        assert json.loads(meta["frames_fit"]) == {"mode": mode, "read": 11, "coded": coded}
        assert meta["latents.space"] == "raw"
        clip = seen[:9] if mode == "trim" else np.concatenate([seen, seen[-1:].repeat(2, 0)])
        want = diffusers_mean(theirs, clip)  # raw: no normalisation
        assert stored.shape == want.shape and torch.allclose(stored, want, atol=1e-4)
        decoded = run("decode", out, "-m", root / "wan.safetensors", "-o", f"{tmp_path / mode}/", "--json")
        assert decoded.exit_code == 0, decoded.output
        assert json.loads(decoded.stdout)["frames"] == shown == len(list((tmp_path / mode).glob("*.png")))


def test_latent_spaces_foreign_files_and_comfy_export(wan_files, tmp_path):
    """Normalised (default) and raw files decode to the same frames; a foreign `latents` file needs
    --latent-space; the ComfyUI export is raw and 5-D (1, C, T, h, w), and decodes too."""
    import json

    import numpy as np
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file

    from helpers import make_video, read_video

    root, theirs = wan_files
    model = root / "wan.safetensors"
    video = tmp_path / "clip.mp4"
    make_video(video, n=9, width=32, height=32)
    seen, _ = read_video(video)
    norm = tmp_path / "norm.latents.safetensors"
    assert run("encode", video, "-m", model, "-o", norm, "--export", "comfy").exit_code == 0
    with safe_open(str(tmp_path / "norm.latent"), "pt") as f:
        comfy = f.get_tensor("latent_tensor")
    raw = diffusers_mean(theirs, seen)
    assert comfy.shape == (1, 16, 3, 4, 4) and torch.allclose(comfy[0].transpose(0, 1), raw, atol=1e-4)
    with safe_open(str(norm), "pt") as f:
        normalised = f.get_tensor("latents")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"latents": normalised.contiguous()}, str(foreign))
    refused = run("decode", foreign, "-m", model, "--fps", "8", "-o", tmp_path / "f.mp4")
    assert refused.exit_code == 1 and "--latent-space normalized or --latent-space raw" in refused.stderr
    conflict = run("decode", norm, "-m", model, "--latent-space", "raw", "-o", tmp_path / "c.mp4")
    assert conflict.exit_code == 1 and "the file says its latents are normalized" in conflict.stderr

    runs = iter(range(100))

    def frames(path, *extra):
        folder = tmp_path / f"{Path(path).name}-{next(runs)}"
        done = run("decode", path, "-m", model, "-o", f"{folder}/", "--json", *extra)
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["frames"] == 9
        return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(int)

    reference = frames(norm)
    for path, extra in ((tmp_path / "norm.latent", ["--fps", "8"]),
                        (foreign, ["--fps", "8", "--latent-space", "normalized"])):
        assert np.abs(frames(path, *extra) - reference).max() <= 1
    save_file({"latents": raw.contiguous()}, str(foreign))
    assert np.abs(frames(foreign, "--fps", "8", "--latent-space", "raw") - reference).max() <= 1
    save_file({"latent_tensor": comfy.repeat(2, 1, 1, 1, 1), "latent_format_version_0": torch.zeros(0)},
              str(tmp_path / "two.latent"))
    two = run("decode", tmp_path / "two.latent", "-m", model, "--fps", "8", "-o", tmp_path / "two.mp4")
    assert two.exit_code == 1 and "hold 2 clips" in two.stderr


@pytest.fixture(scope="module")
def wan22_files(tmp_path_factory):
    """The tiny Wan 2.2 5B model (the released latent statistics) in the original layout and as a diffusers
    folder, and the diffusers model with the same weights."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from vaecli.model.wan.config import WAN22_MEAN, WAN22_STD

    root = tmp_path_factory.mktemp("wan22")
    ours, theirs = pair(replace(CONFIGS["tiny22"], latents_mean=WAN22_MEAN, latents_std=WAN22_STD), seed=9)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(root / "wan2.2_vae.safetensors"))
    theirs.save_pretrained(root / "diffusers" / "vae")
    return root, theirs


def test_wan22_through_the_cli_matches_diffusers(wan22_files, tmp_path):
    """Wan 2.2 5B in both layouts: detected from shapes (`info`: version 2.2, 48 channels, 16×), encode equal to
    diffusers' normalised posterior mean, decode equal to its frames, sizes off the 16 grid fitted and given
    back, convert lossless both ways."""
    import json

    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from helpers import make_video, read_video

    root, theirs = wan22_files
    model = root / "wan2.2_vae.safetensors"
    info = json.loads(run("info", model, "--json").stdout)
    assert (info["family"], info["version"], info["latent_channels"], info["spatial_factor"]) == ("wan", "2.2", 48, 16)
    video = tmp_path / "clip.mp4"
    make_video(video, n=9, width=32, height=32)
    seen, _ = read_video(video)
    m = torch.tensor(theirs.config.latents_mean).view(1, -1, 1, 1)
    s = torch.tensor(theirs.config.latents_std).view(1, -1, 1, 1)
    want = (diffusers_mean(theirs, seen) - m) / s
    for source in (model, root / "diffusers"):
        out = tmp_path / f"{source.stem}.latents.safetensors"
        done = run("encode", video, "-m", source, "-o", out)
        assert done.exit_code == 0, done.output
        with safe_open(str(out), "pt") as f:
            stored = f.get_tensor("latents")
        assert stored.shape == (3, 48, 2, 2) and torch.allclose(stored, want, atol=1e-4)
    frames_dir = tmp_path / "frames"
    assert run("decode", out, "-m", model, "-o", f"{frames_dir}/").exit_code == 0
    got = np.stack([np.asarray(Image.open(p)) for p in sorted(frames_dir.glob("*.png"))]).astype(int)
    with torch.no_grad():
        ref = theirs.decode((stored * s + m).permute(1, 0, 2, 3)[None]).sample[0].permute(1, 2, 3, 0)
    assert got.shape == (9, 32, 32, 3)
    assert np.abs(got - ((ref + 1) * 127.5).round().clamp(0, 255).numpy().astype(int)).max() <= 1
    odd = tmp_path / "odd.mp4"
    make_video(odd, n=5, width=40, height=24)
    assert run("encode", odd, "-m", model, "-o", tmp_path / "odd.latents.safetensors").exit_code == 0
    back = run("decode", tmp_path / "odd.latents.safetensors", "-m", model, "-o", f"{tmp_path / 'odd'}/", "--json")
    assert back.exit_code == 0 and json.loads(back.stdout)["frames"] == 5
    assert Image.open(sorted((tmp_path / "odd").glob("*.png"))[0]).size == (40, 24)
    assert run("convert", model, "--to", "diffusers", "-o", tmp_path / "conv").exit_code == 0
    assert run("convert", tmp_path / "conv", "-o", tmp_path / "back.safetensors").exit_code == 0
    with safe_open(str(model), "pt") as a, safe_open(str(tmp_path / "back.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())
    from diffusers import AutoencoderKLWan

    reloaded = AutoencoderKLWan.from_pretrained(tmp_path / "conv")  # our diffusers folder loads in diffusers
    assert reloaded.config.is_residual and reloaded.config.patch_size == 2


def test_planner_tiles_only_when_whole_frames_do_not_fit(monkeypatch):
    """Released 2.1 and 2.2 structures on the meta device, a 720p clip, prices counted from the codec's own
    code: a large budget streams whole frames (one latent frame per call on CPU). Step-by-step tiles do not pay
    at this size (every tile's causal caches hold its halo, and the largest frames already run one at a time);
    tile-major ones do (one tile's caches alive), and their price grows with the clip (its stem output and
    frames). A budget of the whole-frame price gets whole frames; less, the tile-major tiles of the least work
    that fit, of at most MAX_TILE_WORK times the work (prices stubbed where 2.2's real ones all fit); --tile
    forces tiles of any work; --overlap is refused."""
    from vaecli.errors import UsageError
    from vaecli.model.plan import Budget
    from vaecli.model.wan.family import FAMILY, MAX_TILE_WORK, TILES, Chunks, WanCodec
    from vaecli.model.wan.tiles import tile_work

    released = {"2.1": (WanConfig(), (90, 160)),
                "2.2": (WanConfig(dim=160, decoder_dim=256, z_dim=48, in_channels=12, out_channels=12, residual=True,
                                  patch_size=2), (44, 80))}
    cpu = torch.device("cpu")
    for version, (config, hw) in released.items():
        codec = FAMILY.build(None, device=cpu, dtype=torch.float32, config=config)
        whole = codec.plan_decode(21, hw, Budget(cpu, 1 << 40))
        assert whole.pieces.tile is None and whole.pieces.latent == 1 and whole.exact and whole.fits  # CPU: fastest
        one = codec._decode_price(21, hw, Chunks(1), whole.attention)
        steps = {t: codec._decode_price(21, hw, Chunks(1, t, 13), whole.attention) for t in (96, 48, 16)}
        assert steps[16] > steps[48] >= one and steps[96] >= one, version  # small tiles pay for their halos
        sides = sorted((t for t in TILES if t < max(hw) and tile_work(*hw, t, 13) <= MAX_TILE_WORK),
                       key=lambda t: tile_work(*hw, t, 13))
        columns = {t: codec._decode_price(21, hw, Chunks(1, t, 13, True), whole.attention) for t in sides}
        assert one > columns[sides[-1]] and columns[sides[0]] > columns[sides[-1]], version
        assert codec._decode_price(41, hw, Chunks(1, sides[-1], 13, True), whole.attention) > columns[sides[-1]]
        for budget in (one, one - 1, columns[sides[-1]]):
            plan = codec.plan_decode(21, hw, Budget(cpu, budget))
            assert plan.exact and plan.fits and plan.activation_bytes <= budget, (version, budget)
            assert (plan.pieces.tile is None) == (budget == one) and plan.pieces.columns == (budget < one)
            if budget < one:  # the tile-major tiles of the least work that fit
                fit = next(t for t in sides if columns[t] <= budget)
                assert plan.pieces == Chunks(1, fit, 13, True) and plan.work == tile_work(*hw, fit, 13) > 1
        tight = codec.plan_decode(21, hw, Budget(cpu, 1 << 20))
        assert not tight.fits and tight.activation_bytes == min(one, *columns.values())  # refused upstream
        forced = codec.plan_decode(21, hw, Budget(cpu, 1 << 40), tile=16)
        assert forced.pieces == Chunks(1, 16, 13)  # step by step where it fits, else tile-major
        assert codec.plan_decode(21, hw, Budget(cpu, steps[16] - 1), tile=16).pieces == Chunks(1, 16, 13, True)
        assert codec.plan_decode(21, hw, Budget(cpu, 1 << 40), chunk=5).pieces.latent == 5  # --chunk forces it
        with pytest.raises(UsageError):
            codec.plan_decode(21, hw, Budget(cpu, 1 << 40), overlap=2)

    stub = {None: 1000, 64: 900, 48: 800, 32: 700, 24: 750, 16: 600}  # tile-major prices, 2.2 (< 80 px)
    monkeypatch.setattr(WanCodec, "_decode_price", lambda self, f, hw, pieces, b:
                        stub.get(pieces.tile, 500) if pieces.columns or not pieces.tile else 1)
    for budget, want in ((850, 48), (700, 32), (699, 32)):  # the least work that fits, else the cheapest
        plan = codec.plan_decode(21, hw, Budget(cpu, budget))  # 16 px: over 4x the work; 12 and 8 more
        assert plan.pieces == Chunks(1, want, 13, True) and plan.exact and plan.work == tile_work(*hw, want, 13)
        assert plan.fits == (budget >= stub[want]) and plan.activation_bytes == stub[want]
    assert tile_work(*hw, 24, 13) <= MAX_TILE_WORK < tile_work(*hw, 16, 13)
    assert codec.plan_decode(21, hw, Budget(cpu, 600), tile=16).pieces == Chunks(1, 16, 13)  # forced: any


def test_cli_decode_in_forced_tiles_gives_the_same_frames(wan_files, tmp_path, monkeypatch):
    """Whole frames, forced tiles step by step, and (where only they fit: prices stubbed) tile-major tiles,
    through the CLI: the same frames, every one of them (tile-major to a rounding: its stem output is read back
    in slices)."""
    import json

    import numpy as np
    from PIL import Image

    from helpers import make_video
    from vaecli.model.wan.family import WanCodec

    root, _ = wan_files
    model = root / "wan.safetensors"
    video = tmp_path / "clip.mp4"
    make_video(video, n=5, width=80, height=48)
    latents = tmp_path / "clip.latents.safetensors"
    assert run("encode", video, "-m", model, "-o", latents).exit_code == 0
    got = {}
    for name, extra in (("whole", []), ("tiles", ["--tile", "4"]), ("columns", ["--tile", "4"])):
        if name == "columns":
            monkeypatch.setattr(WanCodec, "_decode_price", lambda self, f, hw, pieces, b: 1 if pieces.columns else 1 << 50)
        done = run("decode", latents, "-m", model, "-o", f"{tmp_path / name}/", "--json", *extra)
        assert done.exit_code == 0, done.output
        result = json.loads(done.stdout)
        got[name] = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))])
        assert result["plan"]["pieces"]["tile"] == (4 if extra else None), result["plan"]
        assert result["plan"]["pieces"]["order"] == ("tile-major" if name == "columns" else "step-major")
        assert (result["plan"]["work"] > 1) == bool(extra)  # the halos: 6 x 10 latent px in tiles of 4
        assert ("x the work of whole frames; forced by --tile" in done.stderr) == bool(extra), done.stderr
        assert ("each tile through the whole clip" in done.stderr) == (name == "columns")
    assert got["whole"].shape == (5, 48, 80, 3)
    assert np.array_equal(got["whole"], got["tiles"])
    off = np.abs(got["whole"].astype(int) - got["columns"].astype(int))  # fp32 rounding: at most a level, rarely
    assert off.max() <= 1 and (off > 0).mean() < 1e-3


def test_wan_models_by_hugging_face_name(wan_files, wan22_files, tmp_path):
    """`-m Wan-AI/Wan2.1-T2V-1.3B-Diffusers` and the 2.2 5B repository from a Hugging Face cache (offline): the
    VAE in `vae/` is found (never the transformer), its family and version told, and it encodes. The 2.1 name
    goes through the installed CLI (HF_HUB_CACHE and HF_HUB_OFFLINE are read when huggingface_hub is imported);
    the 2.2 name through `resolve_model` with the same cache."""
    import json
    import os
    import subprocess
    import sys

    from helpers import add_snapshot, make_video
    from vaecli.model.hub import resolve_model

    cache = tmp_path / "hub"
    for repo, (root, _) in (("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", wan_files),
                            ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", wan22_files)):
        vae = root / "diffusers" / "vae"
        add_snapshot(cache, repo, "c" * 40, {
            "vae/config.json": (vae / "config.json").read_bytes(),
            "vae/diffusion_pytorch_model.safetensors": (vae / "diffusion_pytorch_model.safetensors").read_bytes(),
            "transformer/config.json": b"{}", "model_index.json": b"{}"})
    video = tmp_path / "clip.mp4"
    make_video(video, n=5, width=32, height=32)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "vaecli", "encode", str(video), "-m",
                           "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "-o", str(tmp_path / "a.latents.safetensors"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shape"][:2] == [2, 16] and json.loads(done.stdout)["family"] == "wan"
    local = resolve_model("Wan-AI/Wan2.2-TI2V-5B-Diffusers", cache_dir=cache, offline=True)
    assert local.name == "vae" and (local / "diffusion_pytorch_model.safetensors").is_file()  # the folder, not the transformer
    described = json.loads(run("info", local, "--json").stdout)
    assert (described["family"], described["version"], described["layout"]) == ("wan", "2.2", "diffusers")
    done = run("encode", video, "-m", local, "-o", tmp_path / "b.latents.safetensors", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["shape"][:2] == [2, 48], done.output
    missing = subprocess.run([sys.executable, "-m", "vaecli", "info", "Wan-AI/Wan2.1-T2V-14B-Diffusers"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr
