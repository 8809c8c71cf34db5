"""The memory planner: a cost model for encode and decode, and the plan (attention backend, windows, tiles).

Cost model (`vaecli.model.svd.estimator`). The activation peak of a decode or encode is computed from shapes
(`vaecli.model.svd.memory`: the model's own allocations replayed on a ledger, microseconds per candidate) or,
where that model does not cover the config or backend, traced on the meta device (`ops.memtrace`, the computed
model's oracle); a device-specific
`CostModel` turns it into predicted bytes: `scale · peak + overhead` (allocator rounding, kernel workspaces),
calibrated by `scripts/calibrate_memory.py`.

Plan. Decode strategies, tried in order unless forced, each with the attention backends fastest first:
1. "one-clip": all frames at once (exact);
2. "stream": the exact streaming executor (`vaecli.model.svd.streaming`): the clip's activation kept once between
   layers, every layer run in pieces — frame chunks, then tiles, then the clip parked in host memory, the first
   cut that fits (exact: the same frames as one clip within rounding). Its memory is what a trace of the executor
   with one representative piece per loop (`sample_tiles`) measures, computed;
3. "windows": cross-faded temporal windows (approximate). Only when the user forces them (`--chunk N
   --overlap K`), or as the fallback when even the host cannot hold the clip's activation; the fallback's window
   and overlap are fixed (`FALLBACK_WINDOW`, `FALLBACK_OVERLAP`), never sized from free memory, so its pixels do
   not depend on the machine either. Each window is itself decoded exactly (one clip or streamed).
Encode plans a batch size, and exact tiles (parked where needed) for frames too large to encode whole.
"""

from __future__ import annotations

import torch

from vaecli.errors import BackendError, UsageError
from vaecli.model.plan import COST_MODELS, CostModel, Plan, format_bytes
from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.estimator import Estimator
from vaecli.model.svd.streaming import Pieces
from vaecli.ops.attention import BACKEND_NAMES, AttentionBackend, unavailable_reason
from vaecli.ops.device import dtype_name

AUTO_ORDER = ("sdpa", "math", "split", "sub-quadratic")  # fastest first; math only wins where sdpa is missing
MIN_TILE = 4  # smallest tile side in latent pixels the planner tries
FRAME_BATCH = 4  # decode: the 2D layers run this many frames at a time (same result, a few % slower, far less memory)
MAX_ENCODE_BATCH = {"cuda": 16, "cpu": 2}  # frames per encoder call, at most (see plan_encode)
FALLBACK_WINDOW = 16  # approximate fallback: windows of this many frames...
FALLBACK_OVERLAP = 4  # ...cross-faded over this many (fixed: the output must not depend on free memory)
# Measured against one-clip decoding (random-weight SVD-like model with strong temporal mixing, 24 frames; see
# docs/memory.md): what the approximate windows cost.
WINDOWS_ERROR = "cross-faded windows differ from the one-clip decode: ~33 dB PSNR (worst frame ~30 dB) on a " \
    "strongly temporal random model; trained models differ less"




def _backends(attention: str, device: torch.device, budget: int) -> list[AttentionBackend]:
    """The backends to try, fastest first; split/sub-quadratic get scratch of an eighth of the budget (≤ 512 MiB)."""
    scratch = min(budget // 8, 512 << 20)
    if attention != "auto":
        if attention not in BACKEND_NAMES:
            raise UsageError(f"unknown attention backend {attention!r}; choose one of: auto, {', '.join(BACKEND_NAMES)}")
        why = unavailable_reason(attention, device)
        if why is not None:
            raise BackendError(f"attention backend {attention!r} cannot run here: {why}")
        return [AttentionBackend(attention, scratch, "chosen by the user")]
    names = [name for name in AUTO_ORDER if unavailable_reason(name, device) is None]
    if "sdpa" in names and "math" in names:  # math is slower and never smaller
        names.remove("math")
    return [AttentionBackend(name, scratch, "auto: the fastest backend whose memory fits") for name in names]


def norm_kernels(device: torch.device) -> str:
    """Which GroupNorm+SiLU implementation the model will run on `device`, for the plan's reasons."""
    if device.type != "cuda":
        return "GroupNorm+SiLU: torch's kernels, SiLU in place"
    from vaecli.ops import triton_norm

    usable, why = triton_norm.status()
    return f"GroupNorm+SiLU: {why}" if usable else f"GroupNorm+SiLU: torch's kernels ({why})"


def output_bytes(frames: int, height: int, width: int) -> int:
    """Post-processing of decoded frames: a float copy and the uint8 frames (t, H, W, 3)."""
    return frames * height * width * 3 * (4 + 1)


def tile_sides(h: int, w: int) -> list[int]:
    """Tile sides (latent px) to try, largest first: halving from half the longer side down to MIN_TILE."""
    sides, side = [], max(h, w) // 2
    while side > MIN_TILE:
        sides.append(side)
        side //= 2
    return sides + [MIN_TILE]


def first_fitting(options: list, fits) -> int | None:
    """Index of the first option that fits, for options ordered by decreasing memory (binary search)."""
    if not options or not fits(options[-1]):
        return None
    lo, hi = 0, len(options) - 1  # options[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(options[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def stream_pieces(est: Estimator, backend: AttentionBackend, frames: int, h: int, w: int, budget: int,
                  park: bool, out_bytes: int, tile: int | None = None, disk: bool = False
                  ) -> tuple[Pieces, int] | None:
    """The exact streaming cut with the largest pieces whose predicted bytes fit `budget`, or None.

    2D layers: chunks of 4, 2, 1 whole frames, then single frames in tiles (conv1 outputs kept, then not);
    temporal layers: all frames whole, then all frames in tiles, then frame chunks of small tiles. Both lists are
    ordered by decreasing memory and searched together: the 2D and the temporal layers run at different times,
    so one trace prices a 2D cut and a temporal cut at once. tile: force tiles of this side (latent px) for both.
    disk: the clip in scratch files; its temporal layers then run on chunks of whole frames, then 16 frames in
    bands of whole rows (each frame's part of a piece one sequential read, and fewer frames of halo read than
    smaller chunks would), before square tiles.
    """
    def cost(p: Pieces, phase: str = "") -> int:
        return est.stream("decode", backend, frames, h, w, p, phase) + out_bytes

    # 2D cuts (frames, tile, keep conv1 outputs); tiled cuts keep conv1's output per chunk where that fits
    if tile is not None:
        spatial = [(1, tile, True), (1, tile, False)]
        temporal = [(None, tile)] + [(f, tile) for f in (8, 4, 2, 1) if f < frames]
    else:
        sides = tile_sides(h, w)
        tiled = [(1, s, keep) for s in sides for keep in (True, False)]
        spatial = [(c, None, False) for c in (4, 2, 1) if c < frames] + tiled
        if frames == 1 or len(spatial) == len(tiled):
            spatial = [(1, None, False)] + tiled
        temporal = [(None, None)] + [(None, s) for s in sides] + [(f, MIN_TILE) for f in (8, 4, 2, 1) if f < frames]
    if disk and tile is None:
        bands, side = [], h // 2
        while side > MIN_TILE:
            bands.append((min(16, frames - 1) or None, side, True))
            side //= 2
        temporal = ([(f, None) for f in (16, 8) if f < frames] + bands
                    + [(f, MIN_TILE) for f in (8, 4, 2, 1) if f < frames]) or temporal

    def make(s_opt, t_opt) -> Pieces:
        return Pieces(s_opt[0], s_opt[1], t_opt[0], t_opt[1], park, s_opt[2], disk, band=len(t_opt) > 2)

    def fits(s_opt, t_opt) -> tuple[bool, bool]:
        p = make(s_opt, t_opt)
        return cost(p, "2d") <= budget, cost(p, "temporal") <= budget

    if not all(fits(spatial[-1], temporal[-1])):
        return None
    # one binary search over both lists at once: each trace answers for its 2D and its temporal cut
    s_lo, s_hi, t_lo, t_hi = 0, len(spatial) - 1, 0, len(temporal) - 1
    while s_lo < s_hi or t_lo < t_hi:
        s_mid, t_mid = (s_lo + s_hi) // 2, (t_lo + t_hi) // 2
        ok_2d, ok_time = fits(spatial[s_mid], temporal[t_mid])
        s_lo, s_hi = (s_lo, s_mid) if ok_2d else (s_mid + 1, s_hi)
        t_lo, t_hi = (t_lo, t_mid) if ok_time else (t_mid + 1, t_hi)
    while True:  # the phases guided the search; the cut's overall peak must fit too (else the next smaller cut)
        pieces = make(spatial[s_lo], temporal[t_lo])
        total = cost(pieces)
        if total <= budget:
            return pieces, total
        if t_lo + 1 < len(temporal):
            t_lo += 1
        elif s_lo + 1 < len(spatial):
            s_lo += 1
        else:
            return None


def plan_decode(config: VAEConfig, frames: int, latent_hw: tuple[int, int], *, device: torch.device,
                dtype: torch.dtype, available_bytes: int, attention: str = "auto", chunk: int | None = None,
                overlap: int | None = None, tile: int | None = None, cost: CostModel | None = None,
                estimator: Estimator | None = None, host_bytes: int | None = None, disk_bytes: int | None = None,
                scratch: str | None = None) -> Plan:
    """Plan a decode of `frames` latent frames of size latent_hw = (h, w) within `available_bytes`.

    available_bytes: device memory for activations (the weights are resident).
    host_bytes: host memory available for a parked clip (None: no parking; on a CPU device the host is the device).
    disk_bytes: scratch space for a clip kept on disk, in the folder `scratch` (None: no disk tier).
    chunk: force approximate windows of this many frames (0 = one clip); overlap: their overlap; tile: force the
    exact streaming executor with tiles of this many latent pixels. Raises nothing when nothing fits: the smallest
    plan is returned with a reason saying so (OOM recovery may still get through). estimator: reuse traces.
    """
    est = estimator or Estimator(config, dtype, cost or COST_MODELS.get(device.type, COST_MODELS["cpu"]))
    search = _DecodeSearch(est, device, dtype, available_bytes, latent_hw, attention, host_bytes, disk_bytes, scratch)
    if chunk is not None and 0 < chunk < frames:  # approximate windows, forced by the user
        return search.forced_windows(chunk, overlap, tile)
    if chunk == 0 and tile is None:  # one clip, forced
        return search.forced_one_clip(frames)
    best = search.exact_plan(frames, tile, forced=tile is not None)
    return best if best is not None else search.fallback(frames, tile)


class _DecodeSearch:
    """The decode plans for one clip size, device and budget, tried in order (see `plan_decode`)."""

    def __init__(self, est: Estimator, device: torch.device, dtype: torch.dtype, budget: int,
                 latent_hw: tuple[int, int], attention: str, host_bytes: int | None, disk_bytes: int | None = None,
                 scratch: str | None = None):
        self.est, self.device, self.dtype, self.budget, self.host_bytes = est, device, dtype, budget, host_bytes
        self.disk_bytes, self.scratch = disk_bytes, scratch
        self.disk_short: str | None = None  # why the disk tier did not take a clip (for the fallback's reasons)
        self.h, self.w = latent_hw
        self.f = est.config.downscale
        self.weights = est.weights()
        self.backends = _backends(attention, device, max(budget, 0))
        if not self.backends:
            raise UsageError(f"no attention backend works on {device}")
        self.can_park = device.type != "cpu" and host_bytes is not None
        self.reasons = [f"budget {format_bytes(max(budget, 0))} for activations on {device}", norm_kernels(device)]
        self.batch_default = FRAME_BATCH if device.type == "cuda" else None

    def one_clip_cost(self, backend: AttentionBackend, c: int, batched: bool) -> int:
        h, w, est = self.h, self.w, self.est
        act = est.exact(backend, c, h, w, FRAME_BATCH) if batched else est.activations("decode", backend, c, h, w)
        return act + output_bytes(c, h * self.f, w * self.f)

    def plan(self, backend, strategy, c, k, act, why, *, pieces=None, batch=None, exact=True, host=0, disk=0) -> Plan:
        return Plan("decode", str(self.device), dtype_name(self.dtype), backend, strategy, c, k, act, self.budget,
                    self.weights, tuple(self.reasons + why), batch, pieces, exact, host, disk_bytes=disk,
                    scratch=self.scratch if disk else None)

    def exact_plan(self, c: int, tile_side: int | None = None, forced: bool = False) -> Plan | None:
        """The best exact plan for a clip of c frames: one clip, else streamed (resident, then parked)."""
        est, h, w, budget = self.est, self.h, self.w, self.budget
        out = output_bytes(min(c, FRAME_BATCH), h * self.f, w * self.f)
        # every plan that keeps the clip on the device holds its largest activation at least: no trace needed
        resident_possible = est.clip_store("decode", c - 1, h, w) <= budget
        if tile_side is None:
            for backend in self.backends:
                if self.one_clip_cost(backend, c, False) <= budget:
                    return self.plan(backend, "one-clip", c, 0, self.one_clip_cost(backend, c, False),
                                     [f"all {c} frames fit as one clip (exact)", f"attention {backend.name}"],
                                     batch=self.batch_default)
            for backend in self.backends if resident_possible else []:
                if self.one_clip_cost(backend, c, True) <= budget:
                    return self.plan(backend, "one-clip", c, 0, self.one_clip_cost(backend, c, True),
                                     [f"all {c} frames fit as one clip (exact) with the 2D layers {FRAME_BATCH} "
                                      "frames at a time", f"attention {backend.name}"], batch=FRAME_BATCH)
        for park in (False, True) if self.can_park else (False,):
            host = est.clip_store("decode", c, h, w) if park else 0
            if (park and host > self.host_bytes) or (not park and not resident_possible):
                continue
            for backend in self.backends:
                found = stream_pieces(est, backend, c, h, w, budget, park, out, tile_side)
                if found:
                    pieces, act = found
                    if park:  # what the run holds on the host, counted (the bound above only pruned)
                        host = est.host("decode", backend, c, h, w, pieces)
                    why = ("streamed exactly, forced by --tile" if forced else
                           f"one clip of {c} frames does not fit; streamed exactly, layer by layer")
                    where = (f"clip parked in host memory ({format_bytes(host)})" if park
                             else "clip kept on the device")
                    return self.plan(backend, "stream", c, 0, act, [why, where, f"attention {backend.name}"],
                                     pieces=pieces, host=host)
        return self.disk_plan(c, tile_side, forced, out)

    def disk_plan(self, c: int, tile_side: int | None, forced: bool, out: int) -> Plan | None:
        """The exact streaming plan with the clip in scratch files, when the clip's activation fits nowhere in
        memory and the scratch folder has the space (else None, and `disk_short` says why)."""
        if self.disk_bytes is None:
            return None
        for backend in self.backends:
            found = stream_pieces(self.est, backend, c, self.h, self.w, self.budget, False, out, tile_side, disk=True)
            if not found:
                continue
            pieces, act = found
            disk = self.est.disk(backend, c, self.h, self.w, pieces)
            if disk > self.disk_bytes:
                self.disk_short = (f"the exact plan keeps the clip on disk and needs {format_bytes(disk)} of scratch "
                                   f"space, {self.scratch} has {format_bytes(max(self.disk_bytes, 0))} to spare "
                                   "(free space there or give --scratch DIR)")
                return None
            why = ("streamed exactly, forced by --tile" if forced else
                   "the clip's activation between layers fits nowhere in memory; streamed exactly, layer by layer")
            return self.plan(backend, "stream", c, 0, act, [why, f"clip kept in scratch files on disk "
                                                                 f"({format_bytes(disk)} in {self.scratch})",
                                                           f"attention {backend.name}"], pieces=pieces, disk=disk)
        return None

    def forced_windows(self, chunk: int, overlap: int | None, tile: int | None) -> Plan:
        """Approximate windows of `chunk` frames overlapping by `overlap`, each decoded by its best exact plan."""
        k = overlap if overlap is not None else min(8, max(1, chunk // 4))
        if k >= chunk:
            raise UsageError(f"--overlap {k} must be smaller than --chunk {chunk}")
        inner = self.exact_plan(chunk, tile, forced=tile is not None)
        note = ["windows forced by the user (--chunk/--overlap): approximate, " +
                ("independent clips (sgm decoding_t)" if k == 0 else WINDOWS_ERROR)]
        if inner is None:
            act = self.one_clip_cost(self.backends[-1], chunk, True)
            return self.plan(self.backends[-1], "windows", chunk, k, act, note + ["predicted peak exceeds the budget"],
                             batch=FRAME_BATCH, exact=False)
        return self.plan(inner.attention, "windows", chunk, k, inner.activation_bytes, note + list(inner.reasons[2:]),
                         pieces=inner.pieces, batch=inner.frame_batch, exact=False, host=inner.host_bytes,
                         disk=inner.disk_bytes)

    def forced_one_clip(self, frames: int) -> Plan:
        backend = next((b for b in self.backends if self.one_clip_cost(b, frames, False) <= self.budget), None)
        note = f"attention {backend.name}" if backend else "predicted peak exceeds the budget"
        backend = backend or self.backends[-1]
        return self.plan(backend, "one-clip", frames, 0, self.one_clip_cost(backend, frames, False),
                         ["one clip forced by the user", note], batch=self.batch_default)

    def fallback(self, frames: int, tile: int | None) -> Plan:
        """Nothing exact fits: fixed windows, each decoded exactly (not sized from free memory), or the smallest
        plan when not even those fit."""
        c = min(FALLBACK_WINDOW, frames)
        k = 0 if c >= frames else FALLBACK_OVERLAP
        inner = self.exact_plan(c, tile) if c < frames else None
        why = [f"even streamed (the clip parked where possible) the {frames} frames do not fit; APPROXIMATE fallback: "
               f"windows of {c} frames overlapping by {k}, cross-faded ({WINDOWS_ERROR})"]
        if self.disk_short:
            why.append(self.disk_short)
        if inner is None:
            disk = not self.can_park and self.disk_bytes is not None  # the smallest cut keeps the clip off the device
            pieces = Pieces(1, MIN_TILE, 1, MIN_TILE, self.can_park, disk=disk)
            smallest = min(self.backends, key=lambda b: self.est.stream("decode", b, c, self.h, self.w, pieces))
            act = self.est.stream("decode", smallest, c, self.h, self.w, pieces)
            return self.plan(smallest, "windows" if c < frames else "stream", c, k, act,
                             why + ["nothing fits the budget by the cost model; the smallest plan is used"],
                             pieces=pieces, exact=c >= frames,
                             disk=self.est.disk(smallest, c, self.h, self.w, pieces) if disk else 0)
        return self.plan(inner.attention, "windows", c, k, inner.activation_bytes, why + list(inner.reasons[2:]),
                         pieces=inner.pieces, batch=inner.frame_batch, exact=False, host=inner.host_bytes,
                         disk=inner.disk_bytes)


def plan_encode(config: VAEConfig, frames: int, size_hw: tuple[int, int], *, device: torch.device,
                dtype: torch.dtype, available_bytes: int, attention: str = "auto", batch: int | None = None,
                cost: CostModel | None = None, max_batch: int | None = None,
                estimator: Estimator | None = None, host_bytes: int | None = None) -> Plan:
    """Plan an encode: the largest batch of frames (≤ max_batch) whose encoder pass fits the budget; for frames too
    large to encode whole, exact tiles (one frame at a time, parked in host memory where that is needed).

    max_batch: default `MAX_ENCODE_BATCH` for the device: 16 on CUDA; 2 on CPU, where larger batches are slower
    (measured with the bundled model: 16 frames of 480x272 in 8.3 s as one batch, 5.9-6.9 s in batches of 1-2)
    and would also update the progress bar only every 16 frames."""
    if max_batch is None:
        max_batch = MAX_ENCODE_BATCH.get(device.type, 16)
    est = estimator or Estimator(config, dtype, cost or COST_MODELS.get(device.type, COST_MODELS["cpu"]))
    weights = est.weights()
    budget = available_bytes
    height, width = size_hw
    backends = _backends(attention, device, max(budget, 0))

    def batch_cost(backend: AttentionBackend, b: int) -> int:
        return est.activations("encode", backend, b, height, width) + b * height * width * 3 * (4 + 1)

    reasons = [f"budget {format_bytes(max(budget, 0))} for activations on {device}", norm_kernels(device)]
    limit = min(max_batch, max(1, frames))
    candidates = [batch] if batch else list(range(limit, 0, -1))

    def make(backend, strategy, b, act, why, pieces=None, host=0) -> Plan:
        return Plan("encode", str(device), dtype_name(dtype), backend, strategy, b, 0, act, budget, weights,
                    tuple(reasons + why), pieces=pieces, host_bytes=host)

    for backend in backends:
        for b in candidates:
            if batch_cost(backend, b) <= budget:
                why = "forced by the user" if batch else f"the largest batch (≤ {limit}) that fits"
                return make(backend, "batches", b, batch_cost(backend, b),
                            [f"batches of {b} frames: {why}", f"attention {backend.name}"])
    f = config.downscale
    sides = tile_sides(height // f, width // f)
    frame_in = height * width * 3 * (4 + 1)
    for park in (False, True) if device.type != "cpu" and host_bytes is not None else (False,):
        host = est.clip_store("encode", 1, height, width) if park else 0
        if park and host > host_bytes:
            continue
        for backend in backends:
            def fits(side: int) -> bool:
                return est.stream("encode", backend, 1, height, width, Pieces(1, side, park=park)) + frame_in <= budget
            i = first_fitting(sides, fits)
            if i is not None:
                pieces = Pieces(1, sides[i], park=park)
                act = est.stream("encode", backend, 1, height, width, pieces) + frame_in
                host = est.host("encode", backend, 1, height, width, pieces) if park else 0
                return make(backend, "stream", 1, act,
                            [f"one {width}x{height} frame does not fit whole; encoded exactly in tiles of {sides[i]} "
                             "latent px" + (", parked in host memory" if park else ""), f"attention {backend.name}"],
                            pieces, host)
    b = candidates[-1]
    return make(backends[-1], "batches", b, batch_cost(backends[-1], b),
                [f"batches of {b} frame(s) do not fit by the cost model; trying anyway"])
