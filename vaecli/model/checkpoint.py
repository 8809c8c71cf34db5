"""Checkpoint files, whatever the family: safetensors only, the family found from the tensor names.

`read_checkpoint` finds the weights (a file, or a diffusers folder with `diffusion_pytorch_model.safetensors`
directly or in `vae/`), validates the header, asks the families which one the keys belong to
(`vaecli.model.family.detect`) and lets that family read its tensors and config. Pickle-based files (.ckpt,
.pt, .pth, .bin) are refused and never opened with pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vaecli._version import __version__
from vaecli.errors import CheckpointError, InputError, OutputError, UsageError, printable
from vaecli.model.family import Checkpoint, Codec, detect
from vaecli.ops.attention import AttentionBackend, resolve_attention
from vaecli.ops.device import choose_dtype, parse_device, parse_dtype, slow_half_warning
from vaecli.ops.files import atomic_output, write_error
from vaecli.ops.validate import FLOAT_DTYPES, number, parse_json, regular_file, safetensors_header

BUNDLED_MODEL = "vaecli-small.safetensors"
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


# ----------------------------------------------------------------------------------------------- reading files


def find_weights_file(source: str | os.PathLike) -> tuple[Path, dict]:
    """A checkpoint path -> (safetensors file, diffusers config.json contents or {}).

    A folder is searched for `diffusion_pytorch_model[.fp16].safetensors`, directly or in `vae/`.
    """
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        for folder in (path, path / "vae"):
            for name in DIFFUSERS_FILES:
                if (folder / name).is_file():
                    return folder / name, _read_json(folder / "config.json")
        pickles = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)[:3]
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise CheckpointError(f"{path}: a folder without diffusion_pytorch_model.safetensors (in it or in vae/){hint}")
    config_json = path.parent / "config.json"
    return path, (_read_json(config_json) if path.name in DIFFUSERS_FILES else {})


def _read_json(path: Path) -> dict:
    """A diffusers config.json: a JSON object (missing: {}); its scaling_factor a finite positive number."""
    if not path.exists():
        return {}
    regular_file(path, CheckpointError)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{printable(path)}: cannot read ({e.strerror})") from None
    if len(raw) > 1 << 20:
        raise CheckpointError(f"{printable(path)}: a config.json of {len(raw)} bytes is not a VAE config")
    config = parse_json(raw, printable(path), CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{printable(path)}: config.json must be a JSON object, not {type(config).__name__}")
    if "scaling_factor" in config:
        try:
            config["scaling_factor"] = number(config["scaling_factor"], printable(path), "scaling_factor", 1e-6, 1e6)
        except InputError as e:
            raise CheckpointError(str(e)) from None
    return config


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Validate a safetensors file without loading tensors -> (tensor entries, `__metadata__`).

    Refuses pickle/zip files (torch.save) by their first bytes, then anything `validate.safetensors_header`
    refuses (corrupt or truncated headers, shapes that do not match their bytes, non-regular files)."""
    regular_file(path, CheckpointError)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{printable(path)}: cannot read ({e.strerror})") from None
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and (_looks_pickled(head) or path.suffix in PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{printable(path)}: a pickle-based PyTorch file; vaecli never unpickles files (they can run code). "
            "Convert it to .safetensors with a tool you trust, or use the model's safetensors release")
    header, metadata, _ = safetensors_header(path, CheckpointError)
    return header, metadata


class InMemory(PurePosixPath):
    """The weights of a loaded module (a diffusers VAE in a pipeline) standing in for a checkpoint file, so the
    families read them as they read files: named `<name>/diffusion_pytorch_model.safetensors`; `state` holds the
    module's tensors (its parameters' storage, not copies)."""

    state: dict[str, torch.Tensor]


def module_checkpoint(module: torch.nn.Module, name: str = "pipeline-vae") -> Checkpoint:
    """The checkpoint of a loaded diffusers VAE module: its tensors (shared, not copied) and `module.config` as the
    config.json, read by the family whose keys they are."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    path = InMemory(name, DIFFUSERS_FILES[0])
    path.state = state
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header = {k: {"dtype": dtypes.get(v.dtype, str(v.dtype)), "shape": list(v.shape)} for k, v in state.items()}
    config = getattr(module, "config", None)  # diffusers: a FrozenDict (its config.json); others: not a mapping
    config_json = dict(config) if isinstance(config, Mapping) else {}
    family, layout = detect(header)
    return family.read(path, layout, header, {}, config_json, None)


def read_tensors(path: Path, header: dict, names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors `names` of a validated file (`read_header`), floating point and finite (else a CheckpointError
    naming the tensor), keyed without `prefix`; of an `InMemory` module, its own tensors."""
    bad = [n for n in names if header[n]["dtype"] not in FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{printable(path)}: tensor {printable(bad[0])} is {header[bad[0]]['dtype']}; "
                              "VAE weights are floating point")
    try:
        if isinstance(path, InMemory):
            raw = {name[len(prefix):]: path.state[name] for name in names}
        else:
            with safe_open(str(path), framework="pt") as f:
                raw = {name[len(prefix):]: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{printable(path)}: cannot read tensors ({printable(e)})") from None
    for name, tensor in raw.items():  # one pass, negligible next to reading the file
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{printable(path)}: tensor {printable(prefix + name)} holds NaN or inf; "
                                  "the checkpoint is corrupt")
    return raw


def _looks_pickled(head: bytes) -> bool:
    """A zip archive (torch.save since 1.6) or a raw pickle stream (protocol 2-5 opcode)."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_checkpoint(source: str | os.PathLike, config=None) -> Checkpoint:
    """Read the VAE of a checkpoint (its tensors only, in its family's naming) and work out its config.

    config: a named config, TOML path or config value for what shapes cannot tell (of the file's family)."""
    path, config_json = find_weights_file(source)
    header, metadata = read_header(path)
    family, layout = detect(header)
    return family.read(path, layout, header, metadata, config_json, config)


def bundled_model_path() -> Path:
    path = Path(str(resources.files("vaecli"))) / "weights" / BUNDLED_MODEL
    if not path.is_file():
        raise CheckpointError("no bundled model is installed in this version of vaecli yet; pass a checkpoint "
                              "(load_vae('svd_xt.safetensors') or --model PATH)")
    return path


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the weights cast to fp16, keys sorted: equal for an fp32 checkpoint and its fp16
    copy, whatever dtype the model then computes in."""
    h = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float16).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_codec(source: str | os.PathLike | None, *, device: torch.device, dtype: torch.dtype,
               attention: str = "auto", config=None) -> Codec:
    """Load a checkpoint (None: the bundled model) as the pipeline's `Codec`; its hash is of the weights as
    stored, so latent files made with any dtype of the same checkpoint match."""
    ckpt = read_checkpoint(bundled_model_path() if source is None else source, config)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a job runs one frame size: autotuned convolutions pay off
    return ckpt.family.build(ckpt, device=device, dtype=dtype, attention=attention, hash=weights_hash(ckpt.state))


def load_vae(source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = torch.float32, attention: str | AttentionBackend = "auto",
             config=None) -> torch.nn.Module:
    """Load a VAE from a safetensors checkpoint (any supported layout), or the bundled model when `source` is None.

    device: "cpu", "cuda", "cuda:N" or "auto"; dtype: torch dtype, "fp32"/"fp16"/"bf16" or "auto" (bf16 on
    CUDA, fp32 on CPU; a half dtype on a CPU that only emulates it warns) (tensors of any
    float dtype in the file are converted); attention: a backend name, "auto", or an AttentionBackend (the
    model's default; encode/decode take another per call); config: a named config, a TOML path or a config
    value, for what shapes cannot tell (e.g. "sdxl-vae"). Returns the family's plain module in eval mode
    (`vae.config` and `vae.attention` say what was built).
    """
    device = parse_device(device)
    dtype = choose_dtype(dtype, device, "encode")[0]  # "auto": bf16 on CUDA, fp32 on CPU (encode-safe)
    slow = slow_half_warning(dtype, device)
    if slow is not None:
        warnings.warn(slow.replace("--dtype auto", 'dtype="auto"'), stacklevel=2)
    backend = attention if isinstance(attention, AttentionBackend) else resolve_attention(attention, device, dtype)
    ckpt = read_checkpoint(bundled_model_path() if source is None else source, config)
    return ckpt.family.module(ckpt, device=device, dtype=dtype, attention=backend)


# ------------------------------------------------------------------------------------------------- writing


def write_checkpoint(state: dict[str, torch.Tensor], metadata: dict[str, str], out: str | os.PathLike, *,
                     layout: str, overwrite: bool = False, dtype: torch.dtype | None = None,
                     config_json: dict | None = None) -> Path:
    """Write tensors (already in `layout`) atomically: one safetensors file, or, for a diffusers layout and a
    name without .safetensors, a folder with `config.json` and `diffusion_pytorch_model.safetensors`."""
    out = Path(out)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "vaecli.version": __version__, **metadata}
    folder = config_json is not None and out.suffix != ".safetensors"
    if not folder and out.suffix != ".safetensors":
        raise UsageError(f"{out}: the output of --to {layout} must end in .safetensors")
    owned = {DIFFUSERS_FILES[0], "config.json"}
    with atomic_output(out, overwrite, kind="folder" if folder else "file", owns=owned.__contains__) as tmp:
        try:
            if folder:
                save_file(state, str(tmp / DIFFUSERS_FILES[0]), metadata=metadata)
                (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
            else:
                save_file(state, str(tmp), metadata=metadata)
        except OSError as e:  # a full disk: the temporary goes, nothing partial is left
            raise write_error(out, e) from None
        except SafetensorError as e:  # safetensors reports the OS error inside its own: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            reason = os.strerror(int(code.group(1))) if code else printable(e)
            raise OutputError(f"{out}: write failed ({reason})") from None
    return out


def convert_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, to: str, dtype: str | None = None,
                       overwrite: bool = False, config=None) -> Path:
    """Read any supported layout, write it as `to` (a layout of the file's family); extracts the VAE of a full
    checkpoint."""
    ckpt = read_checkpoint(source, config)
    return ckpt.family.convert(ckpt, out, to=to, dtype=parse_dtype(dtype) if dtype else None, overwrite=overwrite)


def describe_checkpoint(source: str | os.PathLike, config=None) -> dict:
    """What `vaecli info` prints for a checkpoint (`summary`: the family's lines about the architecture)."""
    ckpt = read_checkpoint(source, config)
    fields, lines = ckpt.family.describe(ckpt)
    result = {"kind": "checkpoint", "path": str(ckpt.path), "family": ckpt.family.name,
              "family_title": ckpt.family.title, "layout_detail": ckpt.layout.describe(),
              "config": ckpt.config.to_dict(), "parameters": ckpt.parameters, "tensors": len(ckpt.state),
              "dtypes": list(ckpt.file_dtypes), "summary": lines, **fields}
    return result
