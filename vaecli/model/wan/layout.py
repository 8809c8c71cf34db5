"""The Wan family's checkpoint layouts: detection from keys only Wan has, the config from tensor shapes, writing.

Layouts read:
- `original`: the Wan release's names (ComfyUI's `wan_2.1_vae.safetensors`, Kijai's bf16/fp32 files, with or
  without a `model.` prefix);
- `diffusers`: `AutoencoderKLWan` (a file, or a folder with `diffusion_pytorch_model.safetensors` directly or
  in `vae/`, its `config.json` giving `latents_mean`/`latents_std`).
Both hold the Wan 2.1 VAE or the Wan 2.2 5B one (z = 48, residual levels, pixel patches of 2), told apart by shapes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vaecli.errors import CheckpointError
from vaecli.model.checkpoint import DIFFUSERS_FILES, read_tensors, write_checkpoint
from vaecli.model.wan.config import WanConfig, released_stats
from vaecli.model.wan.keymap import original_to_diffusers
from vaecli.model.wan.conv import conv_layout
from vaecli.model.wan.modules import WanVAE

PREFIXES = ("model.", "vae.", "")
MARKERS = {"original": ("decoder.middle.0.residual.0.gamma", "decoder.head.2.weight", "conv2.weight"),
           "diffusers": ("decoder.mid_block.resnets.0.norm1.gamma", "decoder.conv_out.weight",
                         "post_quant_conv.weight")}
LAYOUTS_TRIED = "original Wan (ComfyUI, Kijai), diffusers AutoencoderKLWan"


@dataclass(frozen=True)
class Layout:
    """naming: "original" or "diffusers"; prefix: stripped before reading."""

    naming: str
    prefix: str

    def describe(self) -> str:
        return f"{self.naming} Wan VAE, " + (f"prefix {self.prefix}" if self.prefix else "standalone")


def detect_layout(keys: frozenset[str]) -> Layout | None:
    """The layout of a file whose tensor names are `keys` if it holds a Wan VAE (its RMS-norm γ tensors are what
    no other family has), else None."""
    for prefix in PREFIXES:
        for naming, markers in MARKERS.items():
            if all(prefix + m in keys for m in markers):
                return Layout(naming, prefix)
    return None


def _indexed(keys, head: str) -> dict[int, set[str]]:
    """{N: the key tails under `head`N.} for the flat Sequential `head` (e.g. "encoder.downsamples.")."""
    found: dict[int, set[str]] = {}
    for k in keys:
        if k.startswith(head):
            n, _, rest = k[len(head):].partition(".")
            if n.isdigit():
                found.setdefault(int(n), set()).add(rest)
    return found


def infer_config(shapes: dict[str, tuple[int, ...]], name: str, mean=None, std=None) -> WanConfig:
    """The config of a Wan VAE in original naming from its tensor shapes: the structure (`structure`), then every
    tensor checked against the model that config builds."""
    config = structure(shapes, name, mean, std)
    expected = {k: tuple(v.shape) for k, v in _model_shapes(config).items()}
    if expected != shapes:
        missing = sorted(set(expected) - set(shapes))[:1] + sorted(set(shapes) - set(expected))[:1]
        odd = missing or sorted(k for k in shapes if shapes[k] != expected[k])[:1]
        raise CheckpointError(f"tensor {odd[0]} does not fit a Wan VAE of {config.dim} channels × "
                              f"{list(config.dim_mult)}, {config.num_res_blocks} blocks per level")
    return config


def _conv_shape(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    """A conv weight's shape (5-D, no zero sizes), else a CheckpointError naming the tensor."""
    if key not in shapes:
        raise CheckpointError(f"not a Wan VAE checkpoint: tensor {key} is missing")
    if len(shapes[key]) != 5 or 0 in shapes[key]:
        raise CheckpointError(f"tensor {key} has shape {list(shapes[key])}; a Wan VAE's is a 5-D conv weight")
    return shapes[key]


def _flat_levels(shapes, layers: dict[int, set[str]]) -> tuple[list[int], list[int], list[bool]]:
    """Wan 2.1's flat `encoder.downsamples.N` -> (widths, blocks per level, which downsamples halve time)."""
    if any("to_qkv.weight" in tails for tails in layers.values()):
        raise CheckpointError("a Wan VAE with attention inside the encoder levels is not supported")
    widths, blocks, temporal = [], [], []
    for n in sorted(layers):
        tails = layers[n]
        if "residual.2.weight" in tails:
            if not blocks or blocks[-1] == "closed":
                widths.append(_conv_shape(shapes, f"encoder.downsamples.{n}.residual.2.weight")[0])
                blocks.append(0)
            blocks[-1] += 1
        elif "resample.1.weight" in tails:
            temporal.append("time_conv.weight" in tails)
            blocks.append("closed")
        else:
            raise CheckpointError(f"not a Wan VAE checkpoint: encoder.downsamples.{n} is neither a block nor a "
                                  "resample")
    return widths, [b for b in blocks if b != "closed"], temporal


def _residual_levels(shapes, levels: dict[int, set[str]]) -> tuple[list[int], list[int], list[bool]]:
    """Wan 2.2's `encoder.downsamples.N.downsamples.M` -> (widths, blocks per level, which levels halve time)."""
    widths, counts, temporal = [], [], []
    for n in sorted(levels):
        inner = _indexed(shapes, f"encoder.downsamples.{n}.downsamples.")
        blocks = [m for m in sorted(inner) if "residual.2.weight" in inner[m]]
        if not blocks or blocks != list(range(len(blocks))) or sorted(inner) != list(range(len(inner))):
            raise CheckpointError(f"not a Wan VAE checkpoint: encoder.downsamples.{n} is not a level")
        widths.append(_conv_shape(shapes, f"encoder.downsamples.{n}.downsamples.0.residual.2.weight")[0])
        counts.append(len(blocks))
        resample = [m for m in inner if m not in blocks]
        if n != len(levels) - 1:
            if resample != [len(blocks)] or "resample.1.weight" not in inner[resample[0]]:
                raise CheckpointError(f"not a Wan VAE checkpoint: encoder.downsamples.{n} has no downsample")
            temporal.append("time_conv.weight" in inner[resample[0]])
        elif resample:
            raise CheckpointError("not a Wan VAE checkpoint: the last encoder level has a downsample")
    return widths, counts, temporal


def _shortcuts_fit(dim: int, decoder_dim: int, dim_mult: tuple[int, ...], temporal: list[bool]) -> bool:
    """Whether every Wan 2.2 shortcut splits channels evenly (each down level averages in·f/out values per output
    channel, each up level repeats every input channel out·f/in times; f = 4 in space, 8 with time), with widths
    dim·(1, *dim_mult) in the encoder and decoder_dim·dim_mult reversed in the decoder."""
    if decoder_dim < 1:
        return False
    enc = [dim * u for u in (1, *dim_mult)]
    dec = [decoder_dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    down = [4 * (2 if t else 1) for t in temporal] + [1]
    up = [4 * (2 if t else 1) for t in temporal[::-1]]
    return (all(a * f % b == 0 for a, b, f in zip(enc[:-1], enc[1:], down))
            and all(b * f % a == 0 for a, b, f in zip(dec[:-2], dec[1:-1], up)))


def structure(shapes: dict[str, tuple[int, ...]], name: str, mean=None, std=None) -> WanConfig:
    """The config implied by `encoder.conv1`, `conv2`, `decoder.conv1`, `decoder.head.2` and the encoder's levels
    (widths, blocks per level, which downsamples halve time; flat in 2.1, grouped in 2.2), in original naming;
    other tensors are not looked at."""
    dim, in_channels = _conv_shape(shapes, "encoder.conv1.weight")[:2]
    z_dim = _conv_shape(shapes, "conv2.weight")[0]
    layers = _indexed(shapes, "encoder.downsamples.")
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise CheckpointError("not a Wan VAE checkpoint: encoder.downsamples is not numbered 0..N-1")
    residual = any(t.startswith("downsamples.") for tails in layers.values() for t in tails)
    widths, counts, temporal = _residual_levels(shapes, layers) if residual else _flat_levels(shapes, layers)
    if not counts or len(set(counts)) != 1 or len(temporal) != len(counts) - 1 or any(w % dim for w in widths):
        raise CheckpointError("not a Wan VAE checkpoint: the encoder levels do not have one structure")
    patch = math.isqrt(in_channels // 3)
    out_channels = _conv_shape(shapes, "decoder.head.2.weight")[0]
    if 3 * patch * patch != in_channels or out_channels != in_channels or (patch > 1) != residual:
        raise CheckpointError(f"not a Wan VAE checkpoint: {in_channels} channels in and {out_channels} out are "
                              "not RGB pixels (3) or 2×2 patches of them (12, Wan 2.2)")
    dim_mult = tuple(w // dim for w in widths)
    decoder_dim = _conv_shape(shapes, "decoder.conv1.weight")[0] // dim_mult[-1]
    if residual and not _shortcuts_fit(dim, decoder_dim, dim_mult, temporal):
        raise CheckpointError("not a Wan 2.2 VAE checkpoint: its level widths do not fit its shortcuts")
    released = released_stats(z_dim)
    return WanConfig(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=counts[0],
                     temperal_downsample=tuple(temporal), in_channels=in_channels, out_channels=out_channels,
                     latents_mean=tuple(mean) if mean is not None else released[0],
                     latents_std=tuple(std) if std is not None else released[1], name=name, residual=residual,
                     patch_size=patch, decoder_dim=0 if decoder_dim == dim else decoder_dim)


def _model_shapes(config: WanConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return WanVAE(config).state_dict()


def _stats(config_json: dict, z_dim: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """latents_mean/std of a diffusers config.json when they are z_dim finite numbers (std > 0), else None."""
    def vector(key: str, positive: bool):
        v = config_json.get(key)
        if not isinstance(v, list) or len(v) != z_dim or not all(isinstance(x, (int, float)) for x in v):
            return None
        v = tuple(float(x) for x in v)
        return v if all(math.isfinite(x) and (x > 0 or not positive) for x in v) else None

    return vector("latents_mean", False), vector("latents_std", True)


def read_state(path: Path, layout: Layout, header: dict, config_json: dict):
    """-> (state in original naming, config, the file's dtypes of those tensors)."""
    names = [k for k in header if k.startswith(layout.prefix) and k != "__metadata__"]
    names = [k for k in names if re.match(r"(encoder|decoder|conv1|conv2|quant_conv|post_quant_conv)\b",
                                          k[len(layout.prefix):])]
    raw = read_tensors(path, header, names, layout.prefix)
    stem = path.parent.name if path.name in DIFFUSERS_FILES else path.stem
    if layout.naming == "diffusers":
        raw = _from_diffusers(raw)
    for k, v in raw.items():
        raw[k] = _owned(k, v)
    shapes = {k: tuple(v.shape) for k, v in raw.items()}
    z_dim = _conv_shape(shapes, "conv2.weight")[0] if "conv2.weight" in shapes else 16
    mean, std = _stats(config_json, z_dim) if layout.naming == "diffusers" else (None, None)
    config = infer_config(shapes, stem, mean, std)
    return raw, config, tuple(sorted({str(header[n]["dtype"]) for n in names}))


def _owned(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor read from the file, convolution weights laid out channels-last as the modules use them
    (`conv.channels_last_`: laid out here once, building the model copies nothing). Always a copy: the tensors
    read are views of one mapping of the whole file, which any one of them left alive would keep resident."""
    if name.endswith(".weight") and tensor.dim() in (4, 5):
        return torch.empty_like(tensor, memory_format=conv_layout(tensor)).copy_(tensor)
    return tensor.clone()


def _probe(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The encoder's diffusers names in original tails (conv1 -> residual.2), all `structure` reads: flat in 2.1
    (`down_blocks.N` -> `downsamples.N`), per level in 2.2 (`down_blocks.N.resnets.M` ->
    `downsamples.N.downsamples.M`, the level's `downsampler` after its last block)."""
    blocks: dict[str, int] = {}
    for k in shapes:
        found = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", k)
        if found:
            blocks[found[1]] = max(blocks.get(found[1], 0), int(found[2]) + 1)
    probe = {}
    for k, shape in shapes.items():
        level = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsampler)\.(.*)", k)
        if level:
            n, inner = level[1], level[3] if level[3] is not None else str(blocks.get(level[1], 0))
            k = f"encoder.downsamples.{n}.downsamples.{inner}.{level[4]}".replace(".conv1.", ".residual.2.")
        elif k.startswith("encoder.down_blocks."):
            k = "encoder.downsamples." + k[len("encoder.down_blocks."):].replace(".conv1.", ".residual.2.")
        probe[k] = shape
    return probe


def _from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original ones. The config (and with it the decoder's grouping) is inferred from the
    encoder, the latent convs and the decoder's first and last conv first."""
    renamed = {"encoder.conv_in.": "encoder.conv1.", "quant_conv.": "conv1.", "post_quant_conv.": "conv2.",
               "decoder.conv_in.": "decoder.conv1.", "decoder.conv_out.": "decoder.head.2."}
    shapes = {}
    for k, v in state.items():
        for old, new in renamed.items():
            if k.startswith(old):
                k = new + k[len(old):]
        shapes[k] = tuple(v.shape)
    config = structure(_probe(shapes), "probe")
    mapping = {d: o for o, d in original_to_diffusers(_model_shapes(config).keys(), config).items()}
    unknown = sorted(set(state) - set(mapping))
    if unknown:
        raise CheckpointError(f"unknown diffusers Wan key {unknown[0]!r}")
    return {mapping[k]: v for k, v in state.items()}


def diffusers_config(config: WanConfig) -> dict:
    """config.json of an `AutoencoderKLWan` folder."""
    out = {"_class_name": "AutoencoderKLWan", "base_dim": config.dim, "z_dim": config.z_dim,
           "dim_mult": list(config.dim_mult), "num_res_blocks": config.num_res_blocks, "attn_scales": [],
           "temperal_downsample": list(config.temperal_downsample), "dropout": 0.0,
           "latents_mean": list(config.latents_mean), "latents_std": list(config.latents_std)}
    if config.residual:
        out.update(decoder_base_dim=config.dec_dim, is_residual=True, in_channels=config.in_channels,
                   out_channels=config.out_channels, patch_size=config.patch_size,
                   scale_factor_spatial=config.spatial_factor, scale_factor_temporal=config.temporal_factor)
    return out


def save_checkpoint(state: dict[str, torch.Tensor], config: WanConfig, out: str | os.PathLike, *, layout: str,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a Wan state (original naming) as `layout` ("original" or "diffusers"; a diffusers name without
    .safetensors is a folder with config.json)."""
    if layout == "diffusers":
        mapping = original_to_diffusers(state.keys(), config)
        state = {mapping[k]: v for k, v in state.items()}
        return write_checkpoint(state, {"vaecli.family": "wan"}, out, layout=layout, overwrite=overwrite,
                                dtype=dtype, config_json=diffusers_config(config))
    return write_checkpoint(state, {"vaecli.family": "wan"}, out, layout=layout, overwrite=overwrite, dtype=dtype)


