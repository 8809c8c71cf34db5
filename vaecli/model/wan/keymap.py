"""Wan VAE key names: the original release's (what `WanVAE` uses) <-> diffusers' `AutoencoderKLWan`.

The original decoder numbers its layers flat (`decoder.upsamples.N`); diffusers groups them per level
(`decoder.up_blocks.i.resnets.j`, `...upsamplers.0`). The flat numbering follows from the config (num_res_blocks,
dim_mult, attn_scales), so the map is built from it, never hard-coded. In Wan 2.2 both layouts group by level:
`encoder.downsamples.i.downsamples.j` <-> `encoder.down_blocks.i.resnets.j` (the last j: `...downsampler`),
`decoder.upsamples.i.upsamples.j` <-> `decoder.up_blocks.i.resnets.j` (the last j: `...upsampler`).
"""

from __future__ import annotations

from vaecli.model.wan.config import WanConfig

_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
             "shortcut.": "conv_shortcut."}
_MIDDLE = {"middle.0.": "mid_block.resnets.0.", "middle.1.": "mid_block.attentions.0.",
           "middle.2.": "mid_block.resnets.1."}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
        "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
        "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
        "decoder.head.2.": "decoder.conv_out."}


def decoder_groups(config: WanConfig) -> list[str]:
    """For every flat `decoder.upsamples.N`, its diffusers prefix (`up_blocks.i.resnets.j` or
    `up_blocks.i.upsamplers.0`)."""
    if config.attn_scales:
        raise ValueError("Wan configs with attention inside the levels have no diffusers layout")
    groups = []
    levels = len(config.dim_mult)
    for i in range(levels):
        groups += [f"up_blocks.{i}.resnets.{j}" for j in range(config.num_res_blocks + 1)]
        if i != levels - 1:
            groups.append(f"up_blocks.{i}.upsamplers.0")
    return groups


def _level(config: WanConfig, part: str, inner: str) -> str:
    """A Wan 2.2 level's tail `i.<downsamples|upsamples>.j.rest` -> diffusers' `i.resnets.j.rest` or
    `i.<downsampler|upsampler>.rest`."""
    i, _, rest = inner.partition(".")
    seq, _, rest = rest.partition(".")
    j, _, rest = rest.partition(".")
    blocks = config.num_res_blocks + (part == "decoder")
    if seq != ("downsamples" if part == "encoder" else "upsamples") or not j.isdigit():
        raise KeyError(inner)
    if int(j) < blocks:
        return f"{i}.resnets.{j}.{_rename_block(rest)}"
    return f"{i}.{'downsampler' if part == 'encoder' else 'upsampler'}.{rest}"


def _rename_block(rest: str) -> str:
    for old, new in _RESIDUAL.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest  # attention (norm, to_qkv, proj) and resample (resample.1, time_conv) keep their names


def to_diffusers(key: str, config: WanConfig) -> str:
    """One original key -> its diffusers name (a KeyError for a key that is not the config's)."""
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    part, _, rest = key.partition(".")
    for old, new in _MIDDLE.items():
        if rest.startswith(old):
            return f"{part}.{new}{_rename_block(rest[len(old):])}"
    if config.residual and rest.startswith(("downsamples.", "upsamples.")):
        inner = rest.partition(".")[2]
        return f"{part}.{'down_blocks' if part == 'encoder' else 'up_blocks'}.{_level(config, part, inner)}"
    if rest.startswith("downsamples."):  # the encoder is flat in both layouts
        n, _, inner = rest[len("downsamples."):].partition(".")
        return f"encoder.down_blocks.{n}.{_rename_block(inner)}"
    if rest.startswith("upsamples."):
        n, _, inner = rest[len("upsamples."):].partition(".")
        return f"decoder.{decoder_groups(config)[int(n)]}.{_rename_block(inner)}"
    raise KeyError(key)


def original_to_diffusers(keys, config: WanConfig) -> dict[str, str]:
    """{original key: diffusers key} for every key; one-to-one (checked)."""
    mapping = {k: to_diffusers(k, config) for k in keys}
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("the Wan key map is not one-to-one")
    return mapping
