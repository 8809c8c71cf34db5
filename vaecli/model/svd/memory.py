"""Activation memory computed from shapes: what the model's code allocates, without running it.

The planner needs the activation peak of many candidate plans. Tracing them on the meta device
(`vaecli.ops.memtrace`) follows the code exactly but costs about a second of torch's lazy imports on the first
meta operator plus a fraction of a second per candidate. This module replays the same allocations from shapes
alone, in microseconds: every tensor the code creates is allocated on a `Ledger` when the code creates it and
freed when its last reference goes, in the code's order, so the ledger's peak is the peak the trace measures.

What is replayed (each function mirrors the code named in its docstring, tensor by tensor):
- one-clip decode (`VAE.decode` → `Decoder.forward`, `frame_batches`, the blocks; 2D layers optionally
  `frame_batch` frames at a time) and whole-frame encode (`VAE.encode`);
- the streaming executor (`Streamer` with `sample_tiles`, as the planner traces it): its stores, frame chunks,
  tiles and halos, the statistics passes, the in-place temporal updates, parking.

The large tensors are replayed exactly; a few small ones (per-channel statistics) are replayed by size. Not
replayed — the planner traces these instead (`supported`): temporal attention (`VideoBlock`, time modes "all"
and "attn-only") and the math attention backend (its score matrices). The trace stays the oracle:
`tests/test_memory_model.py` compares the two over configs, dtypes, sizes and cuts.
"""

from __future__ import annotations

import torch
from torch import nn

from vaecli.model.svd.blocks import Clips, Stage, stage_groups
from vaecli.model.svd.streaming import Pieces, Streamer, grown, spans

Shape = tuple[int, int, int, int]  # (frames, channels, height, width)


def supported(config, backend_name: str) -> bool:
    """Whether this module prices `config` with `backend_name` (else the planner traces)."""
    return config.time_mode not in ("all", "attn-only") and backend_name != "math"


class Ledger:
    """A running sum of live bytes and its peak, overall ("") and per phase (as `memtrace.traced_peaks`)."""

    def __init__(self) -> None:
        self.current = 0
        self.phase = ""
        self.peaks: dict[str, int] = {"": 0}
        self.viewed: set[int] = set()

    def set_phase(self, name: str) -> None:
        """Start a phase; like the trace, it counts what is live at its first operator."""
        self.phase = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.current)

    def alloc(self, nbytes: int) -> int:
        self.current += nbytes
        if self.current > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.current
        self.peaks[""] = max(self.peaks[""], self.current)
        return nbytes

    def free(self, *sizes: int) -> None:
        self.current -= sum(sizes)

    def view(self, param: torch.Tensor, e: int) -> None:
        """A view of a parameter (a flattened 1x1 conv weight, a temporal conv's weight as matrices). The trace
        counts the storage of every tensor an operator returns that it has not seen yet, and a parameter's storage
        never dies, so from its first view on the parameter counts as live until the trace ends."""
        if id(param) not in self.viewed:
            self.viewed.add(id(param))
            self.alloc(param.numel() * e)


class Buf:
    """One storage and how many references hold it (variables, views, stored frames); freed at zero."""

    def __init__(self, ledger: Ledger, nbytes: int):
        self.ledger, self.nbytes, self.refs = ledger, nbytes, 1
        ledger.alloc(nbytes)

    def ref(self) -> "Buf":
        self.refs += 1
        return self

    def unref(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.ledger.free(self.nbytes)


def numel(shape: Shape) -> int:
    n, c, h, w = shape
    return n * c * h * w


def conv_shape(conv: nn.Conv2d, shape: Shape) -> Shape:
    n, _, h, w = shape
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return n, conv.out_channels, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def region_size(tile: tuple[int, int, int, int], halo: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) a stride-1 stage reads for output tile (y0, y1, x0, x1) with `halo`, clipped to the plane."""
    y0, y1, x0, x1 = tile
    ry0, ry1 = grown(y0, y1, halo, height)
    rx0, rx1 = grown(x0, x1, halo, width)
    return ry1 - ry0, rx1 - rx0


def weight_bytes(conv: nn.Module, e: int) -> int:
    return conv.weight.numel() * e + (conv.bias.numel() * e if conv.bias is not None else 0)


class Model:
    """The allocations of one model config at one dtype (element size `e` bytes)."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype):
        self.vae = vae
        self.config = vae.config
        self.e = torch.finfo(dtype).bits // 8
        self.half = dtype != torch.float32

    # -- one stage on whole frames (the input stays alive; the output is returned allocated) -----------------

    def stage(self, L: Ledger, stage: Stage, shape: Shape) -> tuple[Buf, Shape]:
        """A per-frame stage's `fn` on frames `shape` (N, C, H, W): `ResnetBlock.forward`, `AttnBlock.forward`,
        `Upsample`, `Downsample`, `norm_silu`, a Conv2d."""
        e, kind, layer = self.e, stage.kind, stage.layer
        n, c, h, w = shape
        if kind == "conv":
            out = conv_shape(layer, shape)
            return Buf(L, numel(out) * e), out
        if kind == "norm_silu":  # group_norm's output, SiLU in place
            return Buf(L, numel(shape) * e), shape
        if kind == "resnet":
            return self.resnet(L, layer, shape, shape, halo=0)
        if kind == "attn":  # norm; q, k, v; attention's output; then proj_out (the residual added in place)
            a = numel(shape) * e
            L.alloc(a)
            for conv in (layer.q, layer.k, layer.v):  # each a 1x1 conv through its flattened weight
                L.view(conv.weight, e)
                L.alloc(a)
            L.alloc(a)  # attention's output
            L.free(4 * a)
            L.view(layer.proj_out.weight, e)
            out = Buf(L, a)
            L.free(a)
            return out, shape
        if kind == "upsample":  # nearest ×2, then the conv
            up = (n, c, 2 * h, 2 * w)
            L.alloc(numel(up) * e)
            out = conv_shape(layer.conv, up)
            buf = Buf(L, numel(out) * e)
            L.free(numel(up) * e)
            return buf, out
        if kind == "downsample":  # zero pad right and bottom, then the stride-2 conv
            padded = (n, c, h + 1, w + 1)
            L.alloc(numel(padded) * e)
            out = conv_shape(layer.conv, padded)
            buf = Buf(L, numel(out) * e)
            L.free(numel(padded) * e)
            return buf, out
        raise ValueError(f"no memory model for stage kind {kind!r}")

    def resnet(self, L: Ledger, layer: nn.Module, shape: Shape, region: Shape, halo: int) -> tuple[Buf, Shape]:
        """`ResnetBlock.forward` on frames `shape` (halo 0), whose output is the input's size."""
        e = self.e
        x_in = numel(shape) * e
        out = (shape[0], layer.out_channels, shape[2], shape[3])
        a = numel(out) * e
        L.alloc(x_in)  # norm1 (SiLU in place)
        c1 = L.alloc(a)  # conv1
        L.free(x_in)
        L.alloc(a)  # norm2
        buf = Buf(L, a)  # conv2: the block's output
        L.free(c1, a)
        if layer.in_channels != layer.out_channels:  # the 1x1 shortcut, added in place to conv2's output
            L.view(layer.nin_shortcut.weight, e)
            L.alloc(a)
            L.free(a)
        return buf, out

    def chain(self, L: Ledger, stages: list[Stage], x: Buf, shape: Shape, keep_input: bool) -> tuple[Buf, Shape]:
        """Per-frame stages in turn (`frame_batches.apply`, `Streamer.spatial`'s chain): each intermediate is
        freed once the next stage has returned; the input too unless the caller still holds it."""
        for k, stage in enumerate(stages):
            y, shape = self.stage(L, stage, shape)
            if k > 0 or not keep_input:
                x.unref()
            x = y
        return x, shape

    def frame_batches(self, L: Ledger, stages: list[Stage], x: Buf, shape: Shape, batch: int | None
                      ) -> tuple[Buf, Shape, bool]:
        """`frame_batches`: returns (output, shape, whether the output is the input itself)."""
        n = shape[0]
        if not stages:
            return x, shape, True
        if batch is None or n <= batch:
            y, out = self.chain(L, stages, x, shape, keep_input=True)
            return y, out, False
        first, part = self.chain(L, stages, x, (batch, *shape[1:]), keep_input=True)
        out = Buf(L, n * part[1] * part[2] * part[3] * self.e)
        first.unref()
        for start in range(batch, n, batch):
            size = min(batch, n - start)
            y, _ = self.chain(L, stages, x, (size, *shape[1:]), keep_input=True)
            y.unref()
        return out, (n, *part[1:]), False

    # -- temporal stages on the whole clip (Decoder.forward) -----------------------------------------------

    def temporal_whole(self, L: Ledger, stage: Stage, shape: Shape, cl: bool) -> tuple[Buf | None, Shape]:
        """`VideoResBlock.temporal` or `AE3DConv.temporal` on the whole clip; returns (a new output, its shape),
        or (None, shape) when the result was accumulated into the input. cl: whether the input is channels-last
        (else, as conv outputs are on the meta device, viewing it as clips needs copies and time_stack cannot
        accumulate in place)."""
        e, layer = self.e, stage.layer
        a = numel(shape) * e
        if stage.kind == "time_stack":
            stack = layer.time_stack
            conv1, conv2 = stack.in_layers[2], stack.out_layers[3]
            alpha = L.alloc(e)  # blend_alpha(...).to(dtype)
            copy = L.alloc(0 if cl or shape[0] == 1 else a)  # clip_norm_silu's (b, t·H·W, 1, C) view of the input
            n1 = L.alloc(a)  # norm1 + SiLU
            L.free(copy)
            L.view(conv1.weight, e)
            c1 = L.alloc(a)  # conv1
            L.free(n1)
            n2 = L.alloc(a)  # norm2 + SiLU
            L.free(c1)
            scaled = L.alloc(weight_bytes(conv2, e))  # α folded into conv2's weights
            if cl:  # conv2 accumulated into the input
                L.free(scaled, n2, alpha)
                return None, shape
            copy = L.alloc(a)  # the residual as rows
            out = Buf(L, a)
            L.free(copy, scaled, n2, alpha)
            return out, shape
        if stage.kind == "time_mix":
            conv = layer.time_mix_conv
            out = (shape[0], conv.out_channels, shape[2], shape[3])
            copy = L.alloc(0 if cl else a)  # the input as rows
            L.view(conv.weight, e)
            buf = Buf(L, numel(out) * e)
            L.free(copy)
            return buf, out
        raise ValueError(f"no memory model for temporal stage kind {stage.kind!r}")

    # -- whole runs ----------------------------------------------------------------------------------------

    def _latents_copy(self, L: Ledger, shape: Shape) -> Buf | None:
        """`x.contiguous(memory_format=channels_last)` of an NCHW input: a copy unless the layouts coincide."""
        _, c, h, w = shape
        return Buf(L, numel(shape) * self.e) if c > 1 and h * w > 1 else None

    def decode(self, frames: int, h: int, w: int, frame_batch: int | None = None) -> int:
        """Peak bytes of `VAE.decode` of (frames, C, h, w) latents as one clip (the result included)."""
        L = Ledger()
        config = self.config
        shape: Shape = (frames, config.latent_channels, h, w)
        z = self._latents_copy(L, shape)
        if z is None:  # no copy: decode's input is the caller's (not counted)
            z = Buf(L, 0)
        if config.post_quant_conv:
            y, shape = self.stage(L, Stage("conv", self.vae.post_quant_conv, None), shape)
            z.unref()
            z = y
        clips = Clips(frames, skip_video=not config.is_video, frame_batch=frame_batch)
        x, cl = z, True
        for run, stage in stage_groups(self.vae.decoder.stages(clips)):
            y, shape, same = self.frame_batches(L, run, x, shape, frame_batch)
            if not same:
                if x is not z:
                    x.unref()
                # frame_batches' output is channels-last when batched; a conv's is not on the meta device
                cl = frame_batch is not None and shape[0] > frame_batch
            x = y
            if stage is None:
                break
            y, shape = self.temporal_whole(L, stage, shape, cl)
            if y is not None:
                if x is not z:
                    x.unref()
                x, cl = y, True
        return L.peaks[""]

    def encode(self, frames: int, height: int, width: int) -> int:
        """Peak bytes of `VAE.encode` of (frames, 3, height, width) frames in one call (the latents included)."""
        L = Ledger()
        config = self.config
        shape: Shape = (frames, config.in_channels, height, width)
        x = self._latents_copy(L, shape) or Buf(L, 0)
        stages = self.vae.encoder.stages(self.vae.attention)
        if config.quant_conv:
            stages.append(Stage("conv", self.vae.quant_conv, None))
        _, shape = self.chain(L, stages, x, shape, keep_input=True)
        L.alloc(numel(shape) * self.e // 2)  # the clamped log-variance (the mean is a view)
        return L.peaks[""]

    def stream(self, stage: str, frames: int, h: int, w: int, pieces: Pieces) -> dict[str, int]:
        """Peak device bytes of a streamed decode (or encode) as the planner traces it (`Streamer` with
        `sample_tiles`), overall ("") and per phase ("2d", "temporal", "out")."""
        return _Stream(self, pieces, stage, frames, h, w).run()


class _Store:
    """`FrameStore`'s memory: each frame's storage, and whether reads of it may be views (`_block_of`)."""

    def __init__(self, L: Ledger, count: int, park: bool, e: int):
        self.L, self.count, self.park, self.e = L, count, park, e  # e: bytes per element
        self.frames: list[Buf | None] = [None] * count
        self.viewable: list[bool] = [False] * count
        self.shape: tuple[int, int, int] | None = None

    def put(self, start: int, buf: Buf, shape: Shape, cl: bool = True) -> None:
        """`put`: frames share the block's storage (parked on meta: shapes only); a block that is not
        channels-last is stored as a channels-last copy."""
        self.shape = shape[1:]
        if self.park:
            return
        if not cl:
            buf = Buf(self.L, numel(shape) * self.e)
            buf.refs = 0
        for i in range(start, start + shape[0]):
            self.frames[i] = buf.ref()
            self.viewable[i] = True

    def allocate(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        if self.park:
            return
        for i in range(self.count):
            self.frames[i] = Buf(self.L, shape[0] * shape[1] * shape[2] * self.e)
            self.viewable[i] = True

    def subset(self, start: int, end: int) -> "_Store":
        sub = _Store(self.L, end - start, self.park, self.e)
        sub.shape = self.shape
        sub.frames = [f.ref() if f is not None else None for f in self.frames[start:end]]
        return sub

    def adopt(self, start: int, other: "_Store") -> None:
        self.shape = other.shape
        for i, f in enumerate(other.frames):
            self.frames[start + i] = f.ref() if f is not None else None
            self.viewable[start + i] = False

    def drop(self, start: int, end: int) -> None:
        for i in range(start, end):
            if self.frames[i] is not None:
                self.frames[i].unref()
            self.frames[i] = None
            self.viewable[i] = False

    def release(self) -> None:
        self.drop(0, self.count)

    def read(self, start: int, end: int, rows: int, cols: int, stash: bool = False) -> tuple[Buf, bool]:
        """`read` of frames [start, end), a rows × cols region: (storage, whether the piece is dense)."""
        c, height, width = self.shape
        first = self.frames[start]
        if (not self.park and not stash and self.viewable[start] and first is not None
                and all(self.viewable[i] and self.frames[i] is first for i in range(start, end))):
            return first.ref(), (rows, cols) == (height, width)
        return Buf(self.L, (end - start) * c * rows * cols * self.e), True


class _Stream:
    """`Streamer.run` with sample_tiles, replayed on a ledger."""

    def __init__(self, model: Model, pieces: Pieces, stage: str, frames: int, h: int, w: int):
        self.m, self.pieces, self.kind = model, pieces, stage
        self.frames, self.h, self.w = frames, h, w
        self.e = model.e
        f = model.config.downscale
        latent_hw = (h, w) if stage == "decode" else (h // f, w // f)
        self.geometry = Streamer(pieces, torch.device("meta"), latent_hw, sample_tiles=True)
        self.L = Ledger()
        self.stats_kept = 0  # bytes of statistics the current `Moments` holds (freed by `affine`)

    def store(self, count: int) -> _Store:
        return _Store(self.L, count, self.pieces.park, self.e)

    # -- small tensors ---------------------------------------------------------------------------------------

    def moments_add(self, shape: Shape, dense: bool, per_frame: bool, groups: int) -> None:
        """`Moments.add` of a piece: the fp32 pixels (a copy for half or non-dense pieces), per-channel sums,
        the deviations about the group means, and the fp64 statistics it keeps (freed by `affine`)."""
        L = self.L
        n, c = shape[0], shape[1]
        rows = n if per_frame else 1
        pixels = numel(shape) * 4 if (self.m.half or not dense) else 0
        L.alloc(pixels)
        sums = L.alloc(rows * c * 4)
        mean = L.alloc(rows * groups * 4)
        repeated = L.alloc(rows * c * 4)
        deviations = L.alloc(numel(shape) * 4)
        L.free(repeated)
        squares = L.alloc(rows * c * 4)
        m2 = L.alloc(rows * groups * 4)
        L.free(squares, deviations)
        kept = L.alloc(rows * groups * 16)  # mean and M2 in fp64
        L.free(mean, m2, sums, pixels)
        if per_frame or not self.stats_kept:
            self.stats_kept += kept
        else:  # merged into the statistics kept so far
            L.free(kept)

    def affine(self, rows: int, channels: int) -> int:
        """`Moments.affine`: frees the statistics, returns the bytes of (scale, shift) fp32 (kept by the caller)."""
        L = self.L
        kept = self.stats_kept
        self.stats_kept = 0
        L.alloc(rows * channels * 8 * 6)  # rstd, mean repeated, scale, shift in fp64, weights
        L.free(rows * channels * 8 * 6)
        L.free(kept)
        return L.alloc(rows * channels * 4 * 2)

    def affine_silu(self, shape: Shape) -> int:
        """`affine_silu`: returns the bytes of its output (allocated)."""
        L, a = self.L, numel(shape)
        if not self.m.half:
            return L.alloc(a * 4)
        L.alloc(a * 4)  # x.float()
        L.alloc(a * 4)  # addcmul
        L.free(a * 4)
        out = L.alloc(a * self.e)
        L.free(a * 4)
        return out

    # -- per-frame stages ------------------------------------------------------------------------------------

    def spatial(self, stages: list[Stage], store: _Store) -> _Store:
        L, e = self.L, self.e
        out = self.store(store.count)
        chunks = self.geometry.chunks(store.count)
        out_shape = None
        for k, (a, b) in enumerate(chunks):
            if out_shape is not None and not self.geometry.computed(k, len(chunks)):
                store.drop(a, b)
                shape = (b - a, *out_shape)
                buf = Buf(L, numel(shape) * e)
                out.put(a, buf, shape)
                buf.unref()
                continue
            if self.pieces.tile is None:
                c, height, width = store.shape
                x, _ = store.read(a, b, height, width)
                store.drop(a, b)
                y, shape = self.m.chain(L, stages, x, (b - a, c, height, width), keep_input=False)
                out.put(a, y, shape, cl=stages[-1].kind == "attn")  # conv outputs are channels-first on meta
                y.unref()
            else:
                part = store.subset(a, b)
                store.drop(a, b)
                for stage in stages:
                    new = self.tiled_stage(stage, part)
                    part.release()
                    part = new
                out.adopt(a, part)
                part.release()
                shape = (b - a, *part.shape)
            out_shape = shape[1:]
        return out

    def tiled_stage(self, stage: Stage, src: _Store) -> _Store:
        L, e, kind, layer = self.L, self.e, stage.kind, stage.layer
        n = src.count
        c, height, width = src.shape
        if kind == "attn":
            dst = self.store(n)
            for i in range(n):
                x, _ = src.read(i, i + 1, height, width)
                y, shape = self.m.stage(L, stage, (1, c, height, width))
                x.unref()
                dst.put(i, y, shape)
                y.unref()
            return dst
        if kind == "upsample":
            out = (layer.conv.out_channels, 2 * height, 2 * width)
        elif kind == "downsample":
            out = (layer.conv.out_channels, height // 2, width // 2)
        elif kind == "resnet":
            out = (layer.out_channels, height, width)
        elif kind == "norm_silu":
            out = (c, height, width)
        elif kind == "conv":
            out = (layer.out_channels, height, width)
        else:
            raise ValueError(f"no memory model for tiled stage kind {kind!r}")
        dst = self.store(n)
        dst.allocate(out)
        _, _, y0, y1, x0, x1 = self.geometry.tiles(out[1], out[2], self.pieces.tile)[0]

        def region(halo: int) -> tuple[int, int]:
            return region_size((y0, y1, x0, x1), halo, height, width)

        if kind == "norm_silu":
            scale = self.frame_moments(src, layer)
            x, _ = src.read(0, n, y1 - y0, x1 - x0)
            L.free(self.affine_silu((n, c, y1 - y0, x1 - x0)))
            x.unref()
            L.free(scale)
        elif kind == "conv":
            r, q = region(layer.kernel_size[0] // 2)
            x, _ = src.read(0, n, r, q)
            L.free(L.alloc(n * layer.out_channels * r * q * e))
            x.unref()
        elif kind == "upsample":
            ry0, ry1 = max(0, (y0 - 1) // 2), min(height, (y1 + 2) // 2)
            rx0, rx1 = max(0, (x0 - 1) // 2), min(width, (x1 + 2) // 2)
            r, q = ry1 - ry0, rx1 - rx0
            x, _ = src.read(0, n, r, q)
            L.alloc(n * c * 4 * r * q * e)
            L.free(L.alloc(n * layer.conv.out_channels * 4 * r * q * e), n * c * 4 * r * q * e)
            x.unref()
        elif kind == "downsample":
            ry1, rx1 = min(height, 2 * y1 + 1), min(width, 2 * x1 + 1)
            x, _ = src.read(0, n, ry1 - 2 * y0, rx1 - 2 * x0)
            padded = L.alloc(n * c * (2 * (y1 - y0) + 1) * (2 * (x1 - x0) + 1) * e)
            x.unref()
            L.free(L.alloc(n * out[0] * (y1 - y0) * (x1 - x0) * e), padded)
        else:
            self.tiled_resnet(layer, src, dst, (y0, y1, x0, x1))
        return dst

    def tiled_resnet(self, layer: nn.Module, src: _Store, dst: _Store, tile: tuple[int, int, int, int]) -> None:
        """`tiled_stage` for a ResnetBlock: norm1 statistics, conv1 per tile for norm2's, then the output."""
        L, e = self.L, self.e
        n = src.count
        c, height, width = src.shape
        cout = layer.out_channels
        y0, y1, x0, x1 = tile

        def region(halo: int) -> tuple[int, int]:
            return region_size((y0, y1, x0, x1), halo, height, width)

        s1 = self.frame_moments(src, layer.norm1)
        kept = None
        if self.pieces.keep:
            kept = self.store(n)
            kept.allocate((cout, height, width))
        r, q = region(1)
        x, _ = src.read(0, n, r, q)
        act = self.affine_silu((n, c, r, q))
        x.unref()
        conv1 = L.alloc(n * cout * r * q * e)
        L.free(act)
        self.moments_add((n, cout, y1 - y0, x1 - x0), (r, q) == (y1 - y0, x1 - x0), True, layer.norm2.num_groups)
        L.free(conv1)
        s2 = self.affine(n, cout)
        if kept is not None:
            k, _ = kept.read(0, n, r, q)
            act = self.affine_silu((n, cout, r, q))
            k.unref()
            h = L.alloc(n * cout * r * q * e)
            L.free(act)
            x, _ = src.read(0, n, r, q)
        else:
            r, q = region(2)
            x, _ = src.read(0, n, r, q)
            act = self.affine_silu((n, c, r, q))
            conv1 = L.alloc(n * cout * r * q * e)
            L.free(act)
            act = self.affine_silu((n, cout, r, q))
            L.free(conv1)
            h = L.alloc(n * cout * r * q * e)
            L.free(act)
        if layer.in_channels != cout:
            L.view(layer.nin_shortcut.weight, e)
            L.alloc(n * cout * r * q * e)  # the shortcut; the block's input region is dropped
            x.unref()
            x = Buf(L, 0)
            L.free(n * cout * r * q * e)
        x.unref()
        L.free(h, s1, s2)
        if kept is not None:
            kept.release()

    def frame_moments(self, src: _Store, norm: nn.GroupNorm) -> int:
        n = src.count
        c, height, width = src.shape
        _, _, y0, y1, x0, x1 = self.geometry.tiles(height, width, self.pieces.tile)[0]
        x, dense = src.read(0, n, y1 - y0, x1 - x0)
        self.moments_add((n, c, y1 - y0, x1 - x0), dense, True, norm.num_groups)
        x.unref()
        return self.affine(n, c)

    # -- temporal stages -------------------------------------------------------------------------------------

    def clip_moments(self, store: _Store, norm: nn.GroupNorm) -> int:
        c, height, width = store.shape
        _, _, y0, y1, x0, x1 = self.geometry.time_tiles(height, width)[0]
        chunks = self.geometry.time_chunks(store.count)
        for k, (a, b) in enumerate(chunks):
            if self.geometry.computed(k, len(chunks)):
                x, dense = store.read(a, b, y1 - y0, x1 - x0)
                self.moments_add((b - a, c, y1 - y0, x1 - x0), dense, False, norm.num_groups)
                x.unref()
        return self.affine(1, c)

    def time_stack(self, store: _Store, block: nn.Module) -> None:
        L, e = self.L, self.e
        stack = block.time_stack
        conv1, norm1, norm2 = stack.in_layers[2], stack.in_layers[0], stack.out_layers[0]
        conv2 = stack.out_layers[3]
        count = store.count
        c, height, width = store.shape
        halo = conv1.weight.shape[2] // 2
        tiles = self.geometry.time_tiles(height, width)
        _, _, y0, y1, x0, x1 = tiles[0]
        r, q = y1 - y0, x1 - x0
        s1 = self.clip_moments(store, norm1)
        chunks = self.geometry.time_chunks(count)
        alpha = L.alloc(e)  # blend_alpha(...).to(dtype)
        scaled = weight_bytes(conv2, e)
        if len(chunks) == 1 and self.geometry.tile_count(height, width, self.pieces.time_tile) == 1:
            x, _ = store.read(0, count, height, width)
            a = numel((count, c, height, width))
            act = self.affine_silu((count, c, height, width))
            L.view(conv1.weight, e)
            h = L.alloc(a * e)
            L.free(act)
            self.moments_add((count, c, height, width), True, False, norm2.num_groups)
            s2 = self.affine(1, c)
            g = self.affine_silu((count, c, height, width))
            L.free(s2)
            L.free(h)
            L.alloc(scaled)
            u = L.alloc(a * e)
            L.free(scaled, g)
            x.unref()
            L.free(u, s1, alpha)
            return
        for k, (a, b) in enumerate(chunks):
            if not self.geometry.computed(k, len(chunks)):
                continue
            lo, hi = grown(a, b, halo, count)
            x, _ = store.read(lo, hi, r, q)
            act = self.affine_silu((hi - lo, c, r, q))
            x.unref()
            L.view(conv1.weight, e)
            h = L.alloc((hi - lo) * c * r * q * e)
            L.free(act)
            self.moments_add((b - a, c, r, q), True, False, norm2.num_groups)
            L.free(h)
        s2 = self.affine(1, c)
        stash = None  # frames [s0, s1) of the tile kept aside before the previous chunk was overwritten
        for k, (a, b) in enumerate(chunks):
            stash, kept, done = self.stash(store, stash, b, 2 * halo, r, q)
            if self.geometry.computed(k, len(chunks)):
                lo2, hi2 = grown(a, b, 2 * halo, count)
                lo1, hi1 = grown(a, b, halo, count)
                x, _ = store.read(lo2, hi2, r, q, stash=kept)
                act = self.affine_silu((hi2 - lo2, c, r, q))
                h = L.alloc((hi2 - lo2) * c * r * q * e)
                L.free(act)
                g = self.affine_silu((hi1 - lo1, c, r, q))
                L.free(h)
                L.alloc(scaled)
                u = L.alloc((hi1 - lo1) * c * r * q * e)
                L.free(scaled)
                x.unref()
                L.free(g, u)
            L.free(done)
        L.free(self.stash(store, stash, count, 0, r, q)[2])
        L.free(s1, s2, alpha)

    def stash(self, store: _Store, previous: tuple[int, int] | None, b: int, span: int, r: int, q: int
              ) -> tuple[tuple[int, int] | None, bool, int]:
        """`original` before chunk [., b) is overwritten: frames [b - span, b) of the tile are cloned (those not
        already kept), then the previous chunk's kept frames that are not kept again are freed. Returns the new
        kept range, whether the read of this chunk involves kept frames, and the bytes of the previous kept
        frames to free once the chunk is done."""
        per_frame = store.shape[0] * r * q * self.e
        new = (max(0, b - span), min(store.count, b)) if b < store.count and not store.park else None

        def overlap(x, y):
            return 0 if x is None or y is None else max(0, min(x[1], y[1]) - max(x[0], y[0]))

        size = (new[1] - new[0]) if new else 0
        self.L.alloc((size - overlap(previous, new)) * per_frame)
        involved = previous is not None and previous[1] > previous[0]
        old = (previous[1] - previous[0]) if previous else 0
        return new, involved, (old - overlap(previous, new)) * per_frame

    def time_mix(self, store: _Store, layer: nn.Module) -> None:
        L, e = self.L, self.e
        conv = layer.time_mix_conv
        count = store.count
        c, height, width = store.shape
        halo = conv.weight.shape[2] // 2
        chunks = self.geometry.time_chunks(count)
        _, _, y0, y1, x0, x1 = self.geometry.time_tiles(height, width)[0]
        r, q = y1 - y0, x1 - x0
        stash = None
        for k, (a, b) in enumerate(chunks):
            stash, kept, done = self.stash(store, stash, b, halo, r, q)
            if self.geometry.computed(k, len(chunks)):
                lo, hi = grown(a, b, halo, count)
                x, dense = store.read(lo, hi, r, q, stash=kept)
                copy = L.alloc(0 if dense else (hi - lo) * c * r * q * e)  # the piece as rows
                L.view(conv.weight, e)
                L.free(L.alloc((hi - lo) * conv.out_channels * r * q * e), copy)
                x.unref()
            L.free(done)
        L.free(self.stash(store, stash, count, 0, r, q)[2])

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        L, m = self.L, self.m
        config = m.config
        if self.kind == "decode":
            shape: Shape = (self.frames, config.latent_channels, self.h, self.w)
            stages = m.vae.decoder.stages(Clips(self.frames, skip_video=not config.is_video))
            if config.post_quant_conv:
                stages.insert(0, Stage("conv", m.vae.post_quant_conv, None))
        else:
            shape = (self.frames, config.in_channels, self.h, self.w)
            stages = m.vae.encoder.stages(m.vae.attention)
            if config.quant_conv:
                stages.append(Stage("conv", m.vae.quant_conv, None))
        if self.kind == "decode":  # the latents' size once more, for the whole run: the trace measures up to that
            L.alloc(numel(shape) * self.e)  # much more in places (it counts a view of the caller's z as its storage)
        x = m._latents_copy(L, shape) or Buf(L, 0)
        store = self.store(self.frames)
        store.put(0, x, shape)
        x.unref()  # `del x`: the store holds the input now
        for run, stage in stage_groups(stages):
            if run:
                L.set_phase("2d")
                new = self.spatial(run, store)
                store.release()
                store = new
            if stage is None:
                break
            L.set_phase("temporal")
            if stage.kind == "time_stack":
                self.time_stack(store, stage.layer)
            elif stage.kind == "time_mix":
                self.time_mix(store, stage.layer)
            else:
                raise ValueError(f"no memory model for temporal stage kind {stage.kind!r}")
        if self.kind == "encode":  # gather(): the moments as one tensor
            c, height, width = store.shape
            store.read(0, store.count, height, width)
            return dict(L.peaks)
        # stream_frames: each chunk read (a view of its block, or a copy), then dropped; the previous chunk is
        # still referenced while the next is read
        previous = None
        c, height, width = store.shape
        for k, (a, b) in enumerate(spans(store.count, self.pieces.frames)):
            if k == 1:
                L.set_phase("out")
            y, _ = store.read(a, b, height, width) if not store.park else (Buf(L, (b - a) * c * height * width * self.e), True)
            store.drop(a, b)
            if previous is not None:
                previous.unref()
            previous = y
        return dict(L.peaks)
