"""Plans are values: how one encode or decode runs, chosen once, printed by `vaecli plan`, passed down.

A family's codec makes them (`Codec.plan_decode` / `plan_encode`) within a `Budget`; the runner runs exactly
the plan it is handed (only its OOM recovery asks for another, within a smaller budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vaecli.ops.attention import AttentionBackend


@dataclass(frozen=True)
class Budget:
    """Memory a plan may use: `activation_bytes` on `device` for activations (the weights are resident),
    `host_bytes` of host memory for a clip parked there (None: no parking; on a CPU device the host is the device),
    and `disk_bytes` of scratch space in the folder `scratch` for a clip kept on disk (None: no disk tier)."""

    device: torch.device
    activation_bytes: int
    host_bytes: int | None = None
    disk_bytes: int | None = None
    scratch: str | None = None


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
    # CPU: fitted to peak RSS of real decodes (docs/performance.md, bikes: the resident stream and the disk-backed
    # one): glibc keeps freed blocks, oneDNN and the video encoder hold their own buffers, none of which the
    # trace sees
    "cpu": CostModel(scale=1.5, overhead=256 << 20),
}


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Plan:
    """How one encode or decode runs; printed by `vaecli plan` and included in `--json` results.

    strategy: decode: "one-clip" (exact), "stream" (exact, `pieces`), "windows" (approximate: cross-faded windows
    of `chunk_frames` overlapping by `overlap`, each decoded one-clip or streamed with `pieces`); encode:
    "batches" (`chunk_frames` frames per call) or "stream" (exact tiles, `pieces`).
    exact: whether the result equals the one-clip decode (whole-frame encode) within rounding.
    budget_bytes: device memory available for activations; activation_bytes: their predicted peak (≤ budget when
    the plan fits); predicted_peak_bytes: activations plus weights. host_bytes: host memory the parked clip takes.
    disk_bytes: scratch space a clip kept on disk takes, in the folder `scratch`.
    frame_batch: decode only: the decoder's 2D layers run this many frames at a time (`Clips.frame_batch`).
    work: the computation over that of the family's fastest exact cut (exact tiles compute their halos again);
    where memory is traded for it the planner prefers the plan with less.
    """

    stage: str
    device: str
    dtype: str
    attention: AttentionBackend
    strategy: str
    chunk_frames: int
    overlap: int
    activation_bytes: int
    budget_bytes: int
    weights_bytes: int
    reasons: tuple[str, ...] = field(default=())
    frame_batch: int | None = None
    pieces: Any = None  # the family's cut of the work (with describe() and to_dict()), None: one call
    exact: bool = True
    host_bytes: int = 0
    runtime_bytes: int = 0  # what the process holds besides (CPU: Python, torch), part of a --max-memory ceiling
    disk_bytes: int = 0
    scratch: str | None = None
    work: float = 1.0

    @property
    def predicted_peak_bytes(self) -> int:
        """What a --max-memory ceiling must hold for this plan: activations, weights and the runtime."""
        return self.activation_bytes + self.weights_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.activation_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"stage": self.stage, "device": self.device, "dtype": self.dtype, "attention": self.attention.name,
                "strategy": self.strategy, "exact": self.exact,
                "chunk_frames": self.chunk_frames if self.stage == "decode" else None,
                "batch_frames": self.chunk_frames if self.stage == "encode" else None,
                "overlap": self.overlap,
                "pieces": None if self.pieces is None else self.pieces.to_dict(), "frame_batch": self.frame_batch,
                "predicted_peak_bytes": self.predicted_peak_bytes, "activation_bytes": self.activation_bytes,
                "budget_bytes": self.budget_bytes, "weights_bytes": self.weights_bytes, "runtime_bytes": self.runtime_bytes,
                "host_bytes": self.host_bytes, "disk_bytes": self.disk_bytes, "scratch": self.scratch,
                "work": round(self.work, 3), "fits": self.fits, "reasons": list(self.reasons)}

    def describe(self) -> list[str]:
        exact = "exact" if self.exact else "APPROXIMATE"
        if self.stage == "encode":
            lines = [f"encode: {self.strategy} ({exact}), {self.chunk_frames} frame(s) at a time"]
        elif self.strategy == "windows":
            lines = [f"decode: windows ({exact}), {self.chunk_frames} frames overlapping by {self.overlap}, cross-faded"]
        else:
            lines = [f"decode: {self.strategy} ({exact})"]
        if self.pieces is not None:
            lines.append(f"  pieces:    {self.pieces.describe()}")
        if self.frame_batch:
            lines.append(f"  2D layers: {self.frame_batch} frames at a time")
        if self.work > 1:
            lines.append(f"  work:      {self.work:.2f}x the computation of the fastest exact cut")
        lines += [f"  attention: {self.attention.name}",
                  f"  memory:    {format_bytes(self.predicted_peak_bytes)} predicted peak "
                  f"({format_bytes(self.activation_bytes)} activations + {format_bytes(self.weights_bytes)} weights"
                  + (f" + {format_bytes(self.runtime_bytes)} runtime" if self.runtime_bytes else "") + "), "
                  f"budget {format_bytes(self.budget_bytes)} for activations" + ("" if self.fits else "  (does not fit)")]
        if self.host_bytes:
            lines.append(f"  host:      {format_bytes(self.host_bytes)} for the parked clip")
        if self.disk_bytes:
            lines.append(f"  disk:      {format_bytes(self.disk_bytes)} of scratch files in {self.scratch}")
        lines += [f"  why:       {r}" for r in self.reasons]
        return lines


