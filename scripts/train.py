"""Train the bundled model: a small SVD-family VAE (KL encoder + conv-only temporal decoder).

    python scripts/train.py --recipe configs/train/vaecli-small.toml --run runs/small            # both stages
    python scripts/train.py --recipe configs/train/vaecli-small.toml --run runs/small --resume   # continue
    python scripts/train.py --recipe configs/train/vaecli-small.toml --run runs/smoke --smoke    # 5+5 steps, CPU
    python scripts/train.py ... --export vaecli/weights/vaecli-small.safetensors                 # fp16, config
    python scripts/train.py --recipe R --run runs/more --init runs/small/final.safetensors         # train further
    python scripts/train.py --recipe R --run runs/t --init W --reset-temporal   # retrain the temporal layers only

Stage 1 trains the encoder and the decoder's spatial layers on still crops (L1 + SSIM + a small KL term). Stage 2
freezes them and trains only the decoder's temporal layers (time_stack, mix_factor, time_mix_conv) on clips,
with an extra loss on frame-to-frame differences, as SVD fine-tuned its decoder for temporal consistency: the
per-frame decode of the final model is exactly the stage-1 image decoder. Temporal layers start as identities
(zero output convs, identity time_mix_conv), so stage 2 starts from the image decoder's output.

Data is made here, offline: scikit-image's bundled photographs (a few held out for evaluation) animated with
synthetic camera motion (pan, zoom, rotation, shake), and procedural clips (vaecli.pipeline.synthetic).
Checkpoints are safetensors (model and optimizer moments) plus JSON; metrics go to RUN/metrics.jsonl.
The scaling factor is set to 1/std of the latents on training data before export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vaecli.model.svd.layout import save_checkpoint
from vaecli.model.svd.config import VAEConfig
from vaecli.model.svd.vae import VAE
from vaecli.pipeline.synthetic import synthetic_clip

# ------------------------------------------------------------------------------------------------------ data


def photo_pool(held_out: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """scikit-image's bundled photos as float (3, H, W) in [0, 1]: (training, held out)."""
    import imageio.v3 as iio
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    train, held = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg") or "chessboard" in path.name:
            continue
        img = np.asarray(iio.imread(path))
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = img[:, :, :3].astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
        tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        (held if path.name in held_out else train).append(tensor)
    return train, held


def camera_path(h: int, w: int, frames: int, rng: np.random.Generator) -> list[list[list[float]]]:
    """Affine grids (frames of 2x3, normalised coordinates) of a camera over an h x w photo: it pans at a constant
    velocity (0-5 % of the crop side per frame), zooms (0.8-1.25x over the clip), turns slowly and, in a third of
    the paths, shakes a little. Smooth like real footage: consecutive frames show nearly the same content."""
    side = rng.uniform(0.15, 0.9) * min(h, w)  # crop side at the first frame, photo pixels
    centre = rng.uniform(0.3, 0.7, 2) * (w, h)  # photo pixels (x, y)
    heading = rng.uniform(0, 2 * math.pi)
    velocity = rng.uniform(0, 0.05) * side * np.array([math.cos(heading), math.sin(heading)])
    zoom = rng.uniform(0.8, 1.25)
    angle0, spin = rng.uniform(-0.3, 0.3), rng.normal(0, 0.02)
    shake = rng.uniform(0, 0.01) * side if rng.uniform() < 1 / 3 else 0.0
    thetas = []
    for i in range(frames):
        cx, cy = centre + velocity * i + rng.normal(0, 1, 2) * shake
        crop = side * zoom ** (i / max(1, frames - 1))
        ang = angle0 + spin * i
        sx, sy = crop / w, crop / h  # photo-pixel offsets -> normalised coordinates (the grid spans [-1, 1])
        tx, ty = cx / w * 2 - 1, cy / h * 2 - 1
        thetas.append([[sx * math.cos(ang), -sx * math.sin(ang), tx], [sy * math.sin(ang), sy * math.cos(ang), ty]])
    return thetas


def camera_path_v1(h: int, w: int, frames: int, rng: np.random.Generator) -> list[list[list[float]]]:
    """The camera of recipes 1-3 (bundled model version 1), kept so that they reproduce: each frame's position is
    drawn at random along the pan, so clips jump about rather than move."""
    base = rng.uniform(0.15, 0.9) * min(h, w)
    start, end = rng.uniform(0.25, 0.75, 2), rng.uniform(0.25, 0.75, 2)
    zoom = rng.uniform(0.8, 1.25)
    angle0, spin = rng.uniform(-0.3, 0.3), rng.normal(0, 0.03)
    shake = rng.uniform(0, 0.01)
    thetas = []
    for i in range(frames):
        a = i / max(1, frames - 1)
        cx, cy = start + (end - start) * a * rng.uniform(0.2, 1.0) + rng.normal(0, shake, 2)
        side = base * zoom**a
        ang = angle0 + spin * i
        sx, sy = side / w, side / h
        tx, ty = cx * 2 - 1, cy * 2 - 1
        thetas.append([[sx * math.cos(ang), -sy * math.sin(ang), tx], [sx * math.sin(ang), sy * math.cos(ang), ty]])
    return thetas


CAMERAS = {"smooth": camera_path, "v1": camera_path_v1}


def camera_clip(photo: torch.Tensor, frames: int, size: int, rng: np.random.Generator,
                camera: str = "smooth") -> torch.Tensor:
    """A clip (frames, 3, size, size) in [0, 1]: `photo` seen through a moving camera (CAMERAS), sampled with
    bilinear grid_sample, maybe mirrored, with a random colour gain."""
    _, h, w = photo.shape
    theta = torch.tensor(CAMERAS[camera](h, w, frames, rng), dtype=torch.float32)
    grid = F.affine_grid(theta, (frames, 3, size, size), align_corners=False)
    clip = F.grid_sample(photo[None].expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)
    if rng.uniform() < 0.5:
        clip = clip.flip(-1)
    gain = torch.tensor(rng.uniform(0.8, 1.2, 3), dtype=torch.float32).view(1, 3, 1, 1)
    return (clip * gain).clamp(0, 1)


def sample_clips(photos: list[torch.Tensor], batch: int, frames: int, size: int, synthetic: float,
                 rng: np.random.Generator, camera: str = "smooth") -> torch.Tensor:
    """(batch, frames, 3, size, size) in [-1, 1]."""
    clips = []
    for _ in range(batch):
        if rng.uniform() < synthetic:
            arr = synthetic_clip(frames, size, size, seed=int(rng.integers(0, 10**6)))
            clips.append(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0)
        else:
            clips.append(camera_clip(photos[int(rng.integers(len(photos)))], frames, size, rng, camera))
    return (torch.stack(clips) * 2 - 1).contiguous()


# ------------------------------------------------------------------------------------------------------ model


def temporal_names(model: VAE) -> set[str]:
    return {n for n, _ in model.named_parameters() if "time_stack" in n or "mix_factor" in n or "time_mix_conv" in n}


def init_temporal_as_identity(model: VAE) -> None:
    """Zero the output conv of every time_stack and make time_mix_conv the identity: a temporal decode then
    equals the per-frame decode until stage 2 trains them (sgm zero-initialises the same convs)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("time_stack.out_layers.3"):
                module.weight.zero_()
                module.bias.zero_()
            if name.endswith("time_mix_conv"):
                module.weight.zero_()
                module.bias.zero_()
                centre = module.kernel_size[0] // 2
                for c in range(module.weight.shape[0]):
                    module.weight[c, c, centre, 0, 0] = 1.0


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of images in [-1, 1] (N, 3, H, W), Gaussian window 11, σ 1.5."""
    x, y = (x + 1) / 2, (y + 1) / 2
    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    blur = lambda t: F.conv2d(t, window, padding=5, groups=3)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return 1 - s.mean()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------------ checkpoints


def save_state(run: Path, model: VAE, opt: torch.optim.Optimizer, stage: str, step: int) -> None:
    """Model and optimizer moments as safetensors, the step as JSON (never pickle)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"opt.{names[id(p)]}.{key}"] = state[key].contiguous()
            if "step" in state:
                tensors[f"opt.{names[id(p)]}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    tmp = run / "state.safetensors.partial"
    save_file(tensors, str(tmp))
    os.replace(tmp, run / "state.safetensors")
    (run / "state.json").write_text(json.dumps({"stage": stage, "step": step}))


def load_state(run: Path, model: VAE, opt: torch.optim.Optimizer | None) -> dict:
    tensors = load_file(str(run / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    if opt is not None:
        params = dict(model.named_parameters())
        for name, p in params.items():
            if f"opt.{name}.exp_avg" in tensors and p.requires_grad:
                opt.state[p] = {"exp_avg": tensors[f"opt.{name}.exp_avg"], "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"],
                                "step": tensors[f"opt.{name}.step"].reshape(())}
    return json.loads((run / "state.json").read_text())


# ------------------------------------------------------------------------------------------------------ stages


def train_stage(stage: str, model: VAE, recipe: dict, photos, rng, run: Path, device: torch.device,
                start_step: int, opt_state_from: Path | None, log) -> None:
    cfg = recipe[stage]
    camera = recipe.get("camera", "smooth")
    temporal = temporal_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_((name in temporal) == (stage == "temporal"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    if opt_state_from is not None:
        load_state(opt_state_from, model, opt)
    model.train()
    started = time.time()
    for step in range(start_step, cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        if stage == "image":
            x = sample_clips(photos, cfg["batch"], 1, cfg["crop"], cfg["synthetic_fraction"], rng, camera)[:, 0]
            x = x.to(device)
            post = model.encode_moments(x)
            z = post.sample(torch.Generator(device=device).manual_seed(int(rng.integers(2**31))))
            recon = model.decode(z, per_frame=True)
            kl = 0.5 * (post.mean**2 + post.logvar.exp() - 1 - post.logvar).mean()
            l1, ss = (recon - x).abs().mean(), ssim_loss(recon, x)
            loss = l1 + cfg["ssim_weight"] * ss + cfg["kl_weight"] * kl
            extra = {"kl": kl.item()}
        else:
            clips = sample_clips(photos, cfg["batch"], cfg["frames"], cfg["crop"], cfg["synthetic_fraction"], rng,
                                 camera)
            x = clips.flatten(0, 1).to(device)  # (batch·frames, 3, S, S), clip-major
            with torch.no_grad():
                z = model.encode(x)
            recon = model.decode(z, num_frames=cfg["frames"])
            l1, ss = (recon - x).abs().mean(), ssim_loss(recon, x)
            r = recon.view(cfg["batch"], cfg["frames"], *recon.shape[1:])
            s = x.view(cfg["batch"], cfg["frames"], *x.shape[1:])
            flicker = ((r[:, 1:] - r[:, :-1]) - (s[:, 1:] - s[:, :-1])).abs().mean()
            loss = l1 + cfg["ssim_weight"] * ss + cfg["temporal_weight"] * flicker
            extra = {"flicker": flicker.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == cfg["steps"] - 1:
            psnr = 10 * math.log10(4 / max(((recon.detach() - x) ** 2).mean().item(), 1e-10))
            log({"stage": stage, "step": step, "loss": round(loss.item(), 5), "l1": round(l1.item(), 5),
                 "ssim_loss": round(ss.item(), 5), "psnr": round(psnr, 3), "lr": opt.param_groups[0]["lr"],
                 "seconds": round(time.time() - started, 1), **{k: round(v, 5) for k, v in extra.items()}})
        if (step + 1) % 250 == 0 or step == cfg["steps"] - 1:
            save_state(run, model, opt, stage, step + 1)
    model.eval()


@torch.no_grad()
def latent_std(model: VAE, photos, rng, crop: int, camera: str, n: int = 64) -> float:
    x = sample_clips(photos, n, 1, crop, 0.3, rng, camera)[:, 0]
    return model.encode(x.to(next(model.parameters()).device)).std().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/train/vaecli-small.toml")
    parser.add_argument("--run", required=True, help="folder for checkpoints and metrics")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="5 steps per stage (checks the script runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--export", help="write the trained model here (fp16 safetensors with its config)")
    parser.add_argument("--init", help="start from these weights (a safetensors VAE of the recipe's architecture)")
    parser.add_argument("--reset-temporal", action="store_true",
                        help="with --init: restart the temporal layers as identities (retrain them on new spatial layers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.recipe, "rb") as f:
        recipe = tomllib.load(f)
    if args.smoke:
        recipe["image"].update(steps=5, warmup=1, batch=2, crop=32)
        recipe["temporal"].update(steps=5, warmup=1, batch=1, frames=3, crop=32)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(recipe, indent=1))
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    device = torch.device(args.device)
    config = VAEConfig(**recipe["model"])
    model = VAE(config).to(device)
    init_temporal_as_identity(model)
    if args.init:  # continue training a finished model (a new run: fresh optimizer and schedule)
        model.load_state_dict({k: v.float() for k, v in load_file(args.init).items()}, strict=True)
        if args.reset_temporal:
            init_temporal_as_identity(model)
    photos, _ = photo_pool(recipe["eval"]["held_out_photos"])
    metrics = open(run / "metrics.jsonl", "a", encoding="utf-8")

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    state = {"stage": "image", "step": 0}
    if args.resume and (run / "state.json").exists():
        state = json.loads((run / "state.json").read_text())
        rng = np.random.default_rng(recipe["seed"] + state["step"] + (10**6 if state["stage"] == "temporal" else 0))
    stages = ["image", "temporal"]
    for stage in stages[stages.index(state["stage"]):]:
        resume_here = args.resume and state["stage"] == stage and state["step"] > 0
        if stage == "temporal" and state["stage"] == "image" and (run / "state.json").exists() and args.resume:
            load_state(run, model, None)
        start = state["step"] if resume_here else 0
        if start < recipe[stage]["steps"]:
            train_stage(stage, model, recipe, photos, rng, run, device, start, run if resume_here else None, log)
        elif resume_here:
            load_state(run, model, None)
        state = {"stage": stage, "step": recipe[stage]["steps"]}
    std = latent_std(model, photos, rng, recipe["image"]["crop"], recipe.get("camera", "smooth"))
    final = config.replace(scaling_factor=round(1.0 / std, 5), description="vaecli's bundled small SVD-family VAE")
    log({"stage": "done", "latent_std": std, "scaling_factor": final.scaling_factor})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "final.safetensors"),
              metadata={"vaecli.config": final.to_json()})
    if args.export:
        save_checkpoint(model.state_dict(), final, args.export, layout="sgm", overwrite=True, dtype=torch.float16)
        print(f"exported {args.export}")


if __name__ == "__main__":
    main()
