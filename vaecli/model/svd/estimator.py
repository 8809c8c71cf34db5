"""Memory prices of SVD-family runs for the planner (`vaecli.model.svd.planning`): the `Estimator` counts the
model's own code (`vaecli.model.svd.memory`) or traces it on the meta device, memoised per candidate, through the
device's `CostModel`."""

from __future__ import annotations

import torch

from vaecli.model.plan import COST_MODELS, CostModel
from vaecli.model.svd import memory
from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.streaming import Pieces
from vaecli.model.svd.vae import VAE
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.memtrace import traced_peak_bytes, traced_peaks
from vaecli.ops.scratch import CountedScratch


class Estimator:
    """Activation peaks of one model config at one dtype on one device type, memoised per (stage, backend, size,
    cut), through the device's `CostModel`.

    Counted (`vaecli.model.svd.memory`: the real code paths run under counting execution, milliseconds a
    candidate), for every time mode and attention backend. `traced=True` traces on the meta device instead (the
    tests' independent oracle; parked streams cannot be traced: the meta device holds no host copies)."""

    def __init__(self, config: VAEConfig, dtype: torch.dtype, cost: CostModel | None = None,
                 device_type: str = "cpu", traced: bool = False, vae: VAE | None = None):
        """vae: the loaded model to count with (its weights are only read for their shapes; default: one built
        on the meta device). The attention backend is an argument of every call, so one model serves all."""
        cost = cost or COST_MODELS.get(device_type, COST_MODELS["cpu"])
        self.config, self.dtype, self.cost = config, dtype, cost
        self.device = torch.device(device_type)
        self.traced = traced
        self._vae = None if traced else vae
        self._peaks: dict[tuple, object] = {}

    @staticmethod
    def _key(backend: AttentionBackend) -> tuple:
        """Only the chunked backends' memory depends on their budget."""
        return (backend.name, backend.budget if backend.name in ("split", "sub-quadratic") else None)

    def _model(self, backend: AttentionBackend) -> VAE:
        """The model to run (under counting, or traced on the meta device); the backend is passed per call."""
        if self._vae is None:
            with torch.device("meta"):
                self._vae = VAE(self.config, backend).to(self.dtype).eval()
        return self._vae

    def _memo(self, key: tuple, compute):
        if key not in self._peaks:
            self._peaks[key] = compute()
        return self._peaks[key]

    def _one_call(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int,
                  frame_batch: int | None) -> int:
        vae = self._model(backend)
        kw = dict(dtype=self.dtype, device=self.device, attention=backend)
        if self.traced:
            shape = (frames, self.config.latent_channels if stage == "decode" else self.config.in_channels, h, w)
            x = torch.empty(shape, device="meta", dtype=self.dtype)
            if stage == "decode":
                return traced_peak_bytes(lambda: vae.decode(x, frame_batch=frame_batch, attention=backend))
            return traced_peak_bytes(lambda: vae.encode(x, attention=backend))
        if stage == "decode":
            return memory.decode_peak(vae, frames, h, w, frame_batch=frame_batch, **kw)
        return memory.encode_peak(vae, frames, h, w, **kw).peak["device"]

    def activations(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int) -> int:
        """Predicted activation bytes of one call on `frames` frames (all at once). h, w: latent size for decode,
        pixel size for encode."""
        key = ("call", stage, *self._key(backend), frames, h, w)
        return self.cost.predict(self._memo(key, lambda: self._one_call(stage, backend, frames, h, w, None)))

    def exact(self, backend: AttentionBackend, frames: int, h: int, w: int, frame_batch: int) -> int:
        """Predicted decode activations of `frames` latent frames with the 2D layers `frame_batch` frames at a time."""
        key = ("batched", *self._key(backend), frames, h, w, frame_batch)
        return self.cost.predict(self._memo(key, lambda: self._one_call("decode", backend, frames, h, w,
                                                                        frame_batch)))

    def stream_ledger(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int, pieces: Pieces):
        """Peaks of a streamed decode of `frames` latent frames (h, w) — or, for encode, of `frames` frames of
        (h, w) pixels — with `pieces`: {"": device peak, "2d", "temporal", "out": per phase, "host": host peak}.
        The run visits one representative piece per loop (`Streamer.sample_tiles`), so its cost hardly grows with
        the frame count."""
        def compute() -> dict[str, int]:
            vae = self._model(backend)
            kw = dict(dtype=self.dtype, device=self.device, attention=backend)
            if self.traced:
                return self._traced_stream(vae, stage, frames, h, w, pieces, backend)
            ledger = (memory.stream_peaks(vae, frames, h, w, pieces, **kw) if stage == "decode"
                      else memory.encode_peak(vae, frames, h, w, pieces=pieces, **kw))
            return {"": ledger.peak["device"], "host": ledger.peak["host"], "disk": ledger.peak["disk"],
                    **ledger.phases}
        return self._memo(("stream", stage, *self._key(backend), frames, h, w, pieces), compute)

    def _traced_stream(self, vae: VAE, stage: str, frames: int, h: int, w: int, pieces: Pieces,
                       backend: AttentionBackend) -> dict[str, int]:
        shape = (frames, self.config.latent_channels if stage == "decode" else self.config.in_channels, h, w)
        x = torch.empty(shape, device="meta", dtype=self.dtype)

        def run(set_phase):
            if stage == "encode":
                return vae.moments(x, pieces=pieces, sample_tiles=True, attention=backend)
            scratch = CountedScratch(None, "meta") if pieces.disk else None
            for _ in vae.decode_stream(x, pieces, sample_tiles=True, phase=set_phase, attention=backend,
                                       scratch=scratch):
                set_phase("out")
        return {**traced_peaks(run), "host": 0, "disk": 0}

    def stream(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int, pieces: Pieces,
               phase: str = "") -> int:
        """Predicted device bytes of a streamed run with `pieces` (see `stream_ledger`), through the cost model;
        parked clips are on the host, not counted here. phase "2d" or "temporal": the peak while those stages run
        (decode; with the hand-out phase): the first depends only on the 2D cut, the second only on the temporal
        cut, so one pricing covers both."""
        peaks = self.stream_ledger(stage, backend, frames, h, w, pieces)
        if phase:
            return self.cost.predict(max(peaks.get(phase, 0), peaks.get("out", 0)))
        return self.cost.predict(peaks[""])

    def host(self, stage: str, backend: AttentionBackend, frames: int, h: int, w: int, pieces: Pieces) -> int:
        """Host bytes a parked streamed run holds at its peak (counted)."""
        return self.stream_ledger(stage, backend, frames, h, w, pieces)["host"]

    def disk(self, backend: AttentionBackend, frames: int, h: int, w: int, pieces: Pieces) -> int:
        """Scratch bytes a disk-backed streamed decode holds at its peak (counted), with a filesystem block of
        slack per frame file."""
        return self.stream_ledger("decode", backend, frames, h, w, pieces)["disk"] + 3 * (frames + 1) * 4096

    def clip_store(self, stage: str, frames: int, h: int, w: int) -> int:
        """A lower bound used to prune candidates before counting them: the largest activation of the model for
        `frames` frames, with one more frame's worth ((T+1)·max_level(C·H·W)) — any plan that keeps the clip
        between layers holds at least that; plans report what counting finds."""
        widths = [self.config.ch * m for m in self.config.ch_mult]
        levels = len(widths)
        if stage == "decode":  # level i is 2^(L-1-i) times the latent size
            largest = max(c * h * w * 4 ** (levels - 1 - i) for i, c in enumerate(widths))
        else:  # level i is 2^-i times the frame size
            largest = max(c * h * w // 4 ** i for i, c in enumerate(widths))
        return (frames + 1) * largest * (torch.finfo(self.dtype).bits // 8)

    def weights(self) -> int:
        vae = self._vae if self._vae is not None else self._model(AttentionBackend("sdpa"))
        return sum(t.numel() for t in vae.state_dict().values()) * (torch.finfo(self.dtype).bits // 8)
