"""fp16 safety: work whose half-precision result holds inf/NaN is redone in a wider dtype, and said so.

fp16 activations overflow on some checkpoints and inputs (black or speckled frames in SVD decodes). Every piece
of work computed in fp16/bf16 is checked; work with inf/NaN is recomputed in bf16 (from fp16, where the device has
it), then fp32, with the model in that dtype made from the checkpoint on first need and kept for the rest of the
batch (one guard serves every file and every OOM retry of a command). Each redo is logged to stderr and listed in
the job's JSON result (`precision_fallbacks`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from vaecli.model.family import Codec, NonFiniteActivation
from vaecli.ops.device import dtype_name
from vaecli.pipeline.progress import Progress


class PrecisionGuard:
    """Runs work on `codec`, redoing it wider when a half-precision result holds inf/NaN."""

    def __init__(self, codec: Codec, progress: Progress | None = None):
        self.codec = codec
        self.progress = progress or Progress()
        self.events: list[dict] = []
        self._copies: dict[torch.dtype, Codec] = {}

    def wider(self) -> list[torch.dtype]:
        dtype, device = self.codec.dtype, self.codec.device
        if dtype == torch.float16:
            bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
            return ([torch.bfloat16] if bf16_ok else []) + [torch.float32]
        return [torch.float32] if dtype == torch.bfloat16 else []

    def model_in(self, dtype: torch.dtype) -> Codec:
        if dtype == self.codec.dtype:
            return self.codec
        if dtype not in self._copies:
            self._copies[dtype] = self.codec.in_dtype(dtype)
        return self._copies[dtype]

    def take_events(self) -> list[dict]:
        """The fallbacks since the last call (one file's)."""
        events, self.events = self.events, []
        return events

    def note(self, what: str, tried: torch.dtype, dtype: torch.dtype) -> None:
        """Record (and unless quiet, say) that work in `tried` gave inf/NaN and is redone in `dtype`."""
        self.progress.note(f"vaecli: {dtype_name(tried)} gave inf/NaN in {what}; redoing it in {dtype_name(dtype)}")
        self.events.append({"where": what, "from": dtype_name(tried), "to": dtype_name(dtype)})

    def run(self, work: Callable[[Codec, bool], Iterator[torch.Tensor]], what: str) -> Iterator[torch.Tensor]:
        """work(codec, check_finite) yields result blocks in order; yields the blocks of the first dtype whose
        first block is finite (the fp32 ones at the end, whatever they hold).

        Work that yields several blocks (a streamed decode) must check its pieces itself when asked
        (`check_finite`: raise `NonFiniteActivation`) before it hands out the first block, so nothing is yielded
        from a dtype that is then abandoned. Each step runs in inference mode."""
        dtypes = [self.codec.dtype] + self.wider()
        for i, dtype in enumerate(dtypes):
            last = i + 1 == len(dtypes)
            blocks = work(self.model_in(dtype), not last)
            try:
                first = _step(blocks)
            except NonFiniteActivation:
                self.note(what, dtype, dtypes[i + 1])
                continue
            if first is not None and not last and not bool(torch.isfinite(first).all()):
                self.note(what, dtype, dtypes[i + 1])
                continue
            while first is not None:
                yield first
                first = _step(blocks)
            return

    def __call__(self, compute: Callable[[Codec], torch.Tensor], what: str) -> torch.Tensor:
        """compute(codec) -> one tensor; the first result without inf/NaN (or the fp32 one)."""
        def work(codec: Codec, check_finite: bool) -> Iterator[torch.Tensor]:
            yield compute(codec)

        return next(self.run(work, what))


def _step(blocks: Iterator[torch.Tensor]) -> torch.Tensor | None:
    with torch.inference_mode():
        return next(blocks, None)
