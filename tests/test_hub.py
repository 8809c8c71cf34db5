"""Models by name: Hugging Face repositories through huggingface_hub, from a cache folder the tests build (no
network), and the bundled model's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import add_snapshot, make_video, random_vae, tiny_config
from vaecli.errors import CheckpointError, InputError
from vaecli.model.checkpoint import bundled_model_path, read_checkpoint
from vaecli.model.svd.layout import save_checkpoint, to_layout
from vaecli.model.hub import choose_files, is_repo_id, resolve_model

MAIN = "a" * 40
V1 = "b" * 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """org/svd-like: a pipeline with its VAE in vae/ (diffusers) at main, and a single sgm file at tag v1;
    org/pickled: pickles only; org/two: two top-level safetensors files."""
    root = tmp_path_factory.mktemp("hub")
    config = tiny_config()
    vae = random_vae(config, seed=3)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    diff_state, diff_config = to_layout(state, config, "diffusers")
    (root / "made").mkdir()
    folder = save_checkpoint(diff_state, diff_config, root / "made" / "vae", layout="diffusers")
    sgm = save_checkpoint(state, config, root / "made" / "single.safetensors", layout="sgm")
    cache = root / "cache"
    add_snapshot(cache, "org/svd-like", MAIN, {
        "vae/config.json": (folder / "config.json").read_bytes(),
        "vae/diffusion_pytorch_model.safetensors": (folder / "diffusion_pytorch_model.safetensors").read_bytes(),
        "model_index.json": b"{}",
        "unet/config.json": b"{}",
    })
    add_snapshot(cache, "org/svd-like", V1, {"vae-v1.safetensors": sgm.read_bytes()}, refs=("v1",))
    add_snapshot(cache, "org/pickled", MAIN, {"vae/config.json": b"{}", "vae/diffusion_pytorch_model.bin": b"x"})
    add_snapshot(cache, "org/two", MAIN, {"a.safetensors": sgm.read_bytes(), "b.safetensors": sgm.read_bytes()})
    return {"cache": cache, "state": state, "root": root}


def same_state(path: Path, state: dict) -> bool:
    """The weights read from `path` hold `state` (the diffusers layout adds identity quant convs)."""
    loaded = read_checkpoint(path).state
    return set(loaded) - set(state) <= {"quant_conv.weight", "quant_conv.bias"} and all(
        torch.equal(loaded[k], state[k]) for k in state)


def test_repo_ids_and_local_names():
    assert is_repo_id("stabilityai/stable-video-diffusion-img2vid-xt")
    assert is_repo_id("org/model.v1.5")
    for local in ("vae.safetensors", "models/vae.safetensors", "a/b/c", "clip.mp4", "../x", "org/..", "/abs/path"):
        assert not is_repo_id(local), local


def test_choose_files_prefers_the_vae_folder_and_refuses_ambiguity():
    svd = ["svd_xt.safetensors", "svd_xt_image_decoder.safetensors", "vae/config.json",
           "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert choose_files(svd) == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert choose_files(["config.json", "diffusion_pytorch_model.fp16.safetensors"]) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert choose_files(["README.md", "vae.safetensors"]) == ["vae.safetensors"]
    assert choose_files(["a.safetensors", "b.safetensors"]) is None
    assert choose_files(["vae/diffusion_pytorch_model.bin", "vae/config.json"]) is None
    assert choose_files(["vae/diffusion_pytorch_model.safetensors"]) is None  # no config.json beside it


def test_offline_cache_finds_the_vae_subfolder(cache):
    path = resolve_model("org/svd-like", cache_dir=cache["cache"], offline=True)
    assert path.is_dir() and path.name == "vae" and MAIN in str(path)
    assert same_state(path, cache["state"])


def test_revision_selects_another_snapshot(cache):
    path = resolve_model("org/svd-like", "v1", cache_dir=cache["cache"], offline=True)
    assert path.name == "vae-v1.safetensors" and V1 in str(path)
    assert same_state(path, cache["state"])
    by_commit = resolve_model("org/svd-like", V1, cache_dir=cache["cache"], offline=True)
    assert by_commit == path


@pytest.mark.parametrize("spec, revision, error, words", [
    ("org/missing", None, InputError, ["org/missing", "HF_HUB_OFFLINE", "not a local path"]),
    ("org/svd-like", "v9", InputError, ["org/svd-like@v9", "does not hold it"]),
    ("org/pickled", None, InputError, ["holds no VAE"]),
    ("missing/file.safetensors", None, InputError, ["no such file or folder"]),
])
def test_offline_errors_say_what_to_do(cache, spec, revision, error, words):
    with pytest.raises(error) as info:
        resolve_model(spec, revision, cache_dir=cache["cache"], offline=True)
    for word in words:
        assert word in str(info.value)


def test_online_downloads_only_the_chosen_files(cache, monkeypatch, tmp_path):
    """A repository not in the cache: one model_info request lists it, and only the VAE's files are fetched."""
    import huggingface_hub

    listed, fetched = [], []
    made = cache["root"] / "made" / "vae"

    class Info:
        siblings = [type("S", (), {"rfilename": n})() for n in
                    ("svd_xt.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "unet/diffusion_pytorch_model.safetensors")]

    def model_info(self, repo_id, revision=None):
        listed.append((repo_id, revision))
        return Info()

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, local_files_only=False):
        assert not local_files_only
        fetched.append(filename)
        target = tmp_path / "dl" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((made / Path(filename).name).read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    path = resolve_model("org/online", "v2", cache_dir=tmp_path / "empty-cache", offline=False)
    assert listed == [("org/online", "v2")]
    assert fetched == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # never the 9 GB files
    assert same_state(path, cache["state"])


def test_online_repository_with_two_files_is_refused(cache, monkeypatch, tmp_path):
    import huggingface_hub

    class Info:
        siblings = [type("S", (), {"rfilename": n})() for n in ("x.safetensors", "y.safetensors", "z.ckpt")]

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None: Info())
    with pytest.raises(CheckpointError, match="several top-level .safetensors files"):
        resolve_model("org/online", cache_dir=tmp_path, offline=False)


def test_bundled_name_and_local_paths(tmp_path):
    assert resolve_model("vaecli-small") == bundled_model_path()
    assert resolve_model("vaecli-small.safetensors") == bundled_model_path()
    local = tmp_path / "org" / "repo"
    local.mkdir(parents=True)
    assert resolve_model(str(local)) == local  # an existing path is never taken for a repository
    with pytest.raises(InputError, match="--revision applies to Hugging Face"):
        resolve_model(str(local), "main")


def test_cli_uses_the_cache_offline(cache, tmp_path):
    """`--model ORG/REPO` and `info ORG/REPO` through the installed CLI with HF_HUB_OFFLINE=1 and HF_HUB_CACHE."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache["cache"])}
    run = lambda *args: subprocess.run([sys.executable, "-m", "vaecli", *map(str, args)], capture_output=True,
                                       text=True, env=env, timeout=300)
    info = run("info", "org/svd-like", "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["layout"] == "diffusers" and described["path"].endswith("vae/diffusion_pytorch_model.safetensors")
    assert described["bundled"] is False
    video = tmp_path / "clip.mp4"
    make_video(video, n=3, width=32, height=32)
    out = tmp_path / "clip.latents.safetensors"
    enc = run("encode", video, "-m", "org/svd-like", "--revision", "v1", "-o", out, "--json")
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout)["shape"] == [3, 4, 16, 16] and out.is_file()
    missing = run("decode", out, "-m", "org/nothing-here")
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: org/nothing-here: not a local path")
    assert "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr
