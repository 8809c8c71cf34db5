"""Device and dtype parsing and free-memory queries. Imports nothing from vaecli but errors."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

from vaecli.errors import BackendError, UsageError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"fp16"`, `"bf16"`, `"fp32"` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise UsageError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


def cpu_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The CPU flag that makes bf16 matrix math native here (`amx_bf16` or `avx512_bf16`), or None.

    cpuinfo: the text of /proc/cpuinfo (read when None; tests pass their own). The environment variable
    `VAECLI_CPU_BF16=1` (or `0`) overrides what the flags say (the test suite sets 0, so its default decodes are
    fp32 on every machine)."""
    forced = os.environ.get("VAECLI_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return "VAECLI_CPU_BF16=1" if forced == "1" else None
    flags = _cpu_flags(cpuinfo)
    return next((name for name in ("amx_bf16", "avx512_bf16") if name in flags), None)


def choose_dtype(dtype: str | torch.dtype, device: torch.device, stage: str = "decode",
                 cpuinfo: str | None = None) -> tuple[torch.dtype, str]:
    """The dtype a stage ("encode" or "decode") runs in, and why.

    `auto`: bf16 on CUDA (fp16 where the GPU has no bf16); on CPU, bf16 for decoding where the CPU computes bf16
    natively (2-2.6x faster than fp32, ~60 dB from the fp32 frames: below 8-bit rounding) and fp32 elsewhere, and
    fp32 for encoding always (bf16 changes latents measurably). Anything else: that dtype for both stages."""
    if dtype != "auto":
        chosen = parse_dtype(dtype)
        return chosen, f"{dtype_name(chosen)}: chosen by the user (--dtype)"
    if device.type != "cpu":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16: auto on CUDA"
        return torch.float16, "fp16: auto on a GPU without bf16"
    if stage == "encode":
        return torch.float32, "fp32: auto for encoding on CPU (bf16 changes latents measurably)"
    feature = cpu_bf16_feature(cpuinfo)
    if feature is None:
        return torch.float32, "fp32: auto on a CPU without native bf16 (no avx512_bf16 or amx_bf16)"
    return torch.bfloat16, f"bf16: auto for decoding on a CPU with native bf16 ({feature}); --dtype fp32 for fp32"


def slow_half_warning(dtype: torch.dtype, device: torch.device, cpuinfo: str | None = None) -> str | None:
    """A warning when half precision is asked for on a CPU that does not compute it natively (emulated: measured
    28x slower than fp32 for fp16 on a 2-core EPYC), else None."""
    if device.type != "cpu" or dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and cpu_bf16_feature(cpuinfo) is not None:
        return None
    if dtype == torch.float16 and _cpu_flags(cpuinfo) & {"avx512_fp16", "amx_fp16"}:
        return None
    name = dtype_name(dtype)
    return (f"{name} on a CPU without native {name} is emulated and many times slower than fp32; use --dtype auto "
            "(or fp32)")


def _cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return set()
    return set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                     if line.startswith(("flags", "Features")) and ":" in line), []))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, stage: str = "decode") -> torch.dtype:
    """The dtype of `choose_dtype`, without the reason."""
    return choose_dtype(dtype, device, stage)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def parse_device(device: str | torch.device) -> torch.device:
    """`"cpu"`, `"cuda"`, `"cuda:1"` or `"auto"` -> torch device; `auto` takes the CUDA device with most free memory."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            best = max(range(torch.cuda.device_count()), key=lambda i: free_memory(torch.device("cuda", i)))
            return torch.device("cuda", best)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`.

    CUDA: the driver's free memory plus what torch's caching allocator holds but does not use.
    CPU: MemAvailable from /proc/meminfo (or a conservative 4 GiB where that file does not exist).
    """
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        cached_unused = stats.get("reserved_bytes.all.current", 0) - stats.get("active_bytes.all.current", 0)
        driver_free, _total = torch.cuda.mem_get_info(device)
        return int(driver_free + cached_unused)
    return _cpu_available_bytes()


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 4 << 30


def process_rss() -> int:
    """This process's resident set size in bytes (from /proc/self/statm; 0 where that file does not exist)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_host_memory(device: torch.device) -> bool:
    """Give the free pages of the C heap back to the system (glibc's `malloc_trim`), on CPU. Returns whether it
    could.

    A decode frees and allocates tensors of many sizes; glibc serves those under its (dynamic, up to 32 MiB) mmap
    threshold from the heap, where the holes between live blocks stay resident. Counted prices do not see those
    holes: a bf16 decode of 8-px Wan tiles measured 6.5 GB peak RSS for 5.5 GB predicted; trimmed after every
    tile, 4.1 GB, in the same time (docs/memory.md). Called between the steps and tiles of a decode or encode;
    a no-op off Linux/glibc and on other devices."""
    if device.type != "cpu":
        return False
    trim = _malloc_trim()
    return bool(trim and trim(0) is not None)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
