"""The SVD family behind the family seam: the SVD temporal VAE and the SD/SDXL image VAEs.

`SVDFamily` reads the sgm/ComfyUI, full-checkpoint and diffusers layouts (`layout`), builds `VAE` and describes
it; `SVDCodec` is the loaded model as the pipeline sees it: spatial factor 2**(levels-1), one latent frame per
frame, latents stored × `scaling_factor`, plans from `planning`, encode/decode as the plan says (the attention
backend travels in the plan; the modules keep none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from vaecli.errors import InputError
from vaecli.model.checkpoint import read_checkpoint
from vaecli.model.family import Checkpoint, Codec, Family, FrameRule, Normalization
from vaecli.model.plan import Budget, Plan
from vaecli.model.svd import layout as svd_layout
from vaecli.model.svd import planning
from vaecli.model.svd.config import VAEConfig, load_config, named_configs
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend, resolve_attention
from vaecli.ops.scratch import Scratch

FRAME_OUT = 4  # frames per block handed from a streamed decode to the writer


class SVDCodec(Codec):
    """A loaded SVD/SD VAE (`vae`, weights on `device` in `dtype`), or one on the meta device that prices plans for
    `device` (not resident)."""

    family = "svd"

    def __init__(self, vae: VAE, name: str, hash: str, source: Path | None = None, config_arg=None,
                 device: torch.device | None = None):
        self.vae = vae
        self.config: VAEConfig = vae.config
        self.name, self.hash = name, hash
        param = next(vae.parameters())
        self.resident = param.device.type != "meta"
        self.device, self.dtype = device or param.device, param.dtype
        self.spatial_factor = self.config.downscale
        self.frame_rule = FrameRule(1)
        self.latent_channels = self.config.latent_channels
        self.in_channels = self.config.in_channels
        self.normalization = Normalization("scale", self.config.scaling_factor)
        self._source, self._config_arg = source, config_arg
        self._estimator: planning.Estimator | None = None

    # -- what the pipeline asks ------------------------------------------------------------------------------

    def check_size(self, width: int, height: int, where: str) -> None:
        """Multiples of the spatial factor, and not so small that a GroupNorm would normalise single values (torch
        refuses that: every group needs two values; only tiny models at a few pixels get there)."""
        super().check_size(width, height, where)
        cfg = self.config
        for level, mult in enumerate(cfg.ch_mult):
            channels, pixels_at = cfg.ch * mult, max(1, width >> level) * max(1, height >> level)
            if channels // 32 * pixels_at < 2:
                raise InputError(f"{where}: frames of {width}x{height} are too small for model {cfg.name} "
                                 "(a normalisation would see one value); use larger frames or --size")

    def weights_bytes(self) -> int:
        return self.estimator().weights()

    def input_device(self, plan: Plan) -> torch.device:
        return torch.device("cpu") if plan.pieces is not None and plan.pieces.park else self.device

    def metadata(self) -> dict[str, str]:
        return {"time_mode": self.config.time_mode}

    def estimator(self) -> planning.Estimator:
        """The cost model of this config and dtype (memoised: OOM retries and later files reuse its prices)."""
        if self._estimator is None:
            self._estimator = planning.Estimator(self.config, self.dtype, device_type=self.device.type, vae=self.vae)
        return self._estimator

    def plan_decode(self, frames: int, latent_hw: tuple[int, int], budget: Budget, *, attention: str = "auto",
                    chunk: int | None = None, overlap: int | None = None, tile: int | None = None) -> Plan:
        return planning.plan_decode(self.config, frames, latent_hw, device=budget.device, dtype=self.dtype,
                                    available_bytes=budget.activation_bytes, attention=attention, chunk=chunk,
                                    overlap=overlap, tile=tile, estimator=self.estimator(),
                                    host_bytes=budget.host_bytes, disk_bytes=budget.disk_bytes,
                                    scratch=budget.scratch)

    def plan_encode(self, frames: int, size_hw: tuple[int, int], budget: Budget, *, attention: str = "auto",
                    batch: int | None = None) -> Plan:
        return planning.plan_encode(self.config, frames, size_hw, device=budget.device, dtype=self.dtype,
                                    available_bytes=budget.activation_bytes, attention=attention, batch=batch,
                                    estimator=self.estimator(), host_bytes=budget.host_bytes)

    def moments(self, x: torch.Tensor, plan: Plan, clip: dict | None = None) -> torch.Tensor:
        """Frames (n, 3, H, W) (on the device, or the host for parked tiles) -> moments (n, 2C, h, w) on the device."""
        return self.vae.moments(x.to(self.dtype), pieces=plan.pieces, attention=plan.attention).to(self.device)

    def decode(self, z: torch.Tensor, plan: Plan, *, check_finite: bool = False,
               clip: dict | None = None) -> Iterator[torch.Tensor]:
        """One clip of raw latents (t, C, h, w) -> its frames: one block (one-clip plans) or FRAME_OUT at a time."""
        z = z.to(self.input_device(plan), self.dtype)
        if plan.pieces is None:
            yield self.vae.decode(z, num_frames=z.shape[0], frame_batch=plan.frame_batch, attention=plan.attention)
            return
        if not plan.pieces.disk:
            for _, x in self.vae.decode_stream(z, plan.pieces, check_finite=check_finite, out_chunk=FRAME_OUT,
                                               attention=plan.attention):
                yield x
            return
        with Scratch(plan.scratch) as scratch:  # removed when the decode ends, fails or is abandoned
            for _, x in self.vae.decode_stream(z, plan.pieces, check_finite=check_finite, out_chunk=FRAME_OUT,
                                               attention=plan.attention, scratch=scratch):
                yield x

    def in_dtype(self, dtype: torch.dtype) -> "SVDCodec":
        """The same checkpoint in `dtype`, read again (a bf16 redo of an fp16 model is the checkpoint in bf16, not
        the fp16 weights re-rounded; the state is not kept in memory meanwhile); a copy cast when there is no file."""
        if dtype == self.dtype:
            return self
        if self._source is None:
            import copy

            vae = copy.deepcopy(self.vae).to(dtype)
        else:
            ckpt = read_checkpoint(self._source, self._config_arg)
            vae = svd_layout.build_vae(ckpt.config, ckpt.state, device=self.device, dtype=dtype,
                                       attention=self.vae.attention)
        return SVDCodec(vae, self.name, self.hash, self._source, self._config_arg, self.device)


class SVDFamily(Family):
    name = "svd"
    title = "SVD temporal VAE / SD image VAE"
    layouts = svd_layout.LAYOUTS_TRIED

    def claims(self, keys: frozenset[str]):
        return svd_layout.detect_layout(keys)

    def read(self, path: Path, layout, header: dict, metadata: dict[str, str], config_json: dict, config) -> Checkpoint:
        state, inferred, dtypes = svd_layout.read_state(path, layout, header, metadata, config_json, config)
        return Checkpoint(path, self, layout, state, inferred, dtypes, dict(metadata))

    def load_config(self, name_or_path: str) -> VAEConfig | None:
        if name_or_path.endswith(".toml") or name_or_path in named_configs():
            return load_config(name_or_path)
        return None

    def named(self) -> list[str]:
        return sorted(named_configs())

    def build(self, ckpt: Checkpoint | None, *, device: torch.device, dtype: torch.dtype, attention: str = "auto",
              config: VAEConfig | None = None, name: str | None = None, hash: str | None = None) -> SVDCodec:
        backend = resolve_attention(attention, device, dtype)
        if ckpt is None:
            with torch.device("meta"):
                vae = VAE(config, backend).to(dtype).eval().requires_grad_(False)
            return SVDCodec(vae, name or config.name, hash or "", device=device)
        vae = svd_layout.build_vae(ckpt.config, ckpt.state, device=device, dtype=dtype, attention=backend)
        return SVDCodec(vae, name or ckpt.config.name, hash or "", ckpt.path, ckpt.config)

    def module(self, ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype,
               attention: AttentionBackend) -> VAE:
        return svd_layout.build_vae(ckpt.config, ckpt.state, device=device, dtype=dtype, attention=attention)

    def describe(self, ckpt: Checkpoint) -> tuple[dict, list[str]]:
        cfg = ckpt.config
        fields = {"layout": ckpt.layout.naming, "prefix": ckpt.layout.prefix,
                  "latent_channels": cfg.latent_channels, "scaling_factor": cfg.scaling_factor,
                  "time_mode": cfg.time_mode, "spatial_factor": cfg.downscale, "frame_rule": FrameRule(1).to_dict(),
                  "normalization": Normalization("scale", cfg.scaling_factor).to_dict()}
        lines = [
            f"config:      {cfg.name}  (time_mode {cfg.time_mode}, ch {cfg.ch}, ch_mult {list(cfg.ch_mult)}, "
            f"{cfg.num_res_blocks} res blocks, attention levels {list(cfg.attn_levels) or 'mid only'})",
            f"latents:     {cfg.latent_channels} channels, 1/{cfg.downscale} size, scaling factor {cfg.scaling_factor}",
            f"temporal:    kernel {list(cfg.video_kernel_size)}, merge {cfg.merge_strategy}" if cfg.is_video
            else "temporal:    none (frames coded independently)",
            f"quant convs: quant_conv {'yes' if cfg.quant_conv else 'no'}, "
            f"post_quant_conv {'yes' if cfg.post_quant_conv else 'no'}",
        ]
        return fields, lines

    def convert(self, ckpt: Checkpoint, out, *, to: str, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
        to = to or "sgm"
        if to not in ("sgm", "diffusers"):
            from vaecli.errors import UsageError

            raise UsageError(f"--to must be sgm or diffusers for an SVD/SD VAE, not {to!r}")
        svd_layout.check_state(ckpt.config, ckpt.state)  # a missing or misshapen tensor is named, not a KeyError
        state, new_config = svd_layout.to_layout(ckpt.state, ckpt.config, to)
        return svd_layout.save_checkpoint(state, new_config, out, layout=to, overwrite=overwrite, dtype=dtype)
