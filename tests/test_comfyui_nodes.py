"""The ComfyUI nodes with stand-ins shaped like ComfyUI's objects (no ComfyUI installed): a `VAE` with
`first_stage_model` (original key names), `vae_dtype` and `device`; `LATENT` `{"samples": ...}`; `IMAGE`
`[N, H, W, 3]` in [0, 1]. The nodes give the frames and latents of the models' own one-call decode and encode."""

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from helpers import latents, random_vae, randomise, tiny_config
from vaecli.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from vaecli.model.wan.config import WanConfig
from vaecli.model.wan.modules import WanVAE

BOUND = 1e-4


def comfy_vae(module):
    return SimpleNamespace(first_stage_model=module, vae_dtype=torch.float32, device=torch.device("cpu"))


def node(name):
    return NODE_CLASS_MAPPINGS[name]()


def as_image(frames: torch.Tensor) -> torch.Tensor:
    """Frames (N, 3, H, W) ≈[-1, 1] -> ComfyUI's IMAGE [N, H, W, 3] in [0, 1]."""
    return ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def test_the_nodes_are_registered_with_comfyuis_protocol():
    assert set(NODE_DISPLAY_NAME_MAPPINGS.values()) == {"VAE Decode (vaecli, exact)", "VAE Encode (vaecli, exact)",
                                                         "Load VAE (vaecli)"}
    for cls in NODE_CLASS_MAPPINGS.values():
        assert "required" in cls.INPUT_TYPES() and callable(getattr(cls(), cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY
    folder = Path(__file__).resolve().parent.parent / "vaecli" / "integrations" / "comfyui"
    for path in folder.glob("*.py"):  # GPL-3.0 ComfyUI: nothing of it imported or copied
        assert "import comfy" not in path.read_text() and "from comfy" not in path.read_text(), path


def test_wan_latent_decodes_and_image_encodes_as_the_model_does():
    wan = WanVAE(WanConfig(dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1, name="comfy-wan")).eval()
    randomise(wan, 5)
    z = torch.randn((2, 16, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    (image,) = node("VAEDecodeVaecli").decode({"samples": z}, comfy_vae(wan))
    with torch.no_grad():
        want = torch.cat([as_image(wan.decode(z[b:b + 1])[0].transpose(0, 1)) for b in range(2)])
    assert image.shape == (18, 32, 32, 3) and image.min() >= 0 and image.max() <= 1
    assert (image - want).abs().max().item() <= BOUND
    (latent,) = node("VAEEncodeVaecli").encode(image[:9], comfy_vae(wan))
    with torch.no_grad():
        mode = wan.moments(image[:9].permute(3, 0, 1, 2)[None] * 2 - 1).chunk(2, dim=1)[0]
    assert latent["samples"].shape == (1, 16, 3, 4, 4)  # ComfyUI's raw 5-D video latent
    assert (latent["samples"] - mode).abs().max().item() <= BOUND


def test_svd_latent_decodes_as_one_clip(tmp_path):
    cfg = tiny_config("conv-only", ch_mult=(1, 2))
    vae = random_vae(cfg, seed=2)
    z = latents(6, 8, 8)
    (image,) = node("VAEDecodeVaecli").decode({"samples": z}, comfy_vae(vae), max_memory="")
    with torch.no_grad():
        want = as_image(vae.decode(z))
    assert image.shape == (6, 16, 16, 3) and (image - want).abs().max().item() <= BOUND
    (latent,) = node("VAEEncodeVaecli").encode(image, comfy_vae(vae))
    assert latent["samples"].shape == (6, 4, 8, 8)  # an SVD latent stays [N, C, h, w]
    save_file(vae.state_dict(), str(tmp_path / "svd.safetensors"))
    (loaded,) = node("VAELoaderVaecli").load(str(tmp_path / "svd.safetensors"), dtype="fp32", device="cpu")
    (again,) = node("VAEDecodeVaecli").decode({"samples": z}, loaded)
    assert torch.equal(again, image)
