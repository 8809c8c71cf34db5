"""Models by name: the bundled model (`vaecli-small`) and Hugging Face repositories (`ORG/REPO`).

A Hugging Face model is found through `huggingface_hub` (its cache, its offline mode, its downloads):

- when the cache holds a VAE for the revision (branch or tag as last fetched, or a commit), it is used without any
  network request (pin a commit with --revision to be sure of the weights);
- else, online, the repository's file list says what to fetch, and only those files are downloaded;
- offline (`HF_HUB_OFFLINE=1`), a model that is not in the cache is an error that says so.

Which files: a diffusers VAE in `vae/` (a pipeline such as stabilityai/stable-video-diffusion-img2vid-xt), else a
diffusers VAE at the top (a VAE repository such as stabilityai/sd-vae-ft-mse), else the one `.safetensors` file at
the top (a ComfyUI-style VAE file). Safetensors files only: pickles are never downloaded or loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from vaecli.errors import CheckpointError, InputError, printable

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# a name ending like a local file is never taken for a repository
LOCAL_SUFFIXES = (".safetensors", ".latent", ".ckpt", ".pt", ".pth", ".bin", ".json", ".toml", ".mp4", ".webm", ".gif",
                  ".mkv", ".mov", ".avi", ".png", ".jpg", ".jpeg")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def resolve_model(spec: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
                  offline: bool | None = None) -> Path:
    """A --model value -> a local checkpoint file or diffusers folder.

    spec: a local path (taken as given when it exists), the bundled model's name, or a Hugging Face repository id;
    revision: branch, tag or commit of a repository (default: main); cache_dir / offline: huggingface_hub's
    (default: its HF_HUB_CACHE and HF_HUB_OFFLINE settings).
    """
    path = Path(spec)
    if path.exists():
        if revision is not None:
            raise InputError(f"--revision applies to Hugging Face repositories, and {printable(spec)} is a local path")
        return path
    from vaecli.model.checkpoint import BUNDLED_MODEL, bundled_model_path

    if spec in (BUNDLED_MODEL, BUNDLED_MODEL.removesuffix(".safetensors")):
        return bundled_model_path()
    if is_repo_id(spec):
        return hub_model(spec, revision, cache_dir=cache_dir, offline=offline)
    raise InputError(f"{printable(spec)}: no such file or folder")


def is_repo_id(spec: str) -> bool:
    return bool(REPO_ID.fullmatch(spec)) and not spec.lower().endswith(LOCAL_SUFFIXES) and ".." not in spec


def choose_files(files: list[str]) -> list[str] | None:
    """The files of a repository (paths relative to its root) -> the ones to load, or None if it holds no VAE.

    Order: diffusers VAE in `vae/`, diffusers VAE at the top, the single top-level `.safetensors` file. A full
    weights file is preferred to its fp16 variant."""
    present = set(files)
    for folder in ("vae/", ""):
        for name in WEIGHTS:
            if folder + name in present and folder + "config.json" in present:
                return [folder + "config.json", folder + name]
    top = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    return top if len(top) == 1 else None


def hub_model(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
              offline: bool | None = None) -> Path:
    """The VAE of a Hugging Face repository, from the cache when it holds one for that revision (no network),
    else downloaded (when online); returns the local file or diffusers folder."""
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download
    except ImportError:
        raise InputError(f"{printable(repo_id)} is not a local path, and huggingface_hub (to load it from the Hugging "
                         "Face Hub) is not installed: pip install huggingface_hub") from None
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    where = repo_id + (f"@{revision}" if revision else "")
    cached = _cached_files(repo_id, revision, cache_dir)
    if cached is not None and choose_files(cached) is not None:
        files, local = cached, True
    elif offline:
        held = "holds no VAE for it" if cached is not None else "does not hold it"
        raise InputError(f"{printable(where)}: not a local path, and the Hugging Face cache {held} (HF_HUB_OFFLINE is "
                         "set); download it once online, or pass a local file")
    else:
        try:  # one request (model_info does not retry): the file list says what to download
            info = HfApi().model_info(repo_id, revision=revision)
        except _network_errors() as e:
            raise InputError(f"{printable(where)}: not a local path, not in the Hugging Face cache, and the Hub "
                             f"cannot be reached or refused it ({_first_line(e)})") from None
        files, local = [s.rfilename for s in info.siblings or []], False
    chosen = choose_files(files)
    if chosen is None:
        raise CheckpointError(f"{printable(where)}: {_no_vae(files)}")
    paths = []
    for name in chosen:
        try:
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                              local_files_only=local)))
        except _network_errors() as e:
            raise InputError(f"{printable(where)}: cannot fetch {name}: {_first_line(e)}") from None
    weights = paths[-1]
    return weights.parent if weights.name in WEIGHTS else weights


def _no_vae(files: list[str]) -> str:
    top = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    pickles = [f for f in files if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    if len(top) > 1:
        return f"several top-level .safetensors files ({', '.join(top[:4])}); download one and pass its path"
    if pickles:
        return f"no safetensors VAE weights (only pickles such as {pickles[0]}, which vaecli never loads)"
    return "no VAE weights (diffusion_pytorch_model.safetensors with config.json, in vae/ or at the top, or one " \
           ".safetensors file)"


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached or refuses: its HTTP errors, offline mode, and the
    transport errors of the HTTP client it uses (httpx, or its fork httpx2 in recent versions)."""
    import importlib

    from huggingface_hub import errors

    found: list[type[BaseException]] = [errors.HfHubHTTPError, errors.OfflineModeIsEnabled,
                                        errors.LocalEntryNotFoundError, OSError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _cached_files(repo_id: str, revision: str | None, cache_dir) -> list[str] | None:
    """The files of `repo_id` at `revision` (a ref such as main, or a commit) held in the cache, or None."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError):
        return None
    wanted = revision or "main"
    for repo in info.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if wanted in rev.refs or rev.commit_hash == wanted:
                return sorted(f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return printable(text[0] if text else type(e).__name__)
