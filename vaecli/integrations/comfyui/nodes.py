"""The node classes (ComfyUI's node protocol: INPUT_TYPES, RETURN_TYPES, FUNCTION, CATEGORY). See the package
docstring for the types they take and give."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vaecli.integrations.common import codec_of, decode_clip, encode_clip
from vaecli.pipeline.planner import parse_bytes

CATEGORY = "latent/vaecli"


def _limit(max_memory: str) -> int | None:
    return parse_bytes(max_memory) if max_memory.strip() else None


def _codec(vae):
    """The codec over a ComfyUI VAE's own module (or a "Load VAE (vaecli)" one), on its device and dtype."""
    module = vae.first_stage_model
    device = getattr(vae, "device", None)
    dtype = getattr(vae, "vae_dtype", None)
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return codec_of(module, name="comfyui-vae")


class VAEDecodeExact:
    """LATENT -> IMAGE: each clip decoded exactly (one clip, streamed, or tiles with halos) within the memory."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)},
                "optional": {"max_memory": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples: dict, vae, max_memory: str = ""):
        codec, limit, calls = _codec(vae), _limit(max_memory), []
        z = samples["samples"]
        with torch.inference_mode():
            if z.ndim == 5:  # [B, C, T, h, w]: one clip per batch item
                frames = torch.cat([decode_clip(codec, z[b].transpose(0, 1), limit, "auto", calls)
                                    for b in range(z.shape[0])])
            else:  # [N, C, h, w]: the frames of one clip
                frames = decode_clip(codec, z, limit, "auto", calls)
        image = ((frames.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().cpu()  # [N, H, W, 3]
        return (image,)


class VAEEncodeExact:
    """IMAGE -> LATENT: the frames as one clip, encoded exactly (the posterior mode, raw latents)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)},
                "optional": {"max_memory": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels: torch.Tensor, vae, max_memory: str = ""):
        codec, calls = _codec(vae), []
        x = pixels[..., :3].permute(0, 3, 1, 2) * 2 - 1  # [N, 3, H, W] in [-1, 1]
        with torch.inference_mode():
            moments = encode_clip(codec, x, _limit(max_memory), "auto", calls)
        z = moments.chunk(2, dim=1)[0].float().cpu()  # the posterior mode, (t, C, h, w)
        return ({"samples": z.transpose(0, 1)[None].contiguous() if codec.video_latents else z},)


class LoadVAE:
    """A VAE file by path, in any layout vaecli reads (SVD/SD sgm or diffusers, Wan original/Kijai/diffusers,
    diffusers folders) — for the nodes above; safetensors only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""})},
                "optional": {"dtype": (["auto", "fp32", "bf16", "fp16"],), "device": (["auto", "cpu", "cuda"],)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, path: str, dtype: str = "auto", device: str = "auto"):
        from vaecli.model.checkpoint import load_vae

        module = load_vae(path, device=device, dtype=dtype)
        param = next(module.parameters())
        return (SimpleNamespace(first_stage_model=module, vae_dtype=param.dtype, device=param.device),)


NODE_CLASS_MAPPINGS = {"VAEDecodeVaecli": VAEDecodeExact, "VAEEncodeVaecli": VAEEncodeExact,
                       "VAELoaderVaecli": LoadVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"VAEDecodeVaecli": "VAE Decode (vaecli, exact)",
                              "VAEEncodeVaecli": "VAE Encode (vaecli, exact)",
                              "VAELoaderVaecli": "Load VAE (vaecli)"}
