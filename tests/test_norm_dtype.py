"""Precision rules: temporal GroupNorm statistics in fp32 for half inputs; mixed parameter/input dtypes work on CPU."""

import pytest
import torch
import torch.nn.functional as F

from helpers import latents, random_vae, tiny_config
from vaecli.ops.device import parse_device, parse_dtype, resolve_dtype
from vaecli.errors import UsageError
from vaecli.ops.memtrace import traced_peak_bytes
from vaecli.ops.norm import GroupNorm32, spatial_norm, temporal_norm


def test_temporal_norm_has_fp32_statistics_without_fp32_copies():
    norm = temporal_norm(64)
    assert norm.eps == 1e-5 and spatial_norm(64).eps == 1e-6
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 3, 4, 4) * 50 + 300).to(torch.bfloat16)  # a large mean: bf16 statistics would fail
    out = norm(x)
    exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-5)
    upcast = F.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5).to(torch.bfloat16)  # sgm's GroupNorm32
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() <= 1.5 * (upcast.double() - exact).abs().max() + 1e-2
    fp32 = torch.randn(2, 64, 3, 4, 4)
    assert torch.equal(norm(fp32), F.group_norm(fp32, 32, norm.weight, norm.bias, 1e-5))
    with torch.device("meta"):
        meta_norm = temporal_norm(64).to(torch.bfloat16)
    big = torch.empty(1, 64, 64, 64, device="meta", dtype=torch.bfloat16)
    assert traced_peak_bytes(lambda: meta_norm(big)) == big.numel() * 2  # only the bf16 output is allocated


def test_half_parameters_with_fp32_input_work_on_cpu():
    norm = GroupNorm32(32, 64, eps=1e-5).to(torch.bfloat16)
    out = norm(torch.randn(1, 64, 2, 2, 2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_model_decodes_close_to_fp32():
    vae = random_vae(tiny_config(), seed=50)
    z = latents(4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z)
        low = vae.to(torch.bfloat16).decode(z.bfloat16()).float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().mean() < 0.03


def test_dtype_and_device_parsing():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    assert parse_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32 and resolve_dtype("fp16", torch.device("cpu")) is torch.float16
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    with pytest.raises(UsageError, match="unknown device"):
        parse_device("tpu:0")
