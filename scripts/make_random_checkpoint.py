"""Write a VAE checkpoint with random weights, for demos, benchmarks and tests of the loaders.

    python scripts/make_random_checkpoint.py -o svd_random.safetensors --config svd-vae --layout sgm
    python scripts/make_random_checkpoint.py -o tiny.safetensors --tiny --layout checkpoint

Layouts: sgm (standalone/ComfyUI), checkpoint (full SVD-style file: first_stage_model.* plus unrelated
UNet-like tensors), diffusers (file, or a folder when -o has no .safetensors suffix).
Weights are seeded normals scaled by 1/sqrt(fan_in); mix_factor and the zero-initialised convs are random too.
"""

from __future__ import annotations

import argparse
import torch
from safetensors.torch import save_file

from vaecli.model.svd.layout import save_checkpoint, to_layout
from vaecli.model.svd.config import VAEConfig, load_config
from vaecli.model.svd.vae import VAE, randomize_weights_
from vaecli.ops.files import atomic_output


def random_state(config: VAEConfig, seed: int) -> dict[str, torch.Tensor]:
    return randomize_weights_(VAE(config), seed).state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--config", default="svd-vae", help="named config or TOML file (default svd-vae)")
    parser.add_argument("--tiny", action="store_true", help="a tiny SVD-like model (ch 32, 4 levels, f8)")
    parser.add_argument("--layout", choices=("sgm", "checkpoint", "diffusers"), default="sgm")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    config = load_config(args.config)
    if args.tiny:
        config = config.replace(name="tiny-random", ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2)
    state = random_state(config, args.seed)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.layout == "checkpoint":
        full = {f"first_stage_model.{k}": v.to(dtype) for k, v in state.items()}
        full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 8, 3, 3, dtype=dtype)
        full["conditioner.embedders.0.open_clip.model.ln_final.weight"] = torch.ones(8, dtype=dtype)
        with atomic_output(args.out, args.overwrite) as tmp:
            save_file(full, str(tmp))
    else:
        tensors, out_config = to_layout(state, config, args.layout)
        save_checkpoint(tensors, out_config, args.out, layout=args.layout, overwrite=args.overwrite, dtype=dtype)
    print(args.out)


if __name__ == "__main__":
    main()
