"""The batch record: what a batch made, so that a re-run neither redoes finished work nor reuses stale outputs.

`vaecli-batch.jsonl` in the --out-dir holds one JSON line per finished input, appended under an exclusive lock
(`flock`) by every worker of every run, on any number of machines sharing the folder:

    {"input", "output", "status": "done"|"failed", "model", "model_hash", "dtype", "plan", "frames", "seconds",
     "run_id", "rank", "time", "error"?}

The last line for an output wins. A re-run with `--skip-existing` skips an output only when its line says it was
made with the same model (hash of the weights) and dtype; otherwise the input fails with a message naming both, and
`--overwrite` redoes it. Under torchrun a restarted attempt of the same run (`TORCHELASTIC_RUN_ID`) takes what an
earlier attempt finished as done, whatever the flags.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from vaecli.errors import OutputError

RECORD_NAME = "vaecli-batch.jsonl"
MAX_RECORD = 1 << 30  # a record over 1 GiB is not read (10^6 inputs take ~1 GiB at most)


class BatchRecord:
    """The record of one --out-dir: read once when a batch starts, appended to as inputs finish."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        except OSError as e:
            raise OutputError(f"cannot read the batch record {path}: {e.strerror}") from None
        if size > MAX_RECORD:
            raise OutputError(f"the batch record {path} is over 1 GiB; move it away to start a new one")
        with open(path, "rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except ValueError:  # a line cut by a crash, or edited by hand: ignored
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("output"), str):
                    self.entries[key(entry["output"])] = entry

    def last(self, output: str | os.PathLike) -> dict | None:
        """The newest line for `output`, or None."""
        return self.entries.get(key(output))

    def append(self, entry: dict) -> None:
        """Add one line (whole, under an exclusive lock, so that workers and machines never interleave)."""
        entry = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"cannot write the batch record {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)  # releases the lock
        self.entries[key(entry["output"])] = entry


def key(output: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(output).rstrip("/") or "/")


def stale_reason(entry: dict | None, model_hash: str, dtype: str, metadata: dict | None = None) -> str | None:
    """Why an existing output cannot stand for this run's (model, dtype): None when it can.

    entry: its line in the record; metadata: the output's own vaecli metadata (latent files carry `model.hash`
    and `dtype`), used when the record has no line for it. Neither: nothing to compare, taken as it is."""
    if entry is not None and entry.get("status") == "done":
        made = (entry.get("model_hash"), entry.get("dtype"), entry.get("model"))
    elif metadata and metadata.get("model.hash"):
        made = (metadata.get("model.hash"), metadata.get("dtype"), metadata.get("model.name"))
    else:
        return None
    if made[0] != model_hash:
        return f"it was made with another model ({made[2]}, weights {str(made[0])[:12]})"
    if made[1] is not None and made[1] != dtype:
        return f"it was made in {made[1]}, this run computes in {dtype}"
    return None
