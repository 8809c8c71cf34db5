"""The SVD family's checkpoint layouts: detection from keys, tensors in sgm naming, config from shapes, writing.

Layouts read (the prefix is found from the file, the naming from its keys):
- `sgm` checkpoint: a full SVD / SD checkpoint, VAE under `first_stage_model.` among UNet and conditioner tensors;
- `sgm` standalone: a ComfyUI / standalone VAE file, the same keys with no prefix (or a `vae.` prefix);
- `diffusers`: `AutoencoderKLTemporalDecoder` (SVD) or `AutoencoderKL` (SD/SDXL), a file or a folder holding
  `diffusion_pytorch_model.safetensors` (directly or in `vae/`), with its `config.json`;
- the plain image VAE of SD 1.x/2.x/SDXL in ldm naming (= sgm naming with quant_conv + post_quant_conv).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vaecli.errors import CheckpointError, UsageError
from vaecli.model.checkpoint import DIFFUSERS_FILES, read_tensors, write_checkpoint
from vaecli.model.svd import keymap
from vaecli.model.svd.config import VAEConfig, load_config, named_configs
from vaecli.model.svd.vae import VAE
from vaecli.ops import validate
from vaecli.ops.attention import AttentionBackend

PREFIXES = ("first_stage_model.", "vae.", "")
# Config names tried, in order, when a checkpoint's shapes match several named configs (SD and SDXL share shapes).
CONFIG_PREFERENCE = ("svd-vae", "sd-vae", "sdxl-vae")
LAYOUTS_TRIED = (
    "sgm/ComfyUI (encoder.*, decoder.*), full checkpoint (first_stage_model.*), vae.* prefix, "
    "diffusers (encoder.down_blocks.*, decoder.up_blocks.*)"
)
# keys only other families' files have beside `decoder.conv_in` / `decoder.mid_block` (Wan: RMS norm gammas, causal
# 3-D convs, a single-file qkv attention): such a file is never taken for an SVD/SD VAE
FOREIGN_KEY = re.compile(r"(\.gamma$|\.to_qkv\.|\.time_conv\.|^(?:.*\.)?decoder\.middle\.|\.resample\.)")


@dataclass(frozen=True)
class Layout:
    """Where and how a VAE is stored in a file.

    naming: "sgm" (sgm/ldm/ComfyUI names) or "diffusers"; prefix: stripped before mapping;
    temporal: the decoder has temporal layers.
    """

    naming: str
    prefix: str
    temporal: bool

    def describe(self) -> str:
        kind = "temporal VAE (SVD)" if self.temporal else "image VAE"
        where = {"first_stage_model.": "full checkpoint, prefix first_stage_model.", "vae.": "prefix vae.",
                 "": "standalone"}[self.prefix]
        return f"{self.naming} {kind}, {where}"


def detect_layout(keys) -> Layout | None:
    """The SVD/SD VAE among a file's keys (None: not this family's file). A decoder without an encoder is an
    error (SV3D checkpoints); files with keys only other families have are never claimed."""
    keys = set(keys)
    coder = tuple(p + part for p in PREFIXES + ("model.",) for part in ("encoder.", "decoder."))
    if any(FOREIGN_KEY.search(k) for k in keys if k.startswith(coder)):
        return None
    for prefix in PREFIXES:
        if prefix + "decoder.conv_in.weight" not in keys:
            continue
        if prefix + "encoder.conv_in.weight" not in keys:
            raise CheckpointError("the file holds a VAE decoder but no encoder (as SV3D checkpoints do); "
                                  "vaecli needs both")
        vae_keys = [k for k in keys if k.startswith(prefix + "decoder.")]
        if any(k.startswith(prefix + "decoder.mid_block.") for k in vae_keys):
            temporal = any(".spatial_res_block." in k or ".time_conv_out." in k for k in vae_keys)
            return Layout("diffusers", prefix, temporal)
        temporal = any(re.search(r"\.(mix_factor|time_stack\.|time_mix_conv\.|time_mix_block\.)", k) for k in vae_keys)
        return Layout("sgm", prefix, temporal)
    return None


def read_state(path: Path, layout: Layout, header: dict, metadata: dict[str, str], config_json: dict,
               config: VAEConfig | str | None = None) -> tuple[dict[str, torch.Tensor], VAEConfig, tuple[str, ...]]:
    """Read the VAE tensors of a checkpoint (only those) in sgm naming and work out its config -> (state, config,
    the file's dtypes of those tensors)."""
    vae_prefixes = tuple(layout.prefix + p for p in ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    names = [k for k in header if k.startswith(vae_prefixes)]
    raw = read_tensors(path, header, names, layout.prefix)
    state = keymap.from_diffusers(raw, layout.temporal) if layout.naming == "diffusers" else raw
    state = {k: v[:, :, None, None] if keymap.is_attention_weight(k) and v.ndim == 2 else v for k, v in state.items()}
    stem = path.parent.name if path.name in DIFFUSERS_FILES else path.stem
    scaling = config_json.get("scaling_factor")
    if scaling is not None:  # config.json is the user's file: a number in a sane range, or refused
        scaling = validate.number(scaling, f"{path.parent / 'config.json'}", "scaling_factor", 1e-6, 1e6)
    inferred = infer_config(state, _base_config(config, metadata), name=stem,
                            scaling_factor=scaling)
    dtypes = tuple(sorted({str(header[n]["dtype"]) for n in names}))
    return state, inferred, dtypes


def _base_config(config: VAEConfig | str | None, metadata: dict) -> VAEConfig | None:
    """The config the user named, else the one vaecli stored in the file's metadata, else None."""
    if isinstance(config, str):
        return load_config(config)
    if config is not None:
        return config
    if "vaecli.config" in metadata:
        try:
            return VAEConfig.from_dict(json.loads(metadata["vaecli.config"]))
        except (ValueError, TypeError, UsageError):
            pass  # foreign or older metadata: fall back to the shapes
    return None


# ----------------------------------------------------------------------------------------- config from shapes


def infer_config(state: dict[str, torch.Tensor], base: VAEConfig | None = None, name: str = "custom",
                 scaling_factor: float | None = None) -> VAEConfig:
    """Work out a VAEConfig from tensor shapes (sgm naming, no prefix).

    Shapes give channels, levels, blocks, z channels, time mode, video kernel size, attention levels and quant
    convs. The rest (scaling factor, merge strategy, name) comes from `base` (which must have the same
    architecture), else from the first named config with that architecture (and `scaling_factor`, e.g. from a
    diffusers config.json, when given), else defaults.
    """
    def shape(key: str, dims: int = 4) -> tuple[int, ...]:
        """The shape of a convolution's weight (4-D, or 5-D for a temporal one), checked before it is read."""
        if key not in state:
            raise CheckpointError(f"the VAE has no tensor {key!r}; the file is incomplete or not a supported VAE")
        found = tuple(state[key].shape)
        if len(found) != dims or 0 in found:
            raise CheckpointError(f"tensor {key!r} has shape {list(found)}, not that of a {dims}-D convolution "
                                  "weight; the tensors' shapes disagree (the file is damaged or not a supported VAE)")
        return found

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = keymap.count_levels(state, "encoder.down.")
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise CheckpointError(f"level widths {widths} are not multiples of the base width {ch}")
    num_res_blocks = keymap.count_levels(state, "encoder.down.0.block.")
    decoder_blocks = keymap.count_levels(state, "decoder.up.0.block.")
    if decoder_blocks != num_res_blocks + 1:
        raise CheckpointError(f"the decoder has {decoder_blocks} blocks per level and the encoder {num_res_blocks}; "
                              "vaecli supports decoders with one block more than the encoder, as in SD and SVD")
    z_channels = shape("decoder.conv_in.weight")[1]
    embed_dim = z_channels
    if "quant_conv.weight" in state:
        embed_dim = shape("quant_conv.weight")[0] // 2
    elif "post_quant_conv.weight" in state:
        embed_dim = shape("post_quant_conv.weight")[1]
    has = lambda pattern: any(re.search(pattern, k) for k in state)  # noqa: E731
    temporal_res = has(r"^decoder\..*\.time_stack\.")
    temporal_out = "decoder.conv_out.time_mix_conv.weight" in state
    temporal_attn = has(r"^decoder\..*\.time_mix_block\.")
    modes = {(False, False, False): "image", (True, True, False): "conv-only", (True, True, True): "all",
             (False, False, True): "attn-only", (False, True, False): "only-last-conv"}
    time_mode = modes.get((temporal_res, temporal_out, temporal_attn))
    if time_mode is None:
        raise CheckpointError("the decoder mixes temporal layers in a way no SVD time mode does "
                              f"(temporal ResnetBlocks {temporal_res}, temporal conv_out {temporal_out}, "
                              f"temporal attention {temporal_attn})")
    kernel = (3, 1, 1)
    for key in state:
        if key.endswith("time_stack.in_layers.2.weight") or key == "decoder.conv_out.time_mix_conv.weight":
            kernel = shape(key, 5)[2:]
            break
    found = VAEConfig(
        name=name,
        in_channels=in_channels,
        out_channels=shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
        attn_levels=tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state),
        time_mode=time_mode,
        video_kernel_size=kernel,
        quant_conv="quant_conv.weight" in state,
        post_quant_conv="post_quant_conv.weight" in state,
    )
    if base is not None:
        if base.architecture() != found.architecture():
            diffs = [f"{k} {v!r} (checkpoint: {found.architecture()[k]!r})"
                     for k, v in base.architecture().items() if found.architecture()[k] != v]
            raise CheckpointError(f"config {base.name!r} does not fit this checkpoint: " + "; ".join(diffs))
        return base
    named = _matching_named(found, scaling_factor)
    if named is not None:
        return named
    return found if scaling_factor is None else found.replace(scaling_factor=scaling_factor)


def _matching_named(found: VAEConfig, scaling_factor: float | None = None) -> VAEConfig | None:
    """The first named config with the architecture of `found` (and `scaling_factor`, when given).

    Quant convs do not count: the same SVD VAE has none in sgm files and an identity quant_conv in diffusers'.
    """
    configs = named_configs()
    order = [n for n in CONFIG_PREFERENCE if n in configs] + sorted(set(configs) - set(CONFIG_PREFERENCE))
    for name in order:
        c = configs[name].replace(quant_conv=found.quant_conv, post_quant_conv=found.post_quant_conv)
        if c.architecture() == found.architecture() and scaling_factor in (None, c.scaling_factor):
            return c
    return None


def build_vae(config: VAEConfig, state: dict[str, torch.Tensor], *, device: torch.device,
              dtype: torch.dtype, attention: AttentionBackend) -> VAE:
    """Build the model on the meta device and load `state` strictly (no random init that gets overwritten).

    Shapes are checked first so that a wrong tensor is named with both shapes.
    """
    vae = check_state(config, state, attention)
    loaded = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    vae.load_state_dict(loaded, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def check_state(config: VAEConfig, state: dict[str, torch.Tensor], attention: AttentionBackend | None = None) -> VAE:
    """The model of `config` on the meta device, after checking that `state` holds exactly its tensors with its
    shapes (a CheckpointError names the first that does not; also before a conversion)."""
    with torch.device("meta"):
        vae = VAE(config, attention or AttentionBackend("sdpa"))
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"the tensors do not match a {config.time_mode} VAE: " + "; ".join(parts))
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {key} has shape {list(state[key].shape)}, "
                                  f"the model needs {list(tensor.shape)}")
    return vae


def _is_identity_quant(state: dict[str, torch.Tensor]) -> bool:
    w, b = state.get("quant_conv.weight"), state.get("quant_conv.bias")
    if w is None or b is None or w.shape[0] != w.shape[1]:
        return False
    eye = torch.eye(w.shape[0], dtype=w.dtype)[:, :, None, None]
    return bool(torch.equal(w, eye) and torch.equal(b, torch.zeros_like(b)))


def diffusers_config(config: VAEConfig) -> dict:
    """config.json for diffusers' AutoencoderKLTemporalDecoder / AutoencoderKL."""
    common = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(config.ch_mult),
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.latent_channels,
        "scaling_factor": config.scaling_factor,
        "force_upcast": True,
    }
    if config.is_video:
        return {"_class_name": "AutoencoderKLTemporalDecoder", **common}
    return {"_class_name": "AutoencoderKL", **common, "up_block_types": ["UpDecoderBlock2D"] * len(config.ch_mult),
            "act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": config.quant_conv,
            "use_post_quant_conv": config.post_quant_conv}


def to_layout(state: dict[str, torch.Tensor], config: VAEConfig, to: str) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """Tensors in sgm naming -> the same VAE in layout `to` ("sgm" or "diffusers") and the config they describe."""
    state = dict(state)
    if to == "sgm":
        if config.is_video and _is_identity_quant(state) and not config.post_quant_conv:
            del state["quant_conv.weight"], state["quant_conv.bias"]  # diffusers' identity: sgm has none
            config = config.replace(quant_conv=False)
        return state, config
    if to != "diffusers":
        raise UsageError(f"unknown layout {to!r}; use sgm or diffusers")
    if config.time_mode not in ("image", "conv-only"):
        raise CheckpointError(f"diffusers has no model for time_mode {config.time_mode!r}; convert with --to sgm")
    if config.attn_levels:
        raise CheckpointError("diffusers' VAE blocks have no attention outside the mid block; convert with --to sgm")
    if config.is_video:
        if config.num_res_blocks != 2 or config.post_quant_conv:
            raise CheckpointError("diffusers' AutoencoderKLTemporalDecoder needs 2 ResnetBlocks per encoder level "
                                  "and no post_quant_conv; convert with --to sgm")
        if not config.quant_conv:  # diffusers always has one: add the identity
            c = 2 * config.z_channels
            state["quant_conv.weight"] = torch.eye(c, dtype=state["encoder.conv_out.weight"].dtype)[:, :, None, None]
            state["quant_conv.bias"] = torch.zeros(c, dtype=state["encoder.conv_out.bias"].dtype)
            config = config.replace(quant_conv=True)
    return keymap.to_diffusers(state, config.is_video), config


def save_checkpoint(state: dict[str, torch.Tensor], config: VAEConfig, out: str | os.PathLike, *, layout: str,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write tensors (already in `layout`) atomically.

    sgm: one safetensors file. diffusers: a `.safetensors` file, or a folder with `config.json` and
    `diffusion_pytorch_model.safetensors`. The vaecli config travels in the safetensors metadata.
    """
    metadata = {"vaecli.family": "svd", "vaecli.layout": layout, "vaecli.config": config.to_json()}
    return write_checkpoint(state, metadata, out, layout=layout, overwrite=overwrite, dtype=dtype,
                            config_json=diffusers_config(config) if layout == "diffusers" else None)


