"""What the integrations share: a codec over a loaded module's own weights, and one clip decoded or encoded by
an exact plan within the budget (the pipeline planner's)."""

from __future__ import annotations

import torch

from vaecli.model.checkpoint import module_checkpoint
from vaecli.pipeline.planner import decode_plan, encode_plan


def codec_of(module: torch.nn.Module, attention: str = "auto", name: str = "pipeline-vae"):
    """vaecli's codec over `module`'s current weights (shared, not copied), on its device and in its dtype."""
    ckpt = module_checkpoint(module, name)
    param = next(module.parameters())
    return ckpt.family.build(ckpt, device=param.device, dtype=param.dtype, attention=attention)


def decode_clip(codec, z: torch.Tensor, max_memory: int | None, attention: str, calls: list) -> torch.Tensor:
    """Raw latents (t, C, h, w) of one clip -> frames (n, 3, H, W) ≈[-1, 1], by an exact plan within the budget
    (a causal family step by step, its state carried). `calls` gets ("decode", plan)."""
    plan = decode_plan(codec, z.shape[0], (z.shape[2], z.shape[3]), max_memory=max_memory, attention=attention)
    calls.append(("decode", plan))
    z = z.to(codec.device, codec.dtype)
    clip: dict = {}
    return torch.cat([x for a, b in codec.decode_steps(plan, z.shape[0])
                      for x in codec.decode(z[a:b], plan, clip=clip)])


def encode_clip(codec, x: torch.Tensor, max_memory: int | None, attention: str, calls: list) -> torch.Tensor:
    """Frames (n, 3, H, W) in [-1, 1] of one clip -> moments (t, 2C, h, w), in the plan's batches (a causal
    family's first batch is 1 + its batch size, the clip's state carried). `calls` gets ("encode", plan)."""
    plan = encode_plan(codec, x.shape[0], (x.shape[2], x.shape[3]), max_memory=max_memory, attention=attention)
    calls.append(("encode", plan))
    x = x.to(codec.input_device(plan), codec.dtype)
    size, first = plan.chunk_frames, plan.chunk_frames + (1 if codec.frame_rule.causal else 0)
    clip: dict = {}
    parts, a = [], 0
    while a < x.shape[0]:
        b = min(x.shape[0], a + (first if a == 0 else size))
        parts.append(codec.moments(x[a:b], plan, clip))
        a = b
    return torch.cat(parts)
