"""Exact spatial tiles for the Wan decoder: the stem (conv1 and the middle with its whole-frame attention) runs
on whole frames at latent size, where it is cheap; the tail (the levels and the head, local in space) runs tile
by tile, each tile grown by the tail's halo and cropped back, each with a causal cache of its own, so the frames
equal the one-call decode.

Two orders: step by step (`decode_tiled`: every tile of a step, then the next step; every tile's caches alive
at once, memory constant in the clip's length) and tile-major (`decode_columns`: one tile through the whole
clip, then the next; one tile's caches alive, the clip's stem output and frames held). The causal caches (two
frames of every temporal convolution's input) are most of a large frame's decode, so only tile-major makes
tiles cheaper than whole frames.
"""

from __future__ import annotations

import torch

from vaecli.model.wan.conv import CL3
from vaecli.model.wan.modules import WanVAE
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.device import release_host_memory
from vaecli.ops.tiles import region, spans

SAMPLED = 3  # calls a priced (sampled) stem or tile visits: from the third on each allocates and frees the same


def tile_regions(height: int, width: int, tile: int, halo: int):
    """For a (height, width) latent plane cut in tiles of `tile` latent px: ((y0, y1, x0, x1), the tile's
    region grown by `halo` and clipped to the plane (ry0, ry1, rx0, rx1)) for every tile, row by row."""
    for y0, y1 in spans(height, tile):
        for x0, x1 in spans(width, tile):
            yield (y0, y1, x0, x1), region(y0, y1, x0, x1, halo, height, width)


def core(part: torch.Tensor, tile: tuple[int, int, int, int], ry0: int, rx0: int, f: int) -> torch.Tensor:
    """A tile's own pixels (y0, y1, x0, x1 in latent px) out of its decoded region, which starts at (ry0, rx0)."""
    y0, y1, x0, x1 = tile
    return part[..., (y0 - ry0) * f:(y1 - ry0) * f, (x0 - rx0) * f:(x1 - rx0) * f]


def tile_work(height: int, width: int, tile: int, halo: int) -> float:
    """The tail's computation in tiles of `tile` latent px over that on whole (height, width) frames: the tiles'
    regions (each grown by `halo`) over the frame."""
    area = sum((ry1 - ry0) * (rx1 - rx0) for _, (ry0, ry1, rx0, rx1) in tile_regions(height, width, tile, halo))
    return area / (height * width)


def decode_tiled(vae: WanVAE, z: torch.Tensor, state: dict, attention: AttentionBackend, tile: int,
                 halo: int | None = None, sample: bool = False) -> torch.Tensor:
    """Raw latents (B, z, t, h, w) of one chunk -> frames (B, 3, T, fh, fw) in [-1, 1], equal to
    `vae.decode_chunk`. `state` carries the causal caches between the chunks of one clip ("stem": the stem's;
    one per tile); `halo` (latent px; default the decoder's own) is for tests that show it is needed.

    sample: for pricing (counting execution, `vaecli.model.wan.memory`): of the tiles whose regions have the same
    shape, only the first and the last run; the others get caches shaped like the first's (what running them
    would leave) and leave their part of the frames unwritten. Every tile's caches stay alive to the end of the
    chunk, so the peak is at the last tile of some shape, with all earlier caches held: the sampled run has it."""
    halo = vae.decoder.halo() if halo is None else halo
    if halo is None:
        raise ValueError("this Wan decoder has attention in its levels; it decodes whole frames only")
    x = vae.decode_stem(z, state.setdefault("stem", {}), attention)
    f = vae.config.spatial_factor
    height, width = x.shape[-2:]
    regions = list(tile_regions(height, width, tile, halo))
    shape = [(ry1 - ry0, rx1 - rx0) for _, (ry0, ry1, rx0, rx1) in regions]
    first = {s: (y0, x0) for ((y0, _, x0, _), _), s in reversed(list(zip(regions, shape)))}  # its cache's key
    last = {s: k for k, s in enumerate(shape)}
    out = None
    for k, ((y0, y1, x0, x1), (ry0, ry1, rx0, rx1)) in enumerate(regions):
        cache = state.setdefault((y0, x0), {})
        if sample and (y0, x0) != first[shape[k]] and k != last[shape[k]]:
            # shaped like the first tile of this shape's caches (str: an upsampler's marker), replaced entry by
            # entry as running the tile replaces them (one entry's old and new alive at a time)
            for m, v in state[first[shape[k]]].items():
                cache[m] = v if isinstance(v, str) else torch.empty_like(v)
            continue
        part = vae.decode_tail(x[..., ry0:ry1, rx0:rx1], cache)
        if not sample:
            release_host_memory(part.device)  # the heap's holes between tiles (counting does not see them)
        if out is None:
            out = part.new_empty((*part.shape[:3], height * f, width * f))
        out[..., y0 * f:y1 * f, x0 * f:x1 * f] = core(part, (y0, y1, x0, x1), ry0, rx0, f)
    return out


def decode_columns(vae: WanVAE, z: torch.Tensor, attention: AttentionBackend, chunk: int, tile: int,
                   halo: int | None = None, sample: bool = False) -> torch.Tensor:
    """Raw latents (B, z, t, h, w) of a whole clip -> frames (B, 3, 1 + 4(t - 1), fh, fw) in [-1, 1], tile-major:
    the stem runs over the whole clip (`chunk` latent frames per call) into one stem output, then each tile runs
    through the whole clip, `chunk` latent frames per call, its causal cache dropped when it is done. The same
    calls on the same inputs as `decode_tiled` step by step (the same frames to rounding: the stem output is read
    back in slices), but only one tile's caches are alive at a time: what the caches of every tile at once cost the step-wise tiles (each with its halo), the stem
    output and the frames of the clip cost here (a latent frame's stem output and its four frames, so the memory
    grows with the clip's length).

    sample: for pricing (counting execution): the stem's first `SAMPLED` calls, and of the tiles with the same
    region shape only the first, through its first `SAMPLED` calls (from the third on every call allocates and
    frees the same, and each tile starts from nothing); the frames are allocated whole, mostly unwritten."""
    halo = vae.decoder.halo() if halo is None else halo
    if halo is None:
        raise ValueError("this Wan decoder has attention in its levels; it decodes whole frames only")
    steps = [(a, min(a + chunk, z.shape[2])) for a in range(0, z.shape[2], chunk)]
    visited = steps[:SAMPLED] if sample else steps
    cache: dict = {}
    stem = None
    for a, b in visited:
        part = vae.decode_stem(z[:, :, a:b], cache, attention)
        if stem is None:  # (B, C, t, h, w), frames one after another as the tiles read them
            stem = torch.empty((*part.shape[:2], z.shape[2], *part.shape[3:]), dtype=part.dtype, device=part.device,
                               memory_format=CL3)
        stem[:, :, a:b] = part
        del part
    del cache
    f, frames = vae.config.spatial_factor, vae.config.temporal_factor
    height, width = stem.shape[-2:]
    seen, out = set(), None
    for (y0, y1, x0, x1), (ry0, ry1, rx0, rx1) in tile_regions(height, width, tile, halo):
        if sample and (ry1 - ry0, rx1 - rx0) in seen:
            continue
        seen.add((ry1 - ry0, rx1 - rx0))
        cache, t = {}, 0
        for a, b in visited:
            part = vae.decode_tail(stem[:, :, a:b, ry0:ry1, rx0:rx1], cache)
            if out is None:
                out = part.new_empty((*part.shape[:2], 1 + frames * (z.shape[2] - 1), height * f, width * f))
            n = part.shape[2]
            out[:, :, t:t + n, y0 * f:y1 * f, x0 * f:x1 * f] = core(part, (y0, y1, x0, x1), ry0, rx0, f)
            t += n
            del part
        del cache
        if not sample:
            release_host_memory(out.device)
    return out
