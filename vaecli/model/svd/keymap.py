"""The one key map between checkpoint layouts: sgm/ldm (vaecli's own names) <-> diffusers.

Each rule is a pair of key templates, sgm on the left and diffusers on the right. Placeholders:
`{i}` `{j}` indices kept as they are; `{u}` / `{U}` a decoder level in sgm / its diffusers up-block index
(U = L-1-u, L = number of levels); `{m}` / `{M}` a mid ResnetBlock in sgm (1-based) / diffusers (0-based);
`{n}` a ResnetBlock layer; `{a}` / `{A}` an attention layer; `{t}` / `{T}` a time_stack layer; `{p}` weight|bias.
The same table maps both ways. Tensor values are never changed here except attention weights, which
diffusers stores as [C, C] and sgm as [C, C, 1, 1] (`reshape_like`).

Temporal attention (`time_mode` "all"/"attn-only") has no diffusers layout; `to_diffusers` refuses it.
"""

from __future__ import annotations

import functools
import re

import torch

from vaecli.errors import CheckpointError

RES = "(?:norm1|conv1|norm2|conv2)"
ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTN_OLD = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # diffusers < 0.14 names
TIME = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}

_PATTERNS = {
    "i": r"\d+", "j": r"\d+", "u": r"\d+", "U": r"\d+", "m": r"[12]", "M": r"[01]",
    "n": RES, "p": r"weight|bias",
    "a": "|".join(re.escape(k) for k in ATTN),
    "A": "|".join(re.escape(k) for k in list(ATTN.values()) + list(ATTN_OLD)),
    "t": "|".join(re.escape(k) for k in TIME),
    "T": "|".join(TIME.values()),
}

# sgm template, diffusers template; "{S}" is "spatial_res_block." for the temporal decoder, "" for the plain one.
RULES: list[tuple[str, str]] = [
    ("encoder.conv_in.{p}", "encoder.conv_in.{p}"),
    ("encoder.down.{i}.block.{j}.{n}.{p}", "encoder.down_blocks.{i}.resnets.{j}.{n}.{p}"),
    ("encoder.down.{i}.block.{j}.nin_shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}"),
    ("encoder.down.{i}.attn.{j}.{a}.{p}", "encoder.down_blocks.{i}.attentions.{j}.{A}.{p}"),
    ("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}"),
    ("encoder.mid.block_{m}.{n}.{p}", "encoder.mid_block.resnets.{M}.{n}.{p}"),
    ("encoder.mid.attn_1.{a}.{p}", "encoder.mid_block.attentions.0.{A}.{p}"),
    ("encoder.norm_out.{p}", "encoder.conv_norm_out.{p}"),
    ("encoder.conv_out.{p}", "encoder.conv_out.{p}"),
    ("decoder.conv_in.{p}", "decoder.conv_in.{p}"),
    ("decoder.mid.block_{m}.{n}.{p}", "decoder.mid_block.resnets.{M}.{S}{n}.{p}"),
    ("decoder.mid.block_{m}.time_stack.{t}.{p}", "decoder.mid_block.resnets.{M}.temporal_res_block.{T}.{p}"),
    ("decoder.mid.block_{m}.mix_factor", "decoder.mid_block.resnets.{M}.time_mixer.mix_factor"),
    ("decoder.mid.attn_1.{a}.{p}", "decoder.mid_block.attentions.0.{A}.{p}"),
    ("decoder.up.{u}.block.{j}.{n}.{p}", "decoder.up_blocks.{U}.resnets.{j}.{S}{n}.{p}"),
    ("decoder.up.{u}.block.{j}.nin_shortcut.{p}", "decoder.up_blocks.{U}.resnets.{j}.{S}conv_shortcut.{p}"),
    ("decoder.up.{u}.block.{j}.time_stack.{t}.{p}", "decoder.up_blocks.{U}.resnets.{j}.temporal_res_block.{T}.{p}"),
    ("decoder.up.{u}.block.{j}.mix_factor", "decoder.up_blocks.{U}.resnets.{j}.time_mixer.mix_factor"),
    ("decoder.up.{u}.attn.{j}.{a}.{p}", "decoder.up_blocks.{U}.attentions.{j}.{A}.{p}"),
    ("decoder.up.{u}.upsample.conv.{p}", "decoder.up_blocks.{U}.upsamplers.0.conv.{p}"),
    ("decoder.norm_out.{p}", "decoder.conv_norm_out.{p}"),
    ("decoder.conv_out.{p}", "decoder.conv_out.{p}"),
    ("decoder.conv_out.time_mix_conv.{p}", "decoder.time_conv_out.{p}"),
    ("quant_conv.{p}", "quant_conv.{p}"),
    ("post_quant_conv.{p}", "post_quant_conv.{p}"),
]


@functools.lru_cache(maxsize=None)
def _compile(template: str, spatial: str) -> tuple[re.Pattern, str]:
    template = template.replace("{S}", spatial)
    regex = ""
    for part in re.split(r"(\{\w\})", template):
        if re.fullmatch(r"\{\w\}", part):
            regex += f"(?P<{part[1]}>{_PATTERNS[part[1]]})"
        else:
            regex += re.escape(part)
    return re.compile(regex + r"\Z"), template


def _derive(values: dict[str, str], levels: int) -> dict[str, str]:
    """Fill in each placeholder's counterpart on the other side (sgm side -> diffusers side or back)."""
    v = dict(values)
    if "u" in v:
        v["U"] = str(levels - 1 - int(v["u"]))
    elif "U" in v:
        v["u"] = str(levels - 1 - int(v["U"]))
    if "m" in v:
        v["M"] = str(int(v["m"]) - 1)
    elif "M" in v:
        v["m"] = str(int(v["M"]) + 1)
    if "A" in v:  # from diffusers: accept the old names, write the current ones
        name = ATTN_OLD.get(v["A"]) or {d: s for s, d in ATTN.items()}[v["A"]]
        v["a"] = name
    if "a" in v:
        v["A"] = ATTN[v["a"]]
    if "t" in v:
        v["T"] = TIME[v["t"]]
    elif "T" in v:
        v["t"] = {d: s for s, d in TIME.items()}[v["T"]]
    return v


def _convert_key(key: str, levels: int, temporal: bool, to_diffusers: bool) -> str | None:
    spatial = "spatial_res_block." if temporal else ""
    for sgm_t, diff_t in RULES:
        src, dst = (sgm_t, diff_t) if to_diffusers else (diff_t, sgm_t)
        pattern, _ = _compile(src, spatial)
        match = pattern.match(key)
        if match:
            return _compile(dst, spatial)[1].format(**_derive(match.groupdict(), levels))
    return None


def count_levels(keys, prefix: str) -> int:
    """1 + the largest index i in keys `{prefix}{i}.…` (levels for 'encoder.down.', blocks for 'encoder.down.0.block.')."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def is_attention_weight(key: str) -> bool:
    """True for the weight of a spatial attention projection (q/k/v/proj_out in sgm naming)."""
    return bool(re.search(r"\.attn(?:_1|\.\d+)\.(?:q|k|v|proj_out)\.weight\Z", key))


def to_diffusers(state: dict[str, torch.Tensor], temporal: bool) -> dict[str, torch.Tensor]:
    """sgm/ldm keys (no prefix) -> diffusers keys; attention weights squeezed to [C, C]."""
    levels = count_levels(state, "encoder.down.")
    out = {}
    for key, value in state.items():
        if ".time_mix_block." in key or ".video_time_embed." in key or key.endswith("attn_1.mix_factor"):
            raise CheckpointError("temporal attention (time_mode 'all'/'attn-only') has no diffusers layout; "
                                  "convert with --to sgm")
        new = _convert_key(key, levels, temporal, to_diffusers=True)
        if new is None:
            raise CheckpointError(f"no diffusers name for key {key!r}")
        if is_attention_weight(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def from_diffusers(state: dict[str, torch.Tensor], temporal: bool) -> dict[str, torch.Tensor]:
    """diffusers keys -> sgm/ldm keys; attention weights unsqueezed to [C, C, 1, 1]."""
    levels = count_levels(state, "encoder.down_blocks.")
    out = {}
    for key, value in state.items():
        new = _convert_key(key, levels, temporal, to_diffusers=False)
        if new is None:
            raise CheckpointError(f"unknown diffusers key {key!r}")
        if is_attention_weight(new) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out
