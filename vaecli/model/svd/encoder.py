"""The 2D KL encoder (sgm `Encoder`) and its diagonal Gaussian posterior."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vaecli.model.svd.blocks import AttnBlock, Downsample, ResnetBlock, Stage
from vaecli.model.svd.config import VAEConfig
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.norm import norm_silu, spatial_norm


class EncoderLevel(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (after each block, if any), `downsample` (not last)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, downsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(channels[j], channels[j + 1]) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if with_attn else 0))
        if downsample:
            self.downsample = Downsample(out_channels)


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (shared shape by encoder and decoder)."""

    def __init__(self, block_1: nn.Module, attn_1: nn.Module, block_2: nn.Module):
        super().__init__()
        self.block_1 = block_1
        self.attn_1 = attn_1
        self.block_2 = block_2



class Encoder(nn.Module):
    """Frames (N, in_channels, H, W) in [-1, 1] -> moments (N, 2·z_channels, H/f, W/f), f = 2**(levels-1).

    conv_in -> per level: ResnetBlocks (+ AttnBlocks) and a Downsample except at the last level ->
    mid (ResnetBlock, AttnBlock, ResnetBlock) -> GroupNorm -> SiLU -> conv_out. Each frame is independent.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, kernel_size=3, padding=1)
        in_widths = [config.ch] + widths[:-1]
        self.down = nn.ModuleList(
            EncoderLevel(in_widths[i], widths[i], config.num_res_blocks, i in config.attn_levels, i != levels - 1)
            for i in range(levels)
        )
        top = widths[-1]
        self.mid = MidBlock(ResnetBlock(top, top), AttnBlock(top), ResnetBlock(top, top))
        self.norm_out = spatial_norm(top)
        self.conv_out = nn.Conv2d(top, 2 * config.z_channels, kernel_size=3, padding=1)

    def stages(self, attention: AttentionBackend) -> list[Stage]:
        """The encoder as a flat list of per-frame stages (see `Stage`); their `fn`s in order are the forward pass,
        every attention layer computed by `attention`."""
        out = [Stage("conv", self.conv_in, self.conv_in)]
        for level in self.down:
            for j, block in enumerate(level.block):
                out.append(Stage("resnet", block, block))
                if len(level.attn):
                    out.append(Stage("attn", level.attn[j], partial(level.attn[j], attention=attention)))
            if hasattr(level, "downsample"):
                out.append(Stage("downsample", level.downsample, level.downsample))
        out += [Stage("resnet", self.mid.block_1, self.mid.block_1), Stage("attn", self.mid.attn_1, partial(self.mid.attn_1, attention=attention)),
                Stage("resnet", self.mid.block_2, self.mid.block_2),
                Stage("norm_silu", self.norm_out, partial(norm_silu, self.norm_out)),
                Stage("conv", self.conv_out, self.conv_out)]
        return out

    def forward(self, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        h = x
        for stage in self.stages(attention):
            h = stage.fn(h)
        return h
