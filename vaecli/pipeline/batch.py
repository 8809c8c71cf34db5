"""Batches: many inputs, one model: inputs and manifests, output names and collisions, skip and resume, the batch
record, torchrun claiming, the summary. Testable without the CLI: `run_batch` returns the exit code.

A `Worker` loads the model on first need (not at all if every input is skipped) with one precision guard for
the whole batch, and runs `run(model, input, target, guard)` for each input.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable

from vaecli.errors import InputError, OutputError, UsageError, VaecliError, printable
from vaecli.model.family import Codec
from vaecli.ops.device import choose_dtype, dtype_name, parse_device, slow_half_warning
from vaecli.ops.validate import path_text
from vaecli.pipeline.distributed import Workers, by_size, under_torchrun
from vaecli.pipeline.precision import PrecisionGuard
from vaecli.pipeline.progress import Progress
from vaecli.pipeline.record import RECORD_NAME, BatchRecord, stale_reason


def load_model(source: str | None, config: str | None, device: str, dtype: str, attention: str,
               progress: Progress | None = None, stage: str = "decode") -> Codec:
    """source: a local checkpoint (resolved by the caller) or None for the bundled model; progress: says so
    while it loads. stage: "encode" or "decode", for the dtype `auto` picks (`choose_dtype`)."""
    from vaecli.model.checkpoint import load_codec

    if progress is not None:
        progress.stage(f"loading model {Path(source).name if source else 'vaecli-small'}")
    dev = parse_device(device)
    chosen, why = choose_dtype(dtype, dev, stage)
    slow = slow_half_warning(chosen, dev)
    if slow is not None and progress is not None:
        progress.note(f"vaecli: warning: {slow}")
    codec = load_codec(source, device=dev, dtype=chosen, attention=attention, config=config)
    codec.dtype_reason = why
    return codec


def for_stage(codec: Codec, dtype: str, stage: str) -> Codec:
    """The model for `stage` of a job that runs both (roundtrip, demo, plan of a video): `codec` itself, or the
    same weights in the dtype `choose_dtype` picks for that stage."""
    chosen, why = choose_dtype(dtype, codec.device, stage)
    other = codec if chosen == codec.dtype else codec.in_dtype(chosen)
    other.dtype_reason = why
    return other


class Worker:
    """The work of a batch (see the module docstring). Under torchrun (`workers`), each worker computes on its own
    GPU (`--device auto` -> cuda:LOCAL_RANK). The result gets what ran: device, dtype, model, family."""

    def __init__(self, source: str | None, config: str | None, device: str, dtype: str, attention: str,
                 progress: Progress, run: Callable[[Codec, str, object, PrecisionGuard], dict], stage: str):
        self.workers = Workers.detect()
        self.stage = stage
        self.source, self.config, self.dtype, self.attention = source, config, dtype, attention
        self.device = self.workers.device(device) if self.workers else device
        self.progress, self.run = progress, run
        self._model: Codec | None = None
        self.guard: PrecisionGuard | None = None

    def model(self) -> Codec:
        if self._model is None:
            self._model = load_model(self.source, self.config, self.device, self.dtype, self.attention,
                                     self.progress, self.stage)
            self.guard = PrecisionGuard(self._model, self.progress)  # one per batch: its wider copies are kept
        return self._model

    def __call__(self, item: str, target) -> dict:
        m = self.model()
        result = self.run(m, item, target, self.guard)
        result.update(device=str(m.device), dtype=dtype_name(m.dtype), model=m.name, model_hash=m.hash,
                      family=m.family)
        return result


def read_inputs(items: list[str] | None, manifest: Path | None) -> list[str]:
    """The inputs: those given, then a manifest's (one path per line, relative to the manifest's folder; `#`
    starts a comment after whitespace)."""
    found = list(items or [])
    if manifest is not None:
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read manifest {manifest}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"manifest {manifest} is not UTF-8 text (byte {e.start}); write one path per line "
                             "in UTF-8") from None
        for line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            text = re.split(r"\s+#", text, maxsplit=1)[0].strip()
            found.append(text if os.path.isabs(text) else os.path.join(manifest.parent, text))
    if not found:
        raise UsageError("no inputs: give files on the command line or --manifest FILE")
    return [path_text(item, "input") for item in found]


def latents_name(path: Path) -> str:
    stem = path.name.rstrip("/*?") or "frames"
    stem = Path(stem).stem if "*" not in str(path) else path.parent.name
    return f"{stem}.latents.safetensors"


def decoded_name(fmt: str | None) -> Callable[[Path], str]:
    def name(path: Path) -> str:
        stem = path.name
        for suffix in (".latents.safetensors", ".safetensors", ".latent"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return f"{stem}.decoded/" if fmt == "png" else f"{stem}.decoded.{fmt or 'mp4'}"

    return name


def batch_progress(quiet: bool) -> Progress:
    """Bars on a terminal, except under torchrun: its workers share one terminal (notes and errors stay)."""
    if under_torchrun():
        return Progress(bars=False, notes=not quiet)
    return Progress.terminal(quiet)


def targets_of(inputs: list[str], out: Path | str | None, out_dir: Path | None,
               default_name: Callable[[Path], str]) -> Callable[[str], Path | str]:
    """The output of each input (checked before any work: -o takes one input; two inputs may not share one
    output). `out` is kept as given (a str keeps the trailing "/" that asks decode for a PNG folder)."""
    if out is not None and not str(out).strip():
        raise UsageError("-o is empty; name the output file (or folder/)")
    if out is not None and len(inputs) > 1:
        raise UsageError(f"-o takes one input, {len(inputs)} were given; use --out-dir")
    for where in (out, out_dir):
        if where is not None:
            path_text(where, "output")
    if out_dir is not None and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is not a folder; create it first")

    def target_of(item: str):
        target = out if out is not None else (out_dir or Path(item).parent) / default_name(Path(item))
        if isinstance(target, Path) and default_name(Path(item)).endswith("/"):
            target = f"{target}/"
        return target

    seen: dict[str, str] = {}
    for item in inputs:
        key = os.path.abspath(str(target_of(item)))
        if key in seen and seen[key] != item:
            raise UsageError(f"{printable(seen[key])} and {printable(item)} would both write "
                             f"{printable(target_of(item))}; give them different --out-dir folders or names")
        seen[key] = item
    return target_of


class Interrupted(Exception):
    """Ctrl-C during a batch, after its line was printed (the CLI exits 130)."""


def run_batch(inputs: list[str], out: Path | str | None, out_dir: Path | None, default_name, worker: Worker, *,
              skip_existing: bool, as_json: bool, progress: Progress, verb: str) -> int:
    """Run `worker(input, output)` for every input: failures are reported and the rest go on. Returns the exit
    code: 0, 1 if any input failed, 2 if any failed for a usage reason (e.g. latents without fps and no --fps).

    With --out-dir, every finished input is added to the batch record (`vaecli.pipeline.record`). Under torchrun
    (`worker.workers`), inputs are claimed dynamically by the workers and rank 0 prints the summary."""
    target_of = targets_of(inputs, out, out_dir, default_name)
    workers = worker.workers
    record = BatchRecord(out_dir / RECORD_NAME) if out_dir is not None else None
    started = time.perf_counter()
    stats = {"rank": workers.rank if workers else 0, "done": 0, "skipped": 0, "failed": 0, "frames": 0,
             "usage_failed": False}
    order = by_size(inputs) if workers else inputs
    progress.start_files(len(inputs), verb)
    try:
        for index in (workers.claims(len(order)) if workers else range(len(order))):
            result, outcome = _one(worker, record, order[index], target_of(order[index]), skip_existing, stats,
                                   progress)
            stats[outcome] += 1
            if workers is not None:
                result["rank"] = workers.rank
            if record is not None and outcome != "skipped":
                record.append(record_entry(worker, result, outcome))
            progress.file_finished(outcome)
            if as_json:
                progress.result(json.dumps(result, sort_keys=True))
            elif outcome != "failed":
                progress.result(printable(result["output"]))
    except KeyboardInterrupt:  # Ctrl-C: say so and what was done (even with --quiet), then exit 130
        progress.close()
        progress.error(f"interrupted: {verb} {stats['done']} done, {stats['skipped']} skipped, {stats['failed']} "
                       f"failed of {len(inputs)} in {time.perf_counter() - started:.1f} s; nothing partial was "
                       "left behind" + ("; rerun with --skip-existing to go on" if len(inputs) > 1 else ""))
        raise Interrupted() from None
    finally:
        progress.close()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    ranks = workers.gather(stats) if workers else [stats]
    if ranks is None:  # under torchrun, not rank 0: rank 0 reports for everyone
        return 0
    return summarize(ranks, len(inputs), time.perf_counter() - started, workers, as_json, progress, verb)


def _one(worker: Worker, record, item: str, target, skip_existing: bool, stats: dict, progress: Progress
         ) -> tuple[dict, str]:
    """One input: skipped, done or failed (a VaecliError is reported, not raised)."""
    try:
        why = skip_reason(worker, record, target, skip_existing)
        if why is not None:
            return {"input": item, "output": str(target), "skipped": True, "reason": why}, "skipped"
        result = worker(item, target)
        stats["frames"] += int(result.get("frames", 0))
        return result, "done"
    except VaecliError as e:
        stats["usage_failed"] = stats["usage_failed"] or e.exit_code == 2
        text = str(e) if printable(item) in str(e) else f"{item}: {e}"
        progress.error(f"error: {printable(text)}")
        return {"input": item, "output": str(target), "error": str(e)}, "failed"


def summarize(ranks: list[dict], count: int, seconds: float, workers, as_json: bool, progress: Progress,
              verb: str) -> int:
    """The summary (stdout with --json under torchrun; stderr unless --quiet) and the exit code."""
    total = {k: sum(r[k] for r in ranks) for k in ("done", "skipped", "failed", "frames")}
    line = f"{verb}: {total['done']} done, {total['skipped']} skipped, {total['failed']} failed in {seconds:.1f} s"
    if workers is not None:
        summary = {**total, "seconds": round(seconds, 3), "frames_per_second": round(total["frames"] / seconds, 3),
                   "workers": len(ranks), "ranks": ranks}
        if as_json:
            progress.result(json.dumps({"summary": summary}, sort_keys=True))
        progress.note(f"{line} on {len(ranks)} workers ({summary['frames_per_second']:.1f} frames/s); per rank: "
                      + ", ".join(f"{r['rank']}: {r['done']} done/{r['frames']} frames" for r in ranks))
    elif count > 1:  # the summary: on stderr unless --quiet, terminal or not
        progress.note(line)
    if total["failed"]:
        return 2 if any(r["usage_failed"] for r in ranks) else 1
    return 0


def skip_reason(worker: Worker, record, target, skip_existing: bool) -> str | None:
    """Why `target` needs no work (None: do it). Raises when an existing output was made with another model or
    dtype and --skip-existing would otherwise keep it."""
    if not Path(target).exists():
        return None
    entry = record.last(target) if record is not None else None
    workers = worker.workers
    if (workers is not None and workers.attempt > 0 and entry is not None and entry.get("status") == "done"
            and entry.get("run_id") == workers.run_id):
        return "done by an earlier attempt of this run"
    if not skip_existing:
        return None
    model = worker.model()
    metadata = None
    if (entry is None or entry.get("status") != "done") and str(target).endswith(".safetensors"):
        from vaecli.ops.validate import safetensors_header

        try:
            metadata = safetensors_header(Path(target))[1]
        except InputError:
            metadata = None
    stale = stale_reason(entry, model.hash, dtype_name(model.dtype), metadata)
    if stale is not None:
        raise OutputError(f"{printable(target)} exists, but {stale}; pass --overwrite to redo it")
    return "exists"


def record_entry(worker: Worker, result: dict, outcome: str) -> dict:
    entry = {"input": result["input"], "output": result["output"], "status": outcome,
             "run_id": worker.workers.run_id if worker.workers else None,
             "rank": worker.workers.rank if worker.workers else 0}
    if outcome == "failed":
        return {**entry, "error": result.get("error")}
    return {**entry, "model": result.get("model"), "model_hash": result.get("model_hash"), "dtype": result.get("dtype"),
            "plan": result.get("plan"), "frames": result.get("frames"), "seconds": result.get("seconds")}
