"""Exact streaming execution: the decoder (and encoder) run layer by layer over pieces of a clip.

One-clip decoding holds every intermediate of the whole clip at once. Here the clip's activation between two
stages is kept once (`store.FrameStore`: frames on the compute device, or parked in host memory) and every stage runs
over it in **pieces** — frame chunks, spatial tiles, or both (`Pieces`) — so the memory is the stored clip plus
one piece's work. The result equals the one-clip decode up to rounding, because every piece sees what the
one-clip computation sees:

- per-frame (2D) stages on whole frames are exact in frame chunks as they are; consecutive per-frame stages run
  as one chain per chunk, so nothing between two temporal stages is stored for the whole clip;
- in spatial tiles, a piece reads a halo around its tile (1 pixel per 3x3 conv, taken at the lower resolution for
  `Upsample`, 2 for a ResnetBlock's two convs), computes on the enlarged region, whose convolutions zero-pad only
  where the region meets the frame's edge, and keeps its tile;
- every GroupNorm normalises with the statistics of everything it normalises in one-clip decoding (spatial norms:
  the whole frame; temporal norms: the whole clip), gathered in a pass over the pieces before the pass that
  applies them: each piece contributes its count, mean and sum of squared deviations about its own mean, in fp32,
  combined exactly in fp64 (Chan et al.: M2 = Σ M2_i + Σ n_i (mean_i - mean)²) — the clip's variance about the
  global mean, not a mean of per-piece variances;
- temporal (k, 1, 1) convolutions read k//2 frames of halo on each side. A `time_stack` whose second norm needs
  the statistics of its first convolution's output recomputes that convolution per piece (cheaper than storing a
  second clip-sized tensor): pass 1 gathers the input's statistics, pass 2 computes conv1 for statistics, pass 3
  computes conv1 again (2 frames of halo) and the block's output;
- attention runs per frame over the whole frame (the mid block is at the latent resolution), and a VideoBlock's
  attention along time runs per pixel tile over all frames (tokens are independent across pixels).

Temporal stages write their output in place (the input frames a later piece still needs as halo are kept aside
first); per-frame stages write new frames and drop the old ones chunk by chunk.

Layouts: frames are `(N, C, H, W)` channels-last (memory order N, H, W, C); temporal pieces are viewed as
`(1, t, H, W, C)` for `vaecli.ops.conv.temporal_conv` without copies.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vaecli.model.svd.blocks import Clips, Stage, pointwise, stage_groups
from vaecli.model.svd.temporal import blend_alpha, frame_embedding, image_frames_alpha
from vaecli.model.family import NonFiniteActivation
from vaecli.ops.tiles import grown, region, spans
from vaecli.ops.attention import AttentionBackend
from vaecli.model.svd.pieces import Pieces
from vaecli.model.svd.store import CL, FrameStore, Moments, affine_silu
from vaecli.ops.conv import temporal_conv


def temporal(x: torch.Tensor, conv: nn.Conv3d, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A (k, 1, 1) Conv3d along the frames of a piece (t, C, h, w), zero-padded at the piece's ends."""
    clip = x.permute(0, 2, 3, 1)[None]  # (t, C, h, w) channels-last -> (1, t, h, w, C), a view
    out = temporal_conv(clip, conv.weight, conv.bias, scale=scale)
    return out[0].permute(0, 3, 1, 2)  # (t, C, h, w) channels-last, a view


# ----------------------------------------------------------------------------------------------- the executor


class Streamer:
    """Runs stages over a `FrameStore` in pieces. `latent_hw`: the latent size (tiles scale from it).

    check_finite: raise `NonFiniteActivation` when a half-precision piece holds inf/NaN.
    sample_tiles: for pricing (counting execution, `vaecli.model.svd.memory`, or a meta trace): visit only the
        first tile of every tile loop and an interior one (the largest region with its halos), and compute only
        the first two and the last two frame chunks (the others' outputs are allocated, not computed). Tiles are
        computed one after another into storage allocated before the loop, so the largest sets the peak; across
        chunks the stored bytes change linearly, so the peak is at the first or the last full chunk. Pricing then
        takes a fraction of the time; full runs are the tests' check of this (`tests/test_memory_model.py`).
    """

    def __init__(self, pieces: Pieces, device: torch.device, latent_hw: tuple[int, int], check_finite: bool = False,
                 sample_tiles: bool = False, phase: Callable[[str], None] | None = None,
                 attention: AttentionBackend | None = None, scratch=None):
        self.attention = attention or AttentionBackend("sdpa")  # a VideoBlock's spatial attention (the stages'
        # own attention layers carry their backend in their `fn`)
        self.phase = phase or (lambda name: None)  # told "2d" / "temporal" as each kind of stage starts
        self.pieces = pieces
        self.device = device
        self.latent_h = latent_hw[0]
        self.check_finite = check_finite
        self.sample_tiles = sample_tiles
        self.scratch = scratch  # where `pieces.disk` keeps the clip: a `vaecli.ops.scratch.Scratch` (or its
        # counting twin)
        if pieces.disk and scratch is None:
            raise ValueError("Pieces.disk needs a scratch folder")

    # -- helpers ----------------------------------------------------------------------------------------------

    def store(self, count: int) -> FrameStore:
        """An empty store of `count` frames where the pieces keep the clip (device, host or scratch files)."""
        return FrameStore(count, self.device, self.pieces.park, self.scratch if self.pieces.disk else None)

    def tiles(self, height: int, width: int, tile: int | None, band: bool = False
              ) -> list[tuple[slice, slice, int, int, int, int]]:
        """Non-overlapping tiles of a (height, width) plane: (rows, cols, y0, y1, x0, x1); `tile` in latent px
        (band: `tile` rows, the whole width)."""
        rows, cols = self.plane_spans(height, width, tile, band)
        if self.sample_tiles:  # the first tile (full size, halo on one side) and an interior one (halos around)
            picks = sorted({(0, 0), (min(1, len(rows) - 1), min(1, len(cols) - 1))})
            return [(slice(*rows[i]), slice(*cols[j]), *rows[i], *cols[j]) for i, j in picks]
        return [(slice(y0, y1), slice(x0, x1), y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]

    def tile_spans(self, length: int, tile: int | None, height: int | None = None) -> list[tuple[int, int]]:
        """The tile spans along one axis of a plane `height` rows high (default: `length`); `tile` in latent px,
        scaled by the plane's size over the latent size, so every level is cut the same way."""
        side = None if tile is None else max(1, tile * (height or length) // self.latent_h)
        return spans(length, side)

    def plane_spans(self, height: int, width: int, tile: int | None, band: bool = False
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The row spans and column spans of a plane's tiles (band: the whole width)."""
        return self.tile_spans(height, tile), self.tile_spans(width, None if band else tile, height)

    def tile_count(self, height: int, width: int, tile: int | None, band: bool = False) -> int:
        """How many tiles `tiles` cuts a plane into (also when a trace samples only the first)."""
        rows, cols = self.plane_spans(height, width, tile, band)
        return len(rows) * len(cols)

    def checked(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_finite and x.dtype != torch.float32 and not bool(torch.isfinite(x).all()):
            raise NonFiniteActivation("inf/NaN in a half-precision piece")
        return x

    def chunks(self, count: int) -> list[tuple[int, int]]:
        """Frame chunks of the per-frame stages."""
        return spans(count, self.pieces.frames)

    def time_chunks(self, count: int) -> list[tuple[int, int]]:
        """Frame pieces of the temporal stages."""
        return spans(count, self.pieces.time_frames)

    def time_tiles(self, height: int, width: int) -> list[tuple[slice, slice, int, int, int, int]]:
        return self.tiles(height, width, self.pieces.time_tile, self.pieces.band)

    # -- per-frame stages --------------------------------------------------------------------------------------

    def spatial(self, stages: list[Stage], store: FrameStore, norm: nn.GroupNorm | None = None
                ) -> tuple[FrameStore, Moments | None]:
        """Run consecutive per-frame stages over the clip, chunk by chunk; returns the new clip store and, when
        `norm` (the next temporal stage's clip-wide GroupNorm) is given, that norm's statistics of it, gathered
        from each chunk as it is computed (one pass over the stored clip fewer).

        Whole frames: the stages run as one chain on each chunk. Tiles: each stage runs tile by tile over the
        chunk (its output for the chunk kept where the clip is kept), with halos and whole-frame statistics."""
        out = self.store(len(store))
        chunks = self.chunks(len(store))
        moments = None if norm is None else Moments(norm.num_groups, per_frame=False)
        shape, dtype = None, None  # a computed chunk's output, for the sampled chunks after it
        for k, (a, b) in enumerate(chunks):
            if shape is not None and not self.computed(k, chunks):  # sampled: allocate as computed, do not compute
                store.drop(a, b)
                if self.pieces.tile is None:
                    out.put(a, torch.empty((b - a, *shape), dtype=dtype, device=self.device, memory_format=CL))
                else:  # tiled stages leave one tensor per frame
                    part = self.store(b - a)
                    part.allocate(*shape, dtype)
                    out.adopt(a, part)
                continue
            if self.pieces.tile is None:
                x = store.read(a, b)
                store.drop(a, b)
                for stage in stages:
                    x = self.checked(stage.fn(x))
                shape, dtype = x.shape[1:], x.dtype
                for i in range(b - a) if moments is not None else ():  # a frame at a time: small fp32 temporaries
                    moments.add(x[i:i + 1])
                out.put(a, x)
                del x
            else:
                part = store.subset(a, b)
                store.drop(a, b)
                for stage in stages:
                    part = self.tiled_stage(stage, part)
                shape, dtype = part.shape(), part.dtype()
                if moments is not None:
                    for rows, cols, *_ in self.tiles(*shape[1:], self.pieces.tile):
                        moments.add(part.read(0, b - a, rows, cols))
                out.adopt(a, part)
                del part
        return out, moments

    def computed(self, k: int, chunks: list[tuple[int, int]]) -> bool:
        """Whether chunk k of `chunks` is computed: always, except in sampled runs (see `sample_tiles`), which
        compute the first two (the second is the first to read kept halo frames) and the last two."""
        n = len(chunks)
        return not self.sample_tiles or k in (0, 1, n - 2, n - 1)

    def stashes(self, k: int, chunks: list[tuple[int, int]]) -> bool:
        """Whether chunk k of a temporal pass keeps the next chunk's halo frames aside before overwriting them:
        when there is a next chunk and it or this one is computed (a sampled run skips the others' copies too)."""
        return k + 1 < len(chunks) and (self.computed(k, chunks) or self.computed(k + 1, chunks))

    def tiled_stage(self, stage: Stage, src: FrameStore) -> FrameStore:
        n = len(src)
        c, height, width = src.shape()
        layer = stage.layer
        if stage.kind == "attn":  # whole frames
            dst = self.store(n)
            for i in range(n):
                dst.put(i, self.checked(stage.fn(src.read(i, i + 1))))
            return dst
        if stage.kind == "upsample":
            out_h, out_w, out_c = 2 * height, 2 * width, layer.conv.out_channels
        elif stage.kind == "downsample":
            out_h, out_w, out_c = height // 2, width // 2, layer.conv.out_channels
        elif stage.kind == "resnet":
            out_h, out_w, out_c = height, width, layer.out_channels
        elif stage.kind == "norm_silu":
            out_h, out_w, out_c = height, width, c
        elif stage.kind == "conv":
            out_h, out_w, out_c = height, width, layer.out_channels
        else:
            raise ValueError(f"no tiled implementation for stage kind {stage.kind!r}")
        dst = self.store(n)
        dst.allocate(out_c, out_h, out_w, src.dtype())
        tiles = self.tiles(out_h, out_w, self.pieces.tile)
        if stage.kind == "norm_silu":
            stats = self.frame_moments(src, layer)
            for rows, cols, *_ in tiles:
                dst.write(0, self.checked(affine_silu(src.read(0, n, rows, cols), stats)), rows, cols)
        elif stage.kind == "conv":
            halo = layer.kernel_size[0] // 2
            for rows, cols, y0, y1, x0, x1 in tiles:
                ry0, ry1, rx0, rx1 = region(y0, y1, x0, x1, halo, height, width)
                y = nn.Conv2d.forward(layer, src.read(0, n, slice(ry0, ry1), slice(rx0, rx1)))
                dst.write(0, self.checked(y[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]), rows, cols)
                del y  # (every tile loop frees its piece before the next one is computed)
        elif stage.kind == "upsample":
            for rows, cols, y0, y1, x0, x1 in tiles:
                # output rows [y0, y1) read upsampled rows [y0 - 1, y1 + 1): input rows [(y0-1)//2, ceil((y1+1)/2))
                ry0, ry1 = max(0, (y0 - 1) // 2), min(height, (y1 + 2) // 2)
                rx0, rx1 = max(0, (x0 - 1) // 2), min(width, (x1 + 2) // 2)
                y = layer(src.read(0, n, slice(ry0, ry1), slice(rx0, rx1)))  # rows [2·ry0, 2·ry1)
                dst.write(0, self.checked(y[:, :, y0 - 2 * ry0:y1 - 2 * ry0, x0 - 2 * rx0:x1 - 2 * rx0]), rows, cols)
                del y
        elif stage.kind == "downsample":
            for rows, cols, y0, y1, x0, x1 in tiles:
                # output row i reads input rows 2i..2i+2; the row past the bottom (and column past the right) is the
                # block's own zero padding
                ry1, rx1 = min(height, 2 * y1 + 1), min(width, 2 * x1 + 1)
                part = src.read(0, n, slice(2 * y0, ry1), slice(2 * x0, rx1))
                part = F.pad(part, (0, 2 * x1 + 1 - rx1, 0, 2 * y1 + 1 - ry1))
                dst.write(0, self.checked(layer.conv(part)), rows, cols)
                del part
        else:
            self.tiled_resnet(layer, src, dst, tiles)
        return dst

    def tiled_resnet(self, layer: nn.Module, src: FrameStore, dst: FrameStore, tiles: list) -> None:
        """A ResnetBlock over a chunk tile by tile into `dst` (allocated): norm1 statistics of x, norm2 statistics
        of conv1's output (kept for the chunk when `pieces.keep`, else recomputed with a 2-pixel halo)."""
        n = len(src)
        _, height, width = src.shape()
        out_c, out_h, out_w = dst.shape()
        s1 = self.frame_moments(src, layer.norm1)
        m2 = Moments(layer.norm2.num_groups, per_frame=True)
        kept = None
        if self.pieces.keep:
            kept = self.store(n)
            kept.allocate(out_c, out_h, out_w, src.dtype())
        for rows, cols, y0, y1, x0, x1 in tiles:
            ry0, ry1, rx0, rx1 = region(y0, y1, x0, x1, 1, height, width)
            h = layer.conv1(affine_silu(src.read(0, n, slice(ry0, ry1), slice(rx0, rx1)), s1))
            h = h[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
            m2.add(h)
            if kept is not None:
                kept.write(0, h, rows, cols)
            del h
        s2 = m2.affine(layer.norm2)
        for rows, cols, y0, y1, x0, x1 in tiles:
            if kept is not None:  # conv1's output with a 1-pixel halo, as computed above
                ry0, ry1, rx0, rx1 = region(y0, y1, x0, x1, 1, height, width)
                h = layer.conv2(affine_silu(kept.read(0, n, slice(ry0, ry1), slice(rx0, rx1)), s2))
                x = src.read(0, n, slice(ry0, ry1), slice(rx0, rx1))
            else:
                ry0, ry1, rx0, rx1 = region(y0, y1, x0, x1, 2, height, width)
                x = src.read(0, n, slice(ry0, ry1), slice(rx0, rx1))
                h = layer.conv2(affine_silu(layer.conv1(affine_silu(x, s1)), s2))
            if layer.in_channels != layer.out_channels:
                x = pointwise(layer.nin_shortcut, x)
            y = h.add_(x)[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
            del x
            dst.write(0, self.checked(y), rows, cols)
            del h, y

    def frame_moments(self, src: FrameStore, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame statistics of a chunk store, gathered tile by tile, as (scale, shift)."""
        n = len(src)
        _, height, width = src.shape()
        moments = Moments(norm.num_groups, per_frame=True)
        for rows, cols, *_ in self.tiles(height, width, self.pieces.tile):
            moments.add(src.read(0, n, rows, cols))
        return moments.affine(norm)

    # -- temporal stages ---------------------------------------------------------------------------------------

    def clip_moments(self, store: FrameStore, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics of the whole clip (a temporal GroupNorm), gathered piece by piece."""
        _, height, width = store.shape()
        moments = Moments(norm.num_groups, per_frame=False)
        chunks = self.time_chunks(len(store))
        for a, b in [c for k, c in enumerate(chunks) if self.computed(k, chunks)]:
            for rows, cols, *_ in self.time_tiles(height, width):
                moments.add(store.read(a, b, rows, cols))
        return moments.affine(norm)

    def time_stack(self, store: FrameStore, block: nn.Module, alpha_frames: torch.Tensor | None,
                   carried: Moments | None = None) -> None:
        """A VideoResBlock's temporal half, in place: x + α·conv2(silu(norm2(conv1(silu(norm1(x)))))) per clip.

        alpha_frames: α per frame (T,) where frames are flagged as images, else None (the block's α).
        carried: norm1's statistics of the clip, gathered by the stage that wrote it (else a pass gathers them)."""
        stack = block.time_stack
        norm1, conv1 = stack.in_layers[0], stack.in_layers[2]
        norm2, conv2 = stack.out_layers[0], stack.out_layers[3]
        count = len(store)
        _, height, width = store.shape()
        halo = conv1.weight.shape[2] // 2
        tiles = self.time_tiles(height, width)
        s1 = carried.affine(norm1) if carried is not None else self.clip_moments(store, norm1)
        moments = Moments(norm2.num_groups, per_frame=False)
        chunks = self.time_chunks(count)
        scalar = None
        if alpha_frames is None:
            scalar = blend_alpha(block.mix_factor, block.merge_strategy).to(store.dtype())
        one_tile = self.tile_count(height, width, self.pieces.time_tile, self.pieces.band) == 1
        if len(chunks) == 1 and one_tile:  # one piece: no recompute
            self.time_stack_whole(store, stack, s1, moments, scalar, alpha_frames)
            return
        for k, (a, b) in enumerate(chunks):
            lo, hi = grown(a, b, halo, count)
            for rows, cols, *_ in (tiles if self.computed(k, chunks) else []):
                h = temporal(affine_silu(store.read(lo, hi, rows, cols), s1), conv1)
                moments.add(h[a - lo:b - lo])
                del h
        s2 = moments.affine(norm2)
        # tile-major: a tile goes through all frame chunks before the next tile, so only its region of the frames
        # the next chunk reads as halo is kept aside before the chunk is overwritten
        for rows, cols, *_ in tiles:
            stash: dict[int, torch.Tensor] = {}
            for k, (a, b) in enumerate(chunks):
                keep = store.original(b - 2 * halo, b, stash, rows, cols) if self.stashes(k, chunks) else {}
                if self.computed(k, chunks):
                    lo2, hi2 = grown(a, b, 2 * halo, count)
                    lo1, hi1 = grown(a, b, halo, count)
                    x = store.read(lo2, hi2, rows, cols, stash)
                    h = temporal(affine_silu(x, s1), conv1)[lo1 - lo2:hi1 - lo2]
                    g = affine_silu(h, s2)
                    del h
                    if scalar is not None:
                        u = temporal(g, conv2, scale=scalar)[a - lo1:b - lo1]
                    else:
                        u = temporal(g, conv2)[a - lo1:b - lo1] * alpha_frames[a:b].to(g)[:, None, None, None]
                    out = x[a - lo2:b - lo2]
                    if store.holds(out, a):  # x is a view of the stored frames: add the update in place
                        self.checked(out.add_(u))
                    else:
                        store.write(a, self.checked(u.add_(out)), rows, cols)
                    del x, g, u, out
                stash = keep
            del stash, keep

    def time_stack_whole(self, store: FrameStore, stack: nn.Module, s1, moments: Moments, scalar, alpha_frames) -> None:
        """`time_stack` when one piece is the whole clip: as the one-clip block (conv1's output kept, conv2
        accumulated into the clip's frames), with norm2's statistics from a pass over conv1's output. When the
        stored frames are not one tensor, reading them is a copy: the result is computed into that copy and
        written back (the store keeps its blocks, so the next per-frame stage frees the clip chunk by chunk)."""
        conv1, conv2, norm2 = stack.in_layers[2], stack.out_layers[3], stack.out_layers[0]
        x = store.read(0, len(store))
        held = store.holds(x, 0)
        h = temporal(affine_silu(x, s1), conv1)
        moments.add(h)
        g = affine_silu(h, moments.affine(norm2))
        del h
        if scalar is not None and x.is_contiguous(memory_format=CL):
            clip = g.permute(0, 2, 3, 1)[None]
            temporal_conv(clip, conv2.weight, conv2.bias, into=x.permute(0, 2, 3, 1)[None], scale=scalar)
        else:
            u = temporal(g, conv2, scale=scalar) if scalar is not None else \
                temporal(g, conv2) * alpha_frames.to(g)[:, None, None, None]
            x.add_(u)
            del u
        del g
        self.checked(x)
        if not held:
            store.write(0, x)

    def time_mix(self, store: FrameStore, layer: nn.Module) -> None:
        """AE3DConv's time_mix_conv over the clip, in place (no residual)."""
        conv = layer.time_mix_conv
        count = len(store)
        _, height, width = store.shape()
        halo = conv.weight.shape[2] // 2
        chunks = self.time_chunks(count)
        for rows, cols, *_ in self.time_tiles(height, width):  # tile-major, as in time_stack
            stash: dict[int, torch.Tensor] = {}
            for k, (a, b) in enumerate(chunks):
                keep = store.original(b - halo, b, stash, rows, cols) if self.stashes(k, chunks) else {}
                if self.computed(k, chunks):
                    lo, hi = grown(a, b, halo, count)
                    y = temporal(store.read(lo, hi, rows, cols, stash), conv)[a - lo:b - lo]
                    store.write(a, self.checked(y), rows, cols)
                    del y
                stash = keep
            del stash, keep

    def video_attn(self, store: FrameStore, block: nn.Module, alpha_frames: torch.Tensor | None) -> None:
        """A VideoBlock, in place: spatial attention per frame (stored for the clip), then attention along time per
        pixel tile over all frames, blended and projected."""
        count = len(store)
        _, height, width = store.shape()
        attended = self.store(count)
        for a, b in self.chunks(count):
            attended.put(a, self.checked(block.attend(store.read(a, b), self.attention)))
        frames = torch.arange(count, device=self.device)
        emb = block.video_time_embed(frame_embedding(frames, block.channels).to(store.dtype()))  # (T, C)
        if alpha_frames is None:
            alpha = blend_alpha(block.mix_factor, block.merge_strategy).to(store.dtype())
        else:
            alpha = alpha_frames.to(device=self.device, dtype=store.dtype())[:, None, None]  # (T, 1, 1)
        for rows, cols, y0, y1, x0, x1 in self.time_tiles(height, width):
            x = store.read(0, count, rows, cols)
            h = rearrange(attended.read(0, count, rows, cols), "n c h w -> n (h w) c")
            mixed = block.time_mix_block(h + emb[:, None, :], count, self.attention)
            h = alpha * h + (1.0 - alpha) * mixed
            del mixed
            out = block.project(rearrange(h, "n (h w) c -> n c h w", h=y1 - y0, w=x1 - x0).contiguous(memory_format=CL), x)
            del h, x
            store.write(0, self.checked(out), rows, cols)
            del out

    # -- whole runs --------------------------------------------------------------------------------------------

    def run(self, stages: list[Stage], x: torch.Tensor, image_only: torch.Tensor | None = None) -> FrameStore:
        """Run `stages` over the clip x (T, C, H, W) (on the device or the host); returns the output store."""
        store = self.store(x.shape[0])
        store.put(0, x)
        del x
        for run, stage in stage_groups(stages):
            carried = None
            if run:
                self.phase("2d")
                norm = stage.layer.time_stack.in_layers[0] if stage is not None and stage.kind == "time_stack" else None
                store, carried = self.spatial(run, store, norm)
            if stage is None:
                break
            self.phase("temporal")
            alpha_frames = self.image_alpha(stage, image_only)
            if stage.kind == "time_stack":
                self.time_stack(store, stage.layer, alpha_frames, carried)
            elif stage.kind == "time_mix":
                self.time_mix(store, stage.layer)
            elif stage.kind == "video_attn":
                self.video_attn(store, stage.layer, alpha_frames)
            else:
                raise ValueError(f"unknown stage kind {stage.kind!r}")
        return store

    def image_alpha(self, stage: Stage, image_only: torch.Tensor | None) -> torch.Tensor | None:
        """α per frame for "learned_with_images" blocks when frames are flagged as images, else None."""
        layer = stage.layer
        if image_only is None or getattr(layer, "merge_strategy", None) != "learned_with_images":
            return None
        alpha = blend_alpha(layer.mix_factor, layer.merge_strategy)
        value = 0.0 if stage.kind == "time_stack" else 1.0  # images take the spatial branch of both blends
        return image_frames_alpha(alpha, Clips(len(image_only), image_only=image_only), value)


def stream_frames(store: FrameStore, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The store's frames in order, `chunk` at a time, as (start, (n, C, H, W)); each is dropped once handed out."""
    for a, b in spans(len(store), chunk):
        x = store.read(a, b) if not store.park else torch.cat(store.frames[a:b])
        store.drop(a, b)
        yield a, x

