"""The family seam: a toy family registered here, inside the tests, runs encode/decode/plan/info through the CLI
without anything in `vaecli/pipeline/` or `vaecli/cli` knowing it.

The toy is a per-frame image model with a temporal factor of 2 and a spatial factor of 2: the encoder averages
each pair of frames and each 2x2 block, then a 1x1 conv gives the moments; the decoder is a 1x1 conv, nearest
upsampling, and each latent frame shown twice. Its latents are normalised per channel.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import make_video, read_video
from vaecli.cli import app
from vaecli.errors import InputError
from vaecli.model import family as families
from vaecli.model.family import Checkpoint, Codec, Family, FrameRule, Normalization
from vaecli.model.plan import Plan
from vaecli.ops.attention import AttentionBackend
from vaecli.ops.device import dtype_name

C = 2  # latent channels
NORM = Normalization("per-channel", mean=(0.1, -0.2), std=(2.0, 0.5))


@dataclass(frozen=True)
class ToyConfig:
    name: str = "toy"
    channels: int = C

    def to_dict(self) -> dict:
        return asdict(self)


class ToyLayout:
    def describe(self) -> str:
        return "toy layout (toy.enc.*, toy.dec.*)"


class ToyModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 2 * C, 1)
        self.dec = torch.nn.Conv2d(C, 3, 1)


class ToyCodec(Codec):
    family = "toy"
    spatial_factor = 2
    frame_rule = FrameRule(2)
    latent_channels = C
    in_channels = 3
    normalization = NORM

    def __init__(self, module: ToyModule, name: str, hash: str):
        self.module, self.name, self.hash = module, name, hash
        param = next(module.parameters())
        self.device, self.dtype, self.config = param.device, param.dtype, ToyConfig()

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def _plan(self, stage: str, frames: int, pixels: int, budget, chunk: int) -> Plan:
        act = frames * pixels * 64
        return Plan(stage, str(budget.device), dtype_name(self.dtype), AttentionBackend("math"),
                    "one-clip" if stage == "decode" else "batches", chunk, 0, act, budget.activation_bytes,
                    self.weights_bytes(), ("the toy's only plan",))

    def plan_decode(self, frames, latent_hw, budget, *, attention="auto", chunk=None, overlap=None, tile=None):
        return self._plan("decode", frames, latent_hw[0] * latent_hw[1], budget, frames)

    def plan_encode(self, frames, size_hw, budget, *, attention="auto", batch=None):
        return self._plan("encode", 2, size_hw[0] * size_hw[1], budget, 2)

    def moments(self, x, plan, clip=None):
        n, c, h, w = x.shape
        pairs = x.to(self.device, self.dtype).view(n // 2, 2, c, h, w).mean(1)  # (t, 3, H, W): frames pair-averaged
        return self.module.enc(F.avg_pool2d(pairs, 2))

    def decode(self, z, plan, *, check_finite=False, clip=None):
        x = F.interpolate(self.module.dec(z.to(self.device, self.dtype)), scale_factor=2.0, mode="nearest")
        yield torch.tanh(x).repeat_interleave(2, dim=0)

    def in_dtype(self, dtype):
        return ToyCodec(ToyModule().to(dtype).requires_grad_(False), self.name, self.hash) if dtype != self.dtype \
            else self


class ToyFamily(Family):
    name = "toy"
    title = "toy image model (tests)"
    layouts = "toy (toy.enc.*, toy.dec.*)"

    def claims(self, keys):
        return ToyLayout() if {"toy.enc.weight", "toy.dec.weight"} <= keys else None

    def read(self, path, layout, header, metadata, config_json, config):
        with safe_open(str(path), framework="pt") as f:
            state = {k[len("toy."):]: f.get_tensor(k) for k in header if k.startswith("toy.")}
        return Checkpoint(path, self, layout, state, ToyConfig(), ("F32",), dict(metadata))

    def build(self, ckpt, *, device, dtype, attention="auto", config=None, name=None, hash=None):
        module = ToyModule()
        module.load_state_dict(ckpt.state, strict=True)
        return ToyCodec(module.to(device, dtype).requires_grad_(False), name or "toy", hash or "")

    def module(self, ckpt, *, device, dtype, attention):
        return self.build(ckpt, device=device, dtype=dtype).module

    def describe(self, ckpt):
        return {"latent_channels": C, "spatial_factor": 2, "frame_rule": FrameRule(2).to_dict()}, \
            ["toy:         pairs of frames -> one latent frame"]


@pytest.fixture
def toy(tmp_path):
    """The toy family registered for one test, and a checkpoint of it."""
    families.register(ToyFamily())
    module = ToyModule()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    path = tmp_path / "toy.safetensors"
    save_file({f"toy.{k}": v.contiguous() for k, v in module.state_dict().items()}, str(path))
    yield path, module
    families.unregister("toy")


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def test_seam_files_know_no_family():
    """Nothing in the pipeline or the CLI names a family module (the layering test checks imports too)."""
    root = Path(__file__).resolve().parent.parent / "vaecli"
    for path in [*root.joinpath("pipeline").rglob("*.py"), *root.glob("cli*.py"), *root.joinpath("cli").rglob("*.py")]:
        assert "model.svd" not in path.read_text(), path


def test_toy_family_through_the_cli(toy, tmp_path):
    ckpt, module = toy
    video = tmp_path / "clip.mp4"
    source = make_video(video, n=6, width=16, height=12)
    info = cli("info", ckpt, "--json")
    assert info.exit_code == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["family"] == "toy" and data["frame_rule"] == {"factor": 2, "causal": False}
    assert "family:      toy" in cli("info", ckpt).stdout

    plan = cli("plan", video, "-m", ckpt, "--json")
    assert plan.exit_code == 0, plan.stderr
    data = json.loads(plan.stdout)
    assert data["family"] == "toy" and data["frames"] == 3 and data["latent_size"] == [6, 8]
    assert data["encode"]["batch_frames"] == 2 and data["strategy"] == "one-clip"

    latents = tmp_path / "clip.latents.safetensors"
    enc = cli("encode", video, "-m", ckpt, "-o", latents, "--json")
    assert enc.exit_code == 0, enc.stderr
    result = json.loads(enc.stdout)
    assert result["family"] == "toy" and result["frames"] == 6 and result["shape"] == [3, C, 6, 8]
    with safe_open(str(latents), framework="pt") as f:
        stored, meta = f.get_tensor("latents"), f.metadata()
    assert meta["model.family"] == "toy" and json.loads(meta["frame_rule"]) == {"factor": 2, "causal": False}
    assert json.loads(meta["normalization"]) == NORM.to_dict() and meta["latents.space"] == "normalized"
    assert meta["vaecli.format"] == "2" and meta["frame_count"] == "3" and meta["source_frames"] == "6"
    # the stored latents are the posterior mean of the frames as read, normalised per channel
    frames = torch.from_numpy(read_video(video)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = module.enc(F.avg_pool2d(frames.view(3, 2, 3, 12, 16).mean(1), 2))[:, :C]
    expected = (mean - torch.tensor(NORM.mean).view(1, C, 1, 1)) / torch.tensor(NORM.std).view(1, C, 1, 1)
    assert (stored - expected).abs().max() <= 1e-5

    out = tmp_path / "back.mp4"
    dec = cli("decode", latents, "-m", ckpt, "-o", out, "--json")
    assert dec.exit_code == 0, dec.stderr
    assert json.loads(dec.stdout)["frames"] == 6
    decoded, _ = read_video(out)
    assert decoded.shape == source.shape  # 6 frames of 16x12 from 3 latent frames of 8x6
    plan = json.loads(cli("plan", latents, "-m", ckpt, "--json").stdout)
    assert plan["family"] == "toy" and plan["frames"] == 3


def test_toy_frame_rule_refuses_odd_lengths_with_the_nearest(toy, tmp_path):
    ckpt, _ = toy
    video = tmp_path / "clip.mp4"
    make_video(video, n=6, width=16, height=12)
    result = cli("encode", video, "-m", ckpt, "--frames", "5", "-o", tmp_path / "x.latents.safetensors")
    assert result.exit_code == 1
    assert "5 frames do not fit the model's frame rule (2k frames -> k latent frames); take 4 or 6 frames" \
        in result.stderr
    assert not (tmp_path / "x.latents.safetensors").exists()
    # an SVD latent file is not decoded by the toy
    svd_latents = tmp_path / "svd.latents.safetensors"
    assert cli("encode", video, "--frames", "2", "-o", svd_latents).exit_code == 0
    wrong = cli("decode", svd_latents, "-m", ckpt, "-o", tmp_path / "w.mp4")
    assert wrong.exit_code == 1 and "made by a svd model, not a toy one" in wrong.stderr


def test_frame_rule_values():
    causal = FrameRule(4, causal=True)
    assert [causal.pixel_frames(t) for t in (1, 2, 3)] == [1, 5, 9]
    assert causal.valid(13) and not causal.valid(15) and causal.nearest(15) == (13, 17)
    assert causal.latent_frames(81) == 21 and causal.anchors(9) == [0, 1, 5]
    pairs = FrameRule(2)
    assert pairs.nearest(1) == (None, 2) and pairs.latent_frames(6) == 3 and pairs.anchors(6) == [0, 2, 4]
    with pytest.raises(InputError, match="take 13 or 17 frames"):
        causal.check(15, "x")


def test_frames_fit_trims_or_pads_every_length_to_a_valid_one():
    """For every length and rule, --frames-fit keeps a prefix of the input in order, trims fewer than `factor`
    frames or repeats the last one fewer than `factor` times, and says what it did."""
    from vaecli.pipeline.runner import fit_frames

    for rule in (FrameRule(4, causal=True), FrameRule(2), FrameRule(1)):
        for n in range(1, 15):
            for mode in ("trim", "pad"):
                frames = [(i, np.full((1, 1, 3), i, np.uint8)) for i in range(n)]
                report: dict = {}
                if mode == "trim" and rule.nearest(n)[0] is None and not rule.valid(n):
                    with pytest.raises(InputError, match="--frames-fit pad"):
                        list(fit_frames(iter(frames), rule, mode, "x", report))
                    continue
                out = [i for i, _ in fit_frames(iter(frames), rule, mode, "x", report)]
                assert rule.valid(len(out)) and report == {"mode": mode, "read": n, "coded": len(out)}
                assert out[:min(n, len(out))] == list(range(min(n, len(out))))
                assert abs(len(out) - n) < rule.factor and (len(out) <= n if mode == "trim" else len(out) >= n)
                assert out[n:] == [n - 1] * (len(out) - n)


def test_normalization_round_trips_and_validates():
    z = torch.randn(3, C, 4, 5)
    assert (NORM.denormalize(NORM.normalize(z)) - z).abs().max() <= 1e-6
    assert Normalization.from_dict(NORM.to_dict()) == NORM and NORM.hash() != Normalization("scale", 0.5).hash()
    for bad in ({"kind": "scale", "factor": 0}, {"kind": "per-channel", "mean": [0.0], "std": [0.0]},
                {"kind": "per-channel", "mean": [0.0, 1.0], "std": [1.0]}, {"kind": "odd"},
                {"kind": "scale", "factor": float("nan")}):
        with pytest.raises((ValueError, KeyError)):
            Normalization.from_dict(bad)
