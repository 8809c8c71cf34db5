"""ComfyUI custom nodes: "VAE Decode (vaecli, exact)", "VAE Encode (vaecli, exact)" and "Load VAE (vaecli)".

Install: `pip install vaecli` into ComfyUI's Python, then link this folder into ComfyUI's `custom_nodes/`
(`ln -s "$(python -c 'import vaecli.integrations.comfyui as m, os; print(os.path.dirname(m.__file__))')"
ComfyUI/custom_nodes/vaecli`). ComfyUI is not imported here (nothing of its code is used): its objects are read
for what they hold — a `VAE` has `first_stage_model` (the torch module, with the original release's key names),
`vae_dtype` and `device`; a `LATENT` is `{"samples": tensor}`, raw VAE latents `[B, C, T, h, w]` for video VAEs
(Wan) or `[N, C, h, w]` (SVD/SD: the N frames of one clip); an `IMAGE` is `[N, H, W, 3]` in [0, 1].
"""

from vaecli.integrations.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
