"""One preparation for `plan`, `decode` and `encode`: the budget, the plan, and the refusal of a ceiling.

`vaecli plan` and the jobs call the same functions with the same loaded model (`Codec`), so the plan printed is
the plan that runs. Budgets are computed from stable quantities only — the free memory, the `--max-memory`
ceiling, the model's weights and a fixed allowance for the runtime — never from the process's momentary resident
set, so two runs with the same inputs get the same plan and a figure in a refusal is accepted when given back.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import torch

from vaecli.errors import OutOfMemory, OutputError, UsageError
from vaecli.model.family import Codec
from vaecli.model.plan import Budget, Plan, format_bytes
from vaecli.ops.device import free_memory
from vaecli.ops.scratch import free_bytes

CPU_SHARE = 0.4  # on CPU, plan within this share of the available memory: an OOM there is a SIGKILL
# ... and, without --max-memory, within this ceiling too where an exact plan fits in it (weights and runtime
# included, as --max-memory 4GiB): on a CPU the exact disk-backed stream costs little more time than keeping a
# long clip in memory (bikes, 250 frames 640x272: 5:45 at 2.6 GiB against 4:32 at 9.1 GiB, docs/performance.md),
# so memory beyond this buys little and risks the kill. An exact plan that needs more (a Wan decode at 480p) gets
# the whole share instead of a refusal; --max-memory sets the ceiling outright
CPU_DEFAULT_CEILING = 4 << 30
# what Python, torch, PyAV and vaecli hold on CPU besides the weights and the plan's activations (measured: 235-260
# MiB resident after the imports; the cost model's own overhead covers allocator slack and the writers' buffers)
RUNTIME_BYTES = 320 << 20
MAX_BYTES = 1 << 60  # --max-memory above this (an exabyte) is not a ceiling anyone means
DISK_MARGIN = 0.05  # share of a scratch disk's free space a plan leaves free (and 1 GiB)


def parse_bytes(text: str | None) -> int | None:
    """"512MiB", "8GiB", "1.5GB", "1000000" -> bytes (GiB/MiB/KiB binary, GB/MB/KB decimal), at most 2**60."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})\s*([KMGT]?i?B?)\s*", text, flags=re.I)
    if not match:
        raise UsageError(f"--max-memory must look like 512MiB or 8GiB, not {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    powers = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "KB": 1000, "M": 1 << 20, "MIB": 1 << 20, "MB": 10**6,
              "G": 1 << 30, "GIB": 1 << 30, "GB": 10**9, "T": 1 << 40, "TIB": 1 << 40, "TB": 10**12}
    if unit not in powers:
        raise UsageError(f"--max-memory unit must be KiB, MiB, GiB or TiB (or KB, MB, GB), not {unit!r}")
    value = number * powers[unit]
    if value > MAX_BYTES:
        raise UsageError(f"--max-memory {text.strip()} is more than any machine has; give at most 1 EiB")
    return int(value)


def default_budget(device: torch.device) -> int:
    """Memory a plan may use on `device` without --max-memory: what is free on CUDA, `CPU_SHARE` of it on CPU."""
    free = free_memory(device)
    return int(free * CPU_SHARE) if device.type == "cpu" else free


def host_memory(device: torch.device) -> int | None:
    """Host memory a parked clip may take (CUDA only: on a CPU device the host is the device)."""
    if device.type == "cpu":
        return None
    return default_budget(torch.device("cpu"))


def overhead_bytes(codec: Codec) -> int:
    """What a --max-memory ceiling holds besides the plan's activations: the weights, and on CPU (where the ceiling
    is the process's resident set) the runtime too."""
    return codec.weights_bytes() + (RUNTIME_BYTES if codec.device.type == "cpu" else 0)


def scratch_space(folder: str | Path) -> int:
    """Scratch bytes a disk-backed plan may take in `folder`: its free space less a margin (1 GiB and 5 %), so
    the disk the outputs go to is not filled to the last block."""
    free = free_bytes(folder)
    return max(0, int(free * (1 - DISK_MARGIN)) - (1 << 30))


def check_scratch(plan: Plan) -> None:
    """Before any work: a plan that keeps the clip on disk still finds its scratch space free."""
    if plan.disk_bytes and scratch_space(plan.scratch) < plan.disk_bytes:
        raise OutputError(f"scratch folder {plan.scratch}: the exact plan keeps the clip on disk and needs "
                          f"{format_bytes(plan.disk_bytes)} free (and a margin); free space there or give "
                          "--scratch DIR on a larger disk")


def budget_for(codec: Codec, max_memory: int | None, scratch: str | Path | None = None,
               preferred: bool = True) -> Budget:
    """The activation budget of a job on the codec's device: the default share of the free memory (on CPU also
    within `CPU_DEFAULT_CEILING` when `preferred`), or within the ceiling `max_memory` (weights and, on CPU, the
    runtime included). A model built for plans only (not resident) has its weights taken from the free memory
    too. scratch: the folder a clip may be kept in on disk (None: no disk tier)."""
    device = codec.device
    free = default_budget(device) if max_memory is None else free_memory(device)
    if not codec.resident:
        free -= codec.weights_bytes()
    ceiling = CPU_DEFAULT_CEILING if max_memory is None and device.type == "cpu" and preferred else max_memory
    available = free if ceiling is None else min(free, ceiling - overhead_bytes(codec))
    disk = None if scratch is None else scratch_space(scratch)
    folder = None if scratch is None else str(Path(scratch).absolute())
    return Budget(device, max(0, available), host_memory(device), disk, folder)


def enforce_max_memory(device: torch.device, max_memory: int | None) -> None:
    """On CUDA, make torch's allocator refuse to go past `max_memory` for this process."""
    if max_memory is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory / total), device)


def with_runtime(codec: Codec, plan: Plan) -> Plan:
    """The plan with the runtime allowance in its predicted peak (on CPU; the peak is then what a ceiling holds)
    and the reason for its dtype among its reasons."""
    reasons = plan.reasons + ((f"dtype {codec.dtype_reason}",) if codec.dtype_reason else ())
    return dataclasses.replace(plan, runtime_bytes=overhead_bytes(codec) - codec.weights_bytes(), reasons=reasons)


def needed_ceiling(plan: Plan) -> int:
    """The smallest --max-memory at which `plan` fits (rounded up to a whole MiB)."""
    return -(-plan.predicted_peak_bytes // (1 << 20)) << 20


def check_ceiling(codec: Codec, plan: Plan, max_memory: int | None) -> Plan:
    """On CPU a plan that does not fit is refused before any work — under a `--max-memory` ceiling, or the default
    budget: going over would break the promise, and running out there is a SIGKILL that nothing catches (on CUDA
    torch's memory fraction enforces a ceiling and an out-of-memory is recovered from). The figure named is one
    the same command then accepts as --max-memory."""
    if plan.device != "cpu" or plan.fits:
        return plan
    need = needed_ceiling(plan) >> 20  # whole MiB, rounded up
    free = free_memory(torch.device("cpu"))
    if (need << 20) > free:  # no ceiling can make it fit on this machine
        raise OutOfMemory(f"the {plan.stage} needs about {need} MiB, more than this machine has available "
                          f"({format_bytes(free)}); use smaller frames (--size)")
    if max_memory is not None:
        raise OutOfMemory(f"--max-memory {format_bytes(max_memory)} is too small: the smallest plan needs about "
                          f"{need} MiB; raise it to that or more")
    what = "frames" if plan.stage == "encode" else "latents"
    raise OutOfMemory(f"the {plan.stage} of these {what} needs about {need} MiB, more than the "
                      f"{int(CPU_SHARE * 100)}% of the available memory vaecli plans within on this CPU by default; "
                      f"use smaller frames (--size), or --max-memory {need}MiB if that much is really free")


def default_plan(codec: Codec, plan_with: Callable[[Budget], Plan], max_memory: int | None,
                 scratch: str | Path | None = None) -> Plan:
    """`plan_with(budget)` within the ceiling. On CPU without --max-memory: within `CPU_DEFAULT_CEILING` when an
    exact plan fits there, else within the whole default share (an exact plan that fits it, or the one that
    fits at all), so that the preference never turns an exact job into an approximate or refused one, nor into
    more work (exact tiles that compute their halos again, where the share fits larger tiles or whole frames)."""
    plan = plan_with(budget_for(codec, max_memory, scratch))
    if max_memory is None and codec.device.type == "cpu" and not (plan.fits and plan.exact and plan.work <= 1):
        wider = plan_with(budget_for(codec, None, scratch, preferred=False))
        if wider.fits and (not plan.fits or (wider.exact and (not plan.exact or wider.work < plan.work))):
            return wider
    return plan


def decode_plan(codec: Codec, frames: int, latent_hw: tuple[int, int], *, max_memory: int | None = None,
                attention: str = "auto", chunk: int | None = None, overlap: int | None = None,
                tile: int | None = None, budget: Budget | None = None, scratch: str | Path | None = None) -> Plan:
    """The decode plan of `frames` latent frames: within `budget` when given (OOM recovery: nothing forced), else
    within the ceiling, as forced (--chunk, --overlap, --tile), and refused on CPU when nothing fits the ceiling.
    scratch: the folder where a clip that fits nowhere in memory may be kept on disk."""
    if budget is not None:
        if scratch is not None and budget.scratch is None:
            budget = dataclasses.replace(budget, disk_bytes=scratch_space(scratch),
                                         scratch=str(Path(scratch).absolute()))
        return with_runtime(codec, codec.plan_decode(frames, latent_hw, budget, attention=attention))
    plan = default_plan(codec, lambda b: codec.plan_decode(frames, latent_hw, b, attention=attention, chunk=chunk,
                                                           overlap=overlap, tile=tile), max_memory, scratch)
    return check_ceiling(codec, with_runtime(codec, plan), max_memory)


def encode_plan(codec: Codec, frames: int, size_hw: tuple[int, int], *, max_memory: int | None = None,
                attention: str = "auto", batch: int | None = None, budget: Budget | None = None) -> Plan:
    """The encode plan of `frames` frames of size_hw (pixels), as `decode_plan`."""
    if budget is not None:
        return with_runtime(codec, codec.plan_encode(frames, size_hw, budget, attention=attention))
    plan = default_plan(codec, lambda b: codec.plan_encode(frames, size_hw, b, attention=attention, batch=batch),
                        max_memory)
    return check_ceiling(codec, with_runtime(codec, plan), max_memory)
