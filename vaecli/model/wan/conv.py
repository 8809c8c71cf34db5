"""Wan's causal 3-D convolution and the memory layout it runs in: `CausalConv3d` (zero-padded in space, causal
in time, the frames before a chunk taken from the clip's `Cache`), the one padded buffer it convolves, and the
channels-last rule for its weights (`channels_last_`, `conv_layout`), which the checkpoint reader applies too.

Layouts: (B, C, T, H, W) tensors laid out channels-last (memory order B, T, H, W, C; `CL3`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CL3 = torch.channels_last_3d
Cache = dict  # nn.Module -> what that module keeps between the chunks of one clip (a fresh dict per clip)


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution over (B, C, T, H, W), zero-padded symmetrically in space and causally in time: the
    2·p_t frames before a chunk are the end of the previous chunk's input (from `cache`) or zeros at the clip's
    start. With cache None every call is a clip of its own.

    Inputs are laid out channels-last (memory order B, T, H, W, C; `CL3`), the layout oneDNN convolves in: a
    (B, C, T, H, W)-ordered input would be copied into it inside every call. The cached frames, the chunk and
    the zero padding around them are written into one padded buffer (one copy, no concatenation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.space_pad = (ph, pw)
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        pad, keep = self.time_pad, self.time_pad and cache is not None
        before = cache.get(self) if keep else None
        if pad and before is None and x.shape[2] == 1:  # a clip's first frame: the taps on zeros add nothing
            if keep:
                cache[self] = x.clone(memory_format=CL3)  # a copy: a view would keep the caller's tensor alive
            frame = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], self.space_pad)
            return frame.unsqueeze(2)
        buf = padded(x, before, pad, *self.space_pad)
        if keep:  # the last `pad` frames of (before, x), copied out of the padded buffer; the old ones freed now
            (ph, pw), (height, width) = self.space_pad, x.shape[-2:]
            cache[self] = buf[:, :, -pad:, ph:ph + height, pw:pw + width].clone(memory_format=CL3)
            del before
        return F.conv3d(buf, self.weight, self.bias, self.stride)


def padded(x: torch.Tensor, before: torch.Tensor | None, time_pad: int, ph: int, pw: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, time_pad + T, H + 2ph, W + 2pw), channels-last: the frames `before` (up to
    time_pad of them, the previous chunk's last) then zero frames fill the time padding in front, zeros the space
    padding around."""
    if not (time_pad or ph or pw):  # a 1×1×1 shortcut or an unpadded time step: no copy unless the layout needs one
        return x.contiguous(memory_format=CL3)
    b, c, t, h, w = x.shape
    out = torch.empty((b, c, time_pad + t, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device,
                      memory_format=CL3)
    kept = 0 if before is None else before.shape[2]
    out[:, :, :time_pad - kept].zero_()
    if ph:
        out[:, :, time_pad - kept:, :ph].zero_()
        out[:, :, time_pad - kept:, -ph:].zero_()
    if pw:
        out[:, :, time_pad - kept:, ph:ph + h, :pw].zero_()
        out[:, :, time_pad - kept:, ph:ph + h, -pw:].zero_()
    if kept:
        out[:, :, time_pad - kept:time_pad, ph:ph + h, pw:pw + w] = before
    out[:, :, time_pad:, ph:ph + h, pw:pw + w] = x
    return out


def channels_last_(module: nn.Module) -> nn.Module:
    """Lay every convolution weight of `module` out channels-last, in place (the layout of `CausalConv3d`
    inputs and of the frames `per_frame` takes from them; a weight in the other layout would be copied in every
    call); returns `module`."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            m.weight.data = m.weight.data.contiguous(memory_format=conv_layout(m.weight))
    return module


def conv_layout(weight: torch.Tensor) -> torch.memory_format:
    """The memory format the modules keep a convolution weight in: channels-last, 3-D (5-D weights) or 2-D."""
    return CL3 if weight.dim() == 5 else torch.channels_last
