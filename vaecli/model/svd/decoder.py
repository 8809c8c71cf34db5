"""The decoder: the plain 2D `Decoder` (time_mode "image") and SVD's `VideoDecoder` modes, in one class.

Which block goes where, per time mode (sgm `VideoDecoder`'s `_make_resblock`, `_make_attn`, `_make_conv`):

| time_mode        | ResnetBlocks   | attention         | conv_out  |
|------------------|----------------|-------------------|-----------|
| image            | ResnetBlock    | AttnBlock         | Conv2d    |
| conv-only (SVD)  | VideoResBlock  | AttnBlock         | AE3DConv  |
| all              | VideoResBlock  | VideoBlock        | AE3DConv  |
| attn-only        | ResnetBlock    | VideoBlock        | Conv2d    |
| only-last-conv   | ResnetBlock    | AttnBlock         | AE3DConv  |
"""

from __future__ import annotations

from functools import partial
import torch
from torch import nn

from vaecli.model.svd.blocks import AttnBlock, Clips, ResnetBlock, Stage, Upsample, frame_batches, stage_groups
from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.encoder import MidBlock
from vaecli.model.svd.temporal import AE3DConv, VideoBlock, VideoResBlock
from vaecli.ops.norm import norm_silu, spatial_norm


class DecoderLevel(nn.Module):
    """One resolution level: `block` (num_res_blocks + 1 blocks), `attn` (if any), `upsample` (not at level 0)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if upsample is not None:
            self.upsample = upsample


class Decoder(nn.Module):
    """Latents (N, z_channels, h, w) -> frames (N, out_channels, h·f, w·f), ≈[-1, 1].

    conv_in -> mid -> levels from the lowest resolution up (`up[L-1]` first, as in ldm) -> GroupNorm -> SiLU
    -> conv_out. Temporal layers see N as clips of `clips.num_frames` frames (see `Clips`).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.time_mode = config.time_mode
        mode = config.time_mode
        temporal_res = mode in ("conv-only", "all")
        temporal_attn = mode in ("all", "attn-only")
        temporal_out = mode in ("conv-only", "all", "only-last-conv")

        def resblock(cin: int, cout: int) -> nn.Module:
            if temporal_res:
                return VideoResBlock(cin, cout, config.video_kernel_size, config.merge_strategy, config.alpha)
            return ResnetBlock(cin, cout)

        def attn(channels: int) -> nn.Module:
            if temporal_attn:
                return VideoBlock(channels, config.merge_strategy, config.alpha)
            return AttnBlock(channels)

        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        top = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, top, kernel_size=3, padding=1)
        self.mid = MidBlock(resblock(top, top), attn(top), resblock(top, top))
        up = []
        cin = top
        for i in reversed(range(levels)):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(resblock(cin, widths[i]))
                cin = widths[i]
            attns = [attn(cin) for _ in blocks] if i in config.attn_levels else []
            up.insert(0, DecoderLevel(blocks, attns, Upsample(cin) if i != 0 else None))
        self.up = nn.ModuleList(up)
        self.norm_out = spatial_norm(cin)
        if temporal_out:
            self.conv_out = AE3DConv(cin, config.out_channels, config.video_kernel_size)
        else:
            self.conv_out = nn.Conv2d(cin, config.out_channels, kernel_size=3, padding=1)

    def stages(self, clips: Clips) -> list[Stage]:
        """The decoder as a flat list of stages. Per-frame stages treat every frame alone (2D layers), the others
        mix the frames of a clip (temporal layers). Running their `fn`s in order is the forward pass; the streaming
        executor (`vaecli.model.svd.streaming`) runs the same layers piece by piece from `kind` and `layer`."""
        temporal = not clips.skip_video
        out: list[Stage] = [Stage("conv", self.conv_in, self.conv_in)]

        def add(layer: nn.Module) -> None:
            if isinstance(layer, VideoResBlock):
                out.append(Stage("resnet", layer, partial(ResnetBlock.forward, layer)))
                if temporal:
                    out.append(Stage("time_stack", layer, partial(layer.temporal, clips=clips)))
            elif isinstance(layer, AE3DConv):
                out.append(Stage("conv", layer, partial(nn.Conv2d.forward, layer)))
                if temporal:
                    out.append(Stage("time_mix", layer, partial(layer.temporal, clips=clips)))
            elif isinstance(layer, VideoBlock) and temporal:
                out.append(Stage("video_attn", layer, partial(layer, clips=clips)))
            elif isinstance(layer, AttnBlock):  # also a VideoBlock without clips (its AttnBlock part)
                out.append(Stage("attn", layer, partial(AttnBlock.forward, layer, attention=clips.attention)))
            elif isinstance(layer, ResnetBlock):
                out.append(Stage("resnet", layer, layer))
            elif isinstance(layer, Upsample):
                out.append(Stage("upsample", layer, layer))
            else:
                out.append(Stage("conv", layer, layer))

        for layer in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            add(layer)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                add(block)
                if len(level.attn):
                    add(level.attn[j])
            if hasattr(level, "upsample"):
                add(level.upsample)
        out.append(Stage("norm_silu", self.norm_out, partial(norm_silu, self.norm_out)))
        add(self.conv_out)
        return out

    def forward(self, z: torch.Tensor, clips: Clips) -> torch.Tensor:
        """z: (N, z_channels, h, w), clip-major. `clips.skip_video` decodes every frame alone, 2D only.

        Consecutive per-frame stages run together, `clips.frame_batch` frames at a time when set."""
        if z.shape[0] % clips.num_frames:
            raise ValueError(f"{z.shape[0]} frames do not split into clips of {clips.num_frames}")
        batch = clips.frame_batch
        h = z
        for run, stage in stage_groups(self.stages(clips)):
            h = frame_batches([s.fn for s in run], h, batch)
            if stage is not None:
                h = stage.fn(h)
        return h

