"""Checkpoint reading: safety, damaged files, layout detection, config inference, conversion."""

import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import latents, random_vae, tiny_config
from vaecli.errors import CheckpointError, OutputError, UsageError
from vaecli.model.checkpoint import convert_checkpoint, describe_checkpoint, load_vae, read_checkpoint
from vaecli.model.svd.layout import detect_layout, infer_config
from vaecli.model.svd.config import load_config


def write(state, path, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def tiny_state():
    return random_vae(tiny_config(), seed=30).state_dict()


class Trap:
    """Unpickling this object creates a marker file: the test fails if anything ever unpickles it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_vae(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": Trap(str(marker))}, protocol=2))
    with pytest.raises(CheckpointError, match="pickle-based PyTorch file; vaecli never unpickles"):
        load_vae(path)
    assert not marker.exists()


def test_torch_save_zip_files_are_refused(tmp_path):
    path = tmp_path / "vae.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Trap(str(tmp_path / "unpickled"))))
    with pytest.raises(CheckpointError, match="pickle-based"):
        load_vae(path)
    path2 = tmp_path / "renamed.safetensors"
    path2.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="pickle-based"):
        load_vae(path2)
    assert not (tmp_path / "unpickled").exists()


def test_truncated_file(tmp_path, tiny_state):
    path = write(tiny_state, tmp_path / "vae.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '.+' needs bytes up to \d+, the file has \d+"):
        load_vae(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="not a safetensors file, or truncated"):
        load_vae(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_vae(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "vae.safetensors"
    garbage = b'{"a": [1, 2'
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_vae(path)
    entry = b'{"x": {"dtype": "F32", "shape": [1]}}'
    path.write_bytes(struct.pack("<Q", len(entry)) + entry)
    with pytest.raises(CheckpointError, match="corrupt safetensors header \\(tensor 'x': data_offsets None"):
        load_vae(path)


def test_file_without_a_vae_names_layouts_and_keys(tmp_path):
    path = write({"model.diffusion_model.out.2.weight": torch.zeros(2), "cond.x": torch.zeros(1)},
                 tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_vae(path)
    msg = str(err.value)
    assert "no VAE found; layouts tried: sgm/ComfyUI" in msg and "diffusers" in msg
    assert "2 keys, e.g. cond.x, model.diffusion_model.out.2.weight" in msg
    assert "\n" not in msg


def test_decoder_only_file_is_explained(tmp_path, tiny_state):
    decoder = {f"first_stage_model.{k}": v for k, v in tiny_state.items() if k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match="decoder but no encoder"):
        load_vae(write(decoder, tmp_path / "sv3d.safetensors"))


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["decoder.up.1.block.0.time_stack.in_layers.2.weight"] = torch.zeros(64, 64, 3, 1, 2)
    with pytest.raises(CheckpointError, match=r"tensor decoder\.up\.1\.block\.0\.time_stack\.in_layers\.2\.weight "
                                              r"has shape \[64, 64, 3, 1, 2\], the model needs \[64, 64, 3, 1, 1\]"):
        load_vae(write(state, tmp_path / "bad.safetensors"))


def test_missing_tensor_is_reported(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if k != "decoder.mid.block_2.mix_factor"}
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. decoder\.mid\.block_2\.mix_factor\)"):
        load_vae(write(state, tmp_path / "partial.safetensors"))


def test_attention_weights_as_matrices_or_1x1_convs(tmp_path, tiny_state):
    squeezed = {k: (v[:, :, 0, 0] if k.endswith(("attn_1.q.weight", "attn_1.proj_out.weight")) else v)
                for k, v in tiny_state.items()}
    a = load_vae(write(squeezed, tmp_path / "mixed.safetensors"), attention="math")
    b = load_vae(write(tiny_state, tmp_path / "plain.safetensors"), attention="math")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("changes", [
    dict(), dict(time_mode="all"), dict(time_mode="attn-only"), dict(time_mode="only-last-conv"),
    dict(time_mode="image"), dict(attn_levels=(0, 1), ch_mult=(1, 2, 2), num_res_blocks=1),
    dict(video_kernel_size=(5, 1, 1)), dict(time_mode="image", quant_conv=True, post_quant_conv=True),
    dict(ch=64, ch_mult=(1, 1), z_channels=16, embed_dim=8, quant_conv=True, post_quant_conv=True),
])
def test_config_is_inferred_from_shapes(changes):
    config = tiny_config(**changes)
    state = random_vae(config, seed=31).state_dict()
    assert infer_config(state).architecture() == config.architecture()


def test_named_configs_set_what_shapes_cannot(tmp_path):
    state = random_vae(load_config("sd-vae").replace(ch=32, ch_mult=(1, 2)), seed=32).state_dict()
    path = write(state, tmp_path / "vae.safetensors")
    assert read_checkpoint(path).config.scaling_factor == 0.18215  # unknown architecture: the default
    assert load_config("sdxl-vae").scaling_factor == 0.13025
    assert load_config("svd-vae").scaling_factor == 0.18215 and load_config("svd-vae").time_mode == "conv-only"
    with pytest.raises(CheckpointError, match="config 'sdxl-vae' does not fit this checkpoint: ch 128"):
        read_checkpoint(path, "sdxl-vae")
    custom = tmp_path / "mine.toml"
    custom.write_text('ch = 32\nch_mult = [1, 2]\ntime_mode = "image"\nquant_conv = true\n'
                      'post_quant_conv = true\nscaling_factor = 0.5\n')
    assert read_checkpoint(path, str(custom)).config.scaling_factor == 0.5
    with pytest.raises(UsageError, match="unknown config 'nope'; named configs: sd-vae, sdxl-vae, svd-vae"):
        load_vae(path, config="nope")


def test_diffusers_config_json_scaling_factor_picks_sdxl(tmp_path):
    from vaecli.model.svd.layout import to_layout

    sd = load_config("sd-vae")
    ckpt = read_checkpoint(write(random_vae(sd.replace(ch=32, ch_mult=(1, 2)), seed=33).state_dict(),
                                 tmp_path / "x.safetensors"))
    state, _ = to_layout(ckpt.state, ckpt.config, "diffusers")
    folder = tmp_path / "sdxl" / "vae"
    folder.mkdir(parents=True)
    write(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"scaling_factor": 0.13025}))
    assert read_checkpoint(tmp_path / "sdxl").config.scaling_factor == 0.13025


def test_folder_without_weights_mentions_pickles(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="found diffusion_pytorch_model.bin: pickle files are never loaded"):
        load_vae(tmp_path)


def test_detect_layout_variants():
    assert detect_layout(["vae.decoder.conv_in.weight", "vae.encoder.conv_in.weight",
                          "vae.decoder.mid.block_1.mix_factor"]).prefix == "vae."
    layout = detect_layout(["decoder.conv_in.weight", "encoder.conv_in.weight",
                            "decoder.mid_block.resnets.0.spatial_res_block.norm1.weight"])
    assert (layout.naming, layout.temporal) == ("diffusers", True)
    layout = detect_layout(["decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.mid.attn_1.q.weight"])
    assert (layout.naming, layout.temporal, layout.prefix) == ("sgm", False, "")


def test_full_svd_checkpoint_reads_only_the_first_stage(tmp_path, tiny_state):
    full = {f"first_stage_model.{k}": v for k, v in tiny_state.items()}
    full["conditioner.embedders.3.encoder.encoder.conv_in.weight"] = torch.ones(3)
    full["model.diffusion_model.x"] = torch.ones(3)
    info = describe_checkpoint(write(full, tmp_path / "svd.safetensors"))
    assert info["layout"] == "sgm" and info["prefix"] == "first_stage_model."
    assert info["tensors"] == len(tiny_state) and info["time_mode"] == "conv-only"


def test_convert_sgm_diffusers_sgm_is_lossless(tmp_path, tiny_state):
    src = write(tiny_state, tmp_path / "sgm.safetensors")
    convert_checkpoint(src, tmp_path / "diff", to="diffusers")
    assert (tmp_path / "diff" / "config.json").is_file()
    convert_checkpoint(tmp_path / "diff", tmp_path / "back.safetensors", to="sgm")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(tiny_state)
    assert all(torch.equal(back[k], tiny_state[k]) for k in tiny_state)
    diff = load_file(str(tmp_path / "diff" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(diff["quant_conv.weight"][:, :, 0, 0], torch.eye(8))
    assert diff["decoder.mid_block.attentions.0.to_q.weight"].ndim == 2


def test_converted_diffusers_folder_loads_in_diffusers(tmp_path, tiny_state):
    from diffusers import AutoencoderKLTemporalDecoder

    convert_checkpoint(write(tiny_state, tmp_path / "sgm.safetensors"), tmp_path / "diff", to="diffusers")
    ref = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "diff").eval()
    ours = load_vae(tmp_path / "sgm.safetensors", attention="math")
    z = latents(4, 8, 8)
    with torch.no_grad():
        assert (ours.decode(z, 2) - ref.decode(z, num_frames=2).sample).abs().max() <= 1e-4


def test_convert_to_fp16_extracts_and_keeps_config(tmp_path, tiny_state):
    full = {f"first_stage_model.{k}": v for k, v in tiny_state.items()}
    full["model.diffusion_model.x"] = torch.ones(3)
    out = convert_checkpoint(write(full, tmp_path / "svd.safetensors"), tmp_path / "vae16.safetensors",
                             to="sgm", dtype="fp16")
    tensors = load_file(str(out))
    assert set(tensors) == set(tiny_state) and all(t.dtype == torch.float16 for t in tensors.values())
    info = describe_checkpoint(out)
    assert info["dtypes"] == ["F16"] and info["config"]["name"] == "svd"  # unnamed shapes: the source's stem


def test_non_sgm_time_modes_refuse_diffusers(tmp_path):
    state = random_vae(tiny_config("all"), seed=34).state_dict()
    with pytest.raises(CheckpointError, match="diffusers has no model for time_mode 'all'"):
        convert_checkpoint(write(state, tmp_path / "a.safetensors"), tmp_path / "b", to="diffusers")
    assert not (tmp_path / "b").exists()


def test_outputs_are_never_overwritten_or_left_partial(tmp_path, tiny_state, monkeypatch):
    src = write(tiny_state, tmp_path / "sgm.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        convert_checkpoint(src, out, to="sgm")
    assert out.read_bytes() == b"keep me"
    import vaecli.model.checkpoint as ck

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out, to="sgm", overwrite=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "sgm.safetensors"]
    monkeypatch.undo()
    convert_checkpoint(src, out, to="sgm", overwrite=True)
    assert set(load_file(str(out))) == set(tiny_state)


def test_bundled_model_absence_is_explained():
    import vaecli.model.checkpoint as ck

    try:
        path = ck.bundled_model_path()
    except CheckpointError as e:
        assert "no bundled model" in str(e) and "--model" in str(e)
    else:
        assert path.is_file()


def test_safetensors_whose_header_length_starts_like_a_pickle_opcode_loads(tmp_path, tiny_state):
    for pad in range(256):  # find metadata that makes the first byte of the header length 0x80
        path = write(tiny_state, tmp_path / "odd.safetensors", metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert read_checkpoint(path).config.time_mode == "conv-only"
