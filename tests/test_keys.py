"""The SVD configuration's keys and shapes equal the reference list (checkpoint-formats.md, Appendix A)."""

from pathlib import Path

import pytest
import torch

from vaecli.model.svd import keymap
from vaecli.model.svd.config import load_config, named_configs
from vaecli.model.svd.vae import VAE

REFERENCE = Path(__file__).parent / "data" / "svd_keys.tsv"


def reference_rows():
    rows = [line.rstrip("\n").split("\t") for line in REFERENCE.read_text().splitlines() if not line.startswith("#")]
    shape = lambda s: tuple(int(n) for n in s.split("x"))  # noqa: E731
    return [(sgm, shape(ss), diff, shape(ds)) for sgm, ss, diff, ds in rows]


def meta_state(config):
    with torch.device("meta"):
        return VAE(config).state_dict()


def test_reference_list_is_complete():
    rows = reference_rows()
    assert len(rows) == 372
    assert sum(r[0].startswith("encoder.") for r in rows) == 106
    assert sum(r[0].startswith("decoder.") for r in rows) == 266


def test_sgm_keys_and_shapes_equal_reference():
    state = meta_state(load_config("svd-vae"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {r[0]: r[1] for r in reference_rows()}
    assert sum(v.numel() for k, v in state.items() if k.startswith("encoder.")) == 34_163_592
    assert sum(v.numel() for k, v in state.items() if k.startswith("decoder.")) == 63_579_183


def test_diffusers_keys_and_shapes_equal_reference_and_diffusers_model():
    from diffusers import AutoencoderKLTemporalDecoder

    state = meta_state(load_config("svd-vae"))
    converted = {k: tuple(v.shape) for k, v in keymap.to_diffusers(state, temporal=True).items()}
    assert converted == {r[2]: r[3] for r in reference_rows()}
    with torch.device("meta"):
        ref = AutoencoderKLTemporalDecoder(down_block_types=["DownEncoderBlock2D"] * 4,
                                           block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_shapes == {**converted, "quant_conv.weight": (8, 8, 1, 1), "quant_conv.bias": (8,)}


def test_mapping_is_a_bijection_both_ways():
    for name, config in named_configs().items():
        state = meta_state(config)
        there = keymap.to_diffusers(state, temporal=config.is_video)
        back = keymap.from_diffusers(there, temporal=config.is_video)
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}, name


def test_image_vae_keys_match_diffusers_autoencoderkl():
    from diffusers import AutoencoderKL

    state = meta_state(load_config("sd-vae"))
    assert len(state) == 248 and sum(v.numel() for v in state.values()) == 83_653_863
    with torch.device("meta"):
        ref = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    converted = {k: tuple(v.shape) for k, v in keymap.to_diffusers(state, temporal=False).items()}
    assert converted == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("mode,tensors,params", [("all", 297, 74_081_840), ("attn-only", 169, 59_992_836),
                                                 ("image", 138, 49_490_179)])
def test_other_time_mode_decoder_sizes(mode, tensors, params):
    state = meta_state(load_config("svd-vae").replace(time_mode=mode))
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
    assert len(decoder) == tensors and sum(v.numel() for v in decoder.values()) == params


def test_old_diffusers_attention_names_are_accepted():
    state = {"decoder.mid_block.attentions.0.query.weight": torch.zeros(4, 4),
             "decoder.mid_block.attentions.0.proj_attn.bias": torch.zeros(4),
             "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}
    out = keymap.from_diffusers(state, temporal=True)
    assert set(out) == {"decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.proj_out.bias",
                        "encoder.down.0.block.0.conv1.weight"}
    assert out["decoder.mid.attn_1.q.weight"].shape == (4, 4, 1, 1)
