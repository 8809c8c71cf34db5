"""Many workers under torchrun: one process per GPU, inputs claimed dynamically, on one machine or many.

`torchrun` (torch.distributed's launcher) starts the workers and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/MASTER_PORT, TORCHELASTIC_RUN_ID and TORCHELASTIC_RESTART_COUNT. The workers exchange nothing but a few
keys, so no process group is formed (no NCCL or gloo connections, nothing to hang on a restart): each worker
connects to torch.distributed's key-value store (`TCPStore`) that torchrun's agent hosts for the run
(`TORCHELASTIC_USE_AGENT_STORE`), or that rank 0 hosts when the variables come from another launcher, and claims
inputs from an atomic counter in it (`store.add`): a worker takes the next input when it has finished the last, so
long and short videos spread themselves over the workers and all finish together. The counter is keyed by run and
attempt, so an attempt restarted by torchrun (`--max-restarts`) starts claiming from the beginning again and skips
what the batch record says is done.

Without torchrun (no RANK/WORLD_SIZE in the environment) `Workers.detect()` is None and nothing here runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

from vaecli.errors import UsageError

# the store's timeout bounds how long rank 0 waits for the others' counts at the end: a worker may be decoding a
# long video while rank 0 has finished, so it is long (a dead worker is seen by torchrun, which stops the job)
STORE_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Workers:
    """This worker's place among torchrun's workers.

    rank / world: this worker and their number (all machines); local_rank: its index on this machine (its GPU);
    run_id / attempt: torchrun's run and restart count; store: the process group's key-value store.
    """

    rank: int
    world: int
    local_rank: int
    run_id: str
    attempt: int
    store: Any = None

    @classmethod
    def detect(cls) -> "Workers | None":
        """Connect to torchrun's store when this process is one of its workers; None otherwise."""
        env = os.environ
        if not under_torchrun():
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", "0"))
            attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
        except ValueError:
            raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK must be integers (they are set by torchrun)") from None
        if not 0 <= rank < world or local_rank < 0:
            raise UsageError(f"RANK {rank} is not within WORLD_SIZE {world}")
        import torch.distributed as dist

        host, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if not host or not (port or "").isdigit():
            raise UsageError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun")
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(host, int(port), world_size=None if agent else world,
                              is_master=not agent and rank == 0, timeout=STORE_TIMEOUT,
                              wait_for_workers=False)
        return cls(rank, world, local_rank, env.get("TORCHELASTIC_RUN_ID", "none"), attempt, store)

    def device(self, requested: str) -> str:
        """--device auto -> this worker's GPU (cuda:LOCAL_RANK) where there is one, else the CPU."""
        import torch

        if requested != "auto":
            return requested
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def _key(self, name: str) -> str:
        return f"vaecli/{self.run_id}/{self.attempt}/{name}"

    def claims(self, count: int) -> Iterator[int]:
        """Indices 0..count-1, each given to exactly one worker, in order, as workers ask for them."""
        while True:
            index = int(self.store.add(self._key("next"), 1)) - 1
            if index >= count:
                return
            yield index

    def gather(self, stats: dict) -> list[dict] | None:
        """Every worker's `stats` (JSON-able), in rank order, on rank 0 (None on the others)."""
        self.store.set(self._key(f"stats/{self.rank}"), json.dumps(stats))
        if self.rank != 0:
            return None
        keys = [self._key(f"stats/{r}") for r in range(self.world)]
        self.store.wait(keys, STORE_TIMEOUT)
        return [json.loads(self.store.get(k)) for k in keys]


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def by_size(inputs: list[str]) -> list[str]:
    """The inputs, largest first (ties by name): every worker computes the same order, and the longest videos
    start first, so that no worker is left with one long video after the others have finished."""

    def size(item: str) -> int:
        try:
            if os.path.isdir(item):
                return sum(e.stat().st_size for e in os.scandir(item) if e.is_file())
            return os.stat(item).st_size
        except OSError:
            return 0

    return sorted(inputs, key=lambda item: (-size(item), item))
