"""The memory planner: a cost model for encode and decode, and the plan (attention backend, windows, tiles).

Cost model. The activation peak of a decode or encode is traced on the meta device (`ops.memtrace`), which
follows the model's own code, so it holds for any configuration, attention backend and size; a device-specific
`CostModel` turns it into predicted bytes: `scale · traced + overhead` (allocator rounding, kernel
workspaces), calibrated by `scripts/calibrate_memory.py`. The traced peak is exactly linear in the number of
frames (every activation has a frame axis), so two traces per spatial size give it for any window length.

Plan. Decode strategies, tried in order unless forced: one clip (exact), temporal windows with a cross-faded
overlap, spatial tiles of small windows. For each, attention backends are tried fastest first, and the first
that fits the budget wins. Encode plans a batch size (and tiles for huge frames).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from vaecli.errors import UsageError
from vaecli.model.config import VAEConfig
from vaecli.model.vae import VAE
from vaecli.ops.attention import BACKEND_NAMES, AttentionBackend, unavailable_reason
from vaecli.ops.device import dtype_name
from vaecli.ops.memtrace import traced_peak_bytes
from vaecli.pipeline.chunking import Tiling

AUTO_ORDER = ("sdpa", "math", "split", "sub-quadratic")  # fastest first; math only wins where sdpa is missing
MIN_WINDOW = 4  # shortest temporal window worth decoding before falling back to tiles
DEFAULT_TILE_OVERLAP = 8  # latent pixels shared by neighbouring tiles (64 output pixels at f = 8)
MIN_TILE = 8  # smallest tile side in latent pixels
FRAME_BATCH = 4  # decode: the 2D layers run this many frames at a time (same result, a few % slower, far less memory)


@dataclass(frozen=True)
class CostModel:
    """predicted activation bytes = scale · traced + overhead (per device type, from calibration)."""

    scale: float = 1.0
    overhead: int = 0

    def predict(self, traced: int) -> int:
        return int(self.scale * traced + self.overhead)


COST_MODELS = {
    # Until a GPU calibration is recorded in docs/memory-calibration.md these are conservative guesses:
    # the CUDA caching allocator rounds blocks up and cuDNN takes workspaces.
    "cuda": CostModel(scale=1.1, overhead=256 << 20),
    "cpu": CostModel(scale=1.0, overhead=64 << 20),
}


def parse_bytes(text: str | None) -> int | None:
    """"512MiB", "8GiB", "1.5GB", "1000000" -> bytes (GiB/MiB/KiB binary, GB/MB/KB decimal)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", text, flags=re.I)
    if not match:
        raise UsageError(f"--max-memory must look like 512MiB or 8GiB, not {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    powers = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "KB": 1000, "M": 1 << 20, "MIB": 1 << 20, "MB": 10**6,
              "G": 1 << 30, "GIB": 1 << 30, "GB": 10**9, "T": 1 << 40, "TIB": 1 << 40, "TB": 10**12}
    if unit not in powers:
        raise UsageError(f"--max-memory unit must be KiB, MiB, GiB or TiB (or KB, MB, GB), not {unit!r}")
    return int(number * powers[unit])


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Plan:
    """How one encode or decode runs; printed by `vaecli plan` and included in `--json` results.

    strategy: "one-clip", "windows" or "tiles" (decode); "batches" (encode).
    chunk_frames / overlap: temporal windows (decode); for encode chunk_frames is the batch size.
    tiling: spatial tiles (None for whole frames).
    budget_bytes: memory available for activations; activation_bytes: their predicted peak (≤ budget when the
    plan fits); predicted_peak_bytes: activations plus weights.
    frame_batch: decode only: the decoder's 2D layers run this many frames at a time (`Clips.frame_batch`).
    """

    stage: str
    device: str
    dtype: str
    attention: AttentionBackend
    strategy: str
    chunk_frames: int
    overlap: int
    tiling: Tiling | None
    activation_bytes: int
    budget_bytes: int
    weights_bytes: int
    reasons: tuple[str, ...] = field(default=())
    frame_batch: int | None = None

    @property
    def predicted_peak_bytes(self) -> int:
        return self.activation_bytes + self.weights_bytes

    @property
    def fits(self) -> bool:
        return self.activation_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"stage": self.stage, "device": self.device, "dtype": self.dtype, "attention": self.attention.name,
                "strategy": self.strategy,
                "chunk_frames": self.chunk_frames if self.stage == "decode" else None,
                "batch_frames": self.chunk_frames if self.stage == "encode" else None,
                "overlap": self.overlap, "tiles": self.tiling.to_dict() if self.tiling else None,
                "frame_batch": self.frame_batch,
                "predicted_peak_bytes": self.predicted_peak_bytes, "activation_bytes": self.activation_bytes,
                "budget_bytes": self.budget_bytes, "weights_bytes": self.weights_bytes, "fits": self.fits,
                "reasons": list(self.reasons)}

    def describe(self) -> list[str]:
        if self.stage == "encode":
            lines = [f"encode: batches of {self.chunk_frames} frames"]
        elif self.strategy == "one-clip":
            lines = ["decode: one-clip"]
        else:
            lines = [f"decode: {self.strategy}, windows of {self.chunk_frames} frames overlapping by {self.overlap}"]
        if self.tiling:
            lines.append(f"  tiles:     {self.tiling.size[0]}x{self.tiling.size[1]} latent px, overlap {self.tiling.overlap}")
        if self.frame_batch:
            lines.append(f"  2D layers: {self.frame_batch} frames at a time")
        lines += [f"  attention: {self.attention.name}",
                  f"  memory:    {format_bytes(self.predicted_peak_bytes)} predicted peak "
                  f"({format_bytes(self.activation_bytes)} activations + {format_bytes(self.weights_bytes)} weights), "
                  f"budget {format_bytes(self.budget_bytes)} for activations" + ("" if self.fits else "  (does not fit)")]
        lines += [f"  why:       {r}" for r in self.reasons]
        return lines


class Estimator:
    """Traced activation peaks of one model config at one dtype, memoised per (stage, backend, size)."""

    def __init__(self, config: VAEConfig, dtype: torch.dtype, cost: CostModel | None = None,
                 device_type: str = "cpu"):
        cost = cost or COST_MODELS.get(device_type, COST_MODELS["cpu"])
        self.config, self.dtype, self.cost = config, dtype, cost
        self._models: dict[str, VAE] = {}
        self._lines: dict[tuple, dict[tuple[int, int], tuple[int, int]]] = {}
        self._exact: dict[tuple, int] = {}

    @staticmethod
    def _key(backend: AttentionBackend) -> tuple:
        """Only the chunked backends' memory depends on their budget."""
        return (backend.name, backend.budget if backend.name in ("split", "sub-quadratic") else None)

    def _model(self, backend: AttentionBackend) -> VAE:
        key = self._key(backend)
        if key not in self._models:
            with torch.device("meta"):
                self._models[key] = VAE(self.config, backend).to(self.dtype).eval()
        return self._models[key]

    def _traced(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int) -> int:
        vae = self._model(backend)
        if stage == "decode":
            z = torch.empty(frames, self.config.latent_channels, h, w, device="meta", dtype=self.dtype)
            return traced_peak_bytes(lambda: vae.decode(z))
        x = torch.empty(frames, self.config.in_channels, h, w, device="meta", dtype=self.dtype)
        return traced_peak_bytes(lambda: vae.encode(x))

    def activations(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int) -> int:
        """Predicted activation bytes: traced peak (linear in frames, from traces of 2 and 3) through the cost model.

        From two frames on the peak is exactly linear in frames; a single frame skips the temporal convolution's
        neighbour taps and lies below the line, so the line (extrapolated to one frame) is a safe bound for it.

        h, w: latent size for decode, pixel size for encode. For decode with a backend whose memory is linear in
        the token count (all but math), every activation is C·h·w·4^level per frame, so a size not traced yet
        is scaled by area from one that was: tile searches then cost no further traces. split and
        sub-quadratic are priced as sdpa plus their scratch budget.
        """
        if backend.name in ("split", "sub-quadratic"):
            # their scratch is bounded by their budget by construction: the sdpa trace plus that budget
            sdpa = AttentionBackend("sdpa")
            return self.activations(stage, sdpa, frames, h, w) + backend.budget
        lines = self._lines.setdefault((stage, *self._key(backend)), {})
        if (h, w) not in lines:
            if stage == "decode" and backend.name != "math" and lines:
                (h0, w0), (base, per_frame) = next(iter(lines.items()))
                ratio = (h * w) / (h0 * w0)
                lines[(h, w)] = (int(base * ratio), int(per_frame * ratio))
            else:
                two, three = self._traced(stage, backend, 2, h, w), self._traced(stage, backend, 3, h, w)
                lines[(h, w)] = (2 * two - three, three - two)
        base, per_frame = lines[(h, w)]
        return self.cost.predict(base + per_frame * (frames - 1))

    def exact(self, backend: AttentionBackend, frames: int, h: int, w: int, frame_batch: int) -> int:
        """Predicted decode activations of exactly `frames` latent frames with the 2D layers `frame_batch` frames
        at a time (one trace, memoised): not linear in frames, so only used to check single candidates.
        Never above `activations(...)`, the unbatched line, which bounds it."""
        key = ("exact", *self._key(backend), frames, h, w, frame_batch)
        if key not in self._exact:
            vae = self._model(backend)
            z = torch.empty(frames, self.config.latent_channels, h, w, device="meta", dtype=self.dtype)
            self._exact[key] = traced_peak_bytes(lambda: vae.decode(z, frame_batch=frame_batch))
        return min(self.cost.predict(self._exact[key]), self.activations("decode", backend, frames, h, w))

    def weights(self) -> int:
        with torch.device("meta"):
            vae = VAE(self.config)
        return sum(t.numel() for t in vae.state_dict().values()) * (torch.finfo(self.dtype).bits // 8)


def _backends(attention: str, device: torch.device, budget: int) -> list[AttentionBackend]:
    """The backends to try, fastest first; split/sub-quadratic get scratch of an eighth of the budget (≤ 512 MiB)."""
    scratch = min(budget // 8, 512 << 20)
    if attention != "auto":
        if attention not in BACKEND_NAMES:
            raise UsageError(f"unknown attention backend {attention!r}; choose one of: auto, {', '.join(BACKEND_NAMES)}")
        return [AttentionBackend(attention, scratch, "chosen by the user")]
    return [AttentionBackend(name, scratch, "auto: the fastest backend whose memory fits")
            for name in AUTO_ORDER if unavailable_reason(name, device) is None]


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


def plan_decode(config: VAEConfig, frames: int, latent_hw: tuple[int, int], *, device: torch.device,
                dtype: torch.dtype, available_bytes: int, attention: str = "auto", chunk: int | None = None,
                overlap: int | None = None, tile: int | None = None, cost: CostModel | None = None,
                weights_resident: bool = True, estimator: Estimator | None = None) -> Plan:
    """Plan a decode of `frames` latent frames of size latent_hw = (h, w) within `available_bytes`.

    available_bytes: memory the process may still use on the device (weights excluded when they are already
    resident). chunk: force windows of this many frames (0 = one clip); overlap: force the overlap;
    tile: force square tiles of this many latent pixels. Raises nothing when nothing fits: the smallest plan is
    returned with a reason saying so (OOM recovery may still get through). estimator: reuse traces across calls.
    """
    est = estimator or Estimator(config, dtype, cost or COST_MODELS.get(device.type, COST_MODELS["cpu"]))
    weights = est.weights()
    budget = available_bytes if weights_resident else available_bytes - weights
    h, w = latent_hw
    f = config.downscale
    backends = _backends(attention, device, max(budget, 0))
    if not backends:
        raise UsageError(f"no attention backend works on {device}")

    def window_cost(backend: AttentionBackend, c: int, k: int, tiling: Tiling | None, exact: bool = False) -> int:
        held = k * 3 * h * f * w * f * 4  # frames kept for the cross-fade
        if tiling is None:
            act = est.exact(backend, c, h, w, FRAME_BATCH) if exact else est.activations("decode", backend, c, h, w)
        else:
            th, tw = min(tiling.size[0], h), min(tiling.size[1], w)
            act = est.activations("decode", backend, c, th, tw) + 2 * c * 3 * h * f * w * f * 4  # + accumulators
        return act + held + output_bytes(c, h * f, w * f)

    def make(backend, strategy, c, k, tiling, why, exact: bool = False) -> Plan:
        # batched 2D layers: always on CUDA (headroom for a few % of time), elsewhere only where the plan needs it
        batch = FRAME_BATCH if exact or device.type == "cuda" else None
        return Plan("decode", str(device), dtype_name(dtype), backend, strategy, c, k, tiling,
                    window_cost(backend, c, k, tiling, exact), budget, weights, tuple(reasons + why), batch)

    def first_fitting(c: int, k: int, tiling: Tiling | None) -> AttentionBackend | None:
        return next((b for b in backends if window_cost(b, c, k, tiling) <= budget), None)

    default_overlap = lambda c: 0 if c >= frames else min(8, max(1, c // 4))  # noqa: E731
    reasons = [f"budget {format_bytes(max(budget, 0))} for activations on {device}", norm_kernels(device)]
    if chunk is not None or tile is not None:  # forced by the user
        c = frames if not chunk else min(chunk, frames)
        k = 0 if c >= frames else (overlap if overlap is not None else default_overlap(c))
        if c < frames and k >= c:
            raise UsageError(f"--overlap {k} must be smaller than --chunk {c}")
        tiling = Tiling((tile, tile), min(DEFAULT_TILE_OVERLAP, tile // 4)) if tile else None
        strategy = "tiles" if tiling else ("one-clip" if c >= frames else "windows")
        backend = first_fitting(c, k, tiling)
        note = f"attention {backend.name}" if backend else "predicted peak exceeds the budget"
        return make(backend or backends[-1], strategy, c, k, tiling, [f"{strategy} forced by the user", note])
    backend = first_fitting(frames, 0, None)  # 1. one clip
    if backend:
        return make(backend, "one-clip", frames, 0, None,
                    [f"all {frames} frames fit as one clip (exact)", f"attention {backend.name}"])
    # 1b. one clip, priced exactly with the 2D layers batched (the line above bounds it from above)
    backend = next((b for b in backends if window_cost(b, frames, 0, None, exact=True) <= budget), None)
    if backend:
        return make(backend, "one-clip", frames, 0, None,
                    [f"all {frames} frames fit as one clip (exact) with the 2D layers {FRAME_BATCH} frames at a time",
                     f"attention {backend.name}"], exact=True)
    for backend in backends:  # 2. the longest temporal window that fits, fastest backend first
        for c in range(frames - 1, MIN_WINDOW - 1, -1):
            k = overlap if overlap is not None else default_overlap(c)
            if k < c and window_cost(backend, c, k, None) <= budget:
                return make(backend, "windows", c, k, None,
                            [f"one clip of {frames} frames does not fit; windows of {c} frames overlapping by {k}, "
                             "cross-faded", f"attention {backend.name}"])
    c = min(frames, MIN_WINDOW)  # 3. tiles of short windows: the largest tile that fits
    k = 0 if c >= frames else (overlap if overlap is not None else default_overlap(c))
    for backend in backends:
        side = max(h, w) * 3 // 4
        while side >= MIN_TILE:
            tiling = Tiling((side, side), min(DEFAULT_TILE_OVERLAP, side // 4))
            if window_cost(backend, c, k, tiling) <= budget:
                return make(backend, "tiles", c, k, tiling,
                            [f"even {c}-frame windows do not fit whole; tiles of {side}x{side} latent pixels "
                             f"overlapping by {tiling.overlap}, feathered", f"attention {backend.name}"])
            side = side * 3 // 4
    return make(backends[-1], "tiles", c, k, Tiling((MIN_TILE, MIN_TILE), MIN_TILE // 4),
                ["nothing fits the budget by the cost model; the smallest plan is used"])


def plan_encode(config: VAEConfig, frames: int, size_hw: tuple[int, int], *, device: torch.device,
                dtype: torch.dtype, available_bytes: int, attention: str = "auto", batch: int | None = None,
                cost: CostModel | None = None, weights_resident: bool = True, max_batch: int = 16,
                estimator: Estimator | None = None) -> Plan:
    """Plan an encode: the largest batch of frames (≤ max_batch) whose encoder pass fits the budget."""
    est = estimator or Estimator(config, dtype, cost or COST_MODELS.get(device.type, COST_MODELS["cpu"]))
    weights = est.weights()
    budget = available_bytes if weights_resident else available_bytes - weights
    height, width = size_hw
    backends = _backends(attention, device, max(budget, 0))

    def batch_cost(backend: AttentionBackend, b: int) -> int:
        return est.activations("encode", backend, b, height, width) + b * height * width * 3 * (4 + 1)

    reasons = [f"budget {format_bytes(max(budget, 0))} for activations on {device}", norm_kernels(device)]
    limit = min(max_batch, max(1, frames))
    candidates = [batch] if batch else list(range(limit, 0, -1))
    for backend in backends:
        for b in candidates:
            if batch_cost(backend, b) <= budget:
                why = "forced by the user" if batch else f"the largest batch (≤ {limit}) that fits"
                return Plan("encode", str(device), dtype_name(dtype), backend, "batches", b, 0, None,
                            batch_cost(backend, b), budget, weights,
                            tuple(reasons + [f"batches of {b} frames: {why}", f"attention {backend.name}"]))
    b = candidates[-1]
    return Plan("encode", str(device), dtype_name(dtype), backends[-1], "batches", b, 0, None,
                batch_cost(backends[-1], b), budget, weights,
                tuple(reasons + [f"batches of {b} frame(s) do not fit by the cost model; trying anyway"]))
