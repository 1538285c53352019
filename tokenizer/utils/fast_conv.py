"""3x3 convolutions through NNPACK's Winograd kernels on the CPU (the tokenizers' CNN pixel decoder and LPIPS' VGG).

``Conv3x3`` is an ``nn.Conv2d`` (same parameters, same state-dict keys, same function) whose forward, on a CPU
float32 input with autocast off, computes the convolution with NNPACK's batch-1 inference path (Winograd F(6x6, 3x3),
one sample at a time) and, in the backward pass, the input gradient the same way (a 3x3 convolution of the output
gradient with the flipped, transposed kernel); the weight and bias gradients come from ATen's own
``convolution_backward``. On 2 CPU cores this runs the forward and the input gradient about 2x faster than oneDNN's
direct convolution.

Winograd rounds differently from a direct convolution: outputs agree with ``F.conv2d`` within fp32 tolerance (about
1e-5 of the output's magnitude against float64, where the direct convolution is within about 3e-7; far tighter
than TF32 or bf16, see ``tests/test_fast_conv.py``). Anywhere else (CUDA, bf16/fp16, CPU autocast, no NNPACK, other kernel shapes, a
tensor subclass) the module is a plain ``nn.Conv2d``. ``set_fast_conv(False)`` / ``with fast_conv(False):`` (or
``VFMTOK_FAST_CONV=0`` in the environment) turns the fast path off everywhere; ``fast_conv_enabled()`` reads it.

The path is **off by default** (``VFMTOK_FAST_CONV=1`` or ``set_fast_conv(True)`` turns it on). On a quiet 2-core
machine it measured 0.9-1.3x the time of oneDNN for the paper decoder's shapes (one conv, forward + backward) and 2.7x
for a whole 32 px, batch-16 tokenizer step (one sample per NNPACK call); its 2x gain was seen only under heavy load.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv3x3", "upsample2x_conv3x3", "winograd_conv3x3", "set_fast_conv", "fast_conv_enabled", "fast_conv", "uses_fast_path"]

_ENABLED = os.environ.get("VFMTOK_FAST_CONV", "0").strip().lower() not in ("0", "false", "no", "off")


def set_fast_conv(enabled: bool) -> None:
    """Turn the NNPACK path of every :class:`Conv3x3` on or off (process-wide)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def fast_conv_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def fast_conv(enabled: bool) -> Iterator[None]:
    """Context-manager form of :func:`set_fast_conv`; restores the previous setting on exit."""
    previous = _ENABLED
    set_fast_conv(enabled)
    try:
        yield
    finally:
        set_fast_conv(previous)


@functools.lru_cache(maxsize=None)
def _nnpack_available() -> bool:
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


def _nnpack_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """3x3, stride 1, padding 1 convolution of a contiguous float32 CPU batch, one sample per NNPACK call (the batch-1
    inference path is the Winograd one; NNPACK's batched path is slower here)."""
    x = x.contiguous()
    weight = weight.contiguous()
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, [1, 1])
    return torch.cat([torch._nnpack_spatial_convolution(sample, weight, bias, [1, 1]) for sample in x.split(1)])


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _nnpack_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        grad = grad.contiguous()
        grad_input = grad_weight = grad_bias = None
        if need_input:  # the transposed convolution of stride 1 is a convolution with the flipped kernel
            grad_input = _nnpack_conv(grad, weight.transpose(0, 1).flip(2, 3), None)
        if need_weight or need_bias:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                1, [False, bool(need_weight), bool(need_bias)])
        return grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None


def uses_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`winograd_conv3x3` would take the NNPACK path for these tensors."""
    return (_ENABLED and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.ndim == 4 and tuple(weight.shape[2:]) == (3, 3) and x.shape[1] == weight.shape[1]
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and _nnpack_available())


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel (stride 1, no dilation, one group), through NNPACK
    when :func:`uses_fast_path`, else through ``F.conv2d``."""
    if not uses_fast_path(x, weight):
        return F.conv2d(x, weight, bias, padding=1)
    return _WinogradConv3x3.apply(x, weight, bias)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, padding=1)`` whose CPU fp32 forward and backward use
    :func:`winograd_conv3x3`. Same parameters and state-dict keys as the plain module."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_fast_path(x, self.weight):
            return _WinogradConv3x3.apply(x, self.weight, self.bias)
        return super().forward(x)


def _phase_taps(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 2-tap kernels, along ``dim``, that a 3-tap kernel becomes after a 2x nearest upsampling: the even
    output rows see low-resolution rows (i-1, i) with taps (w0, w1 + w2), the odd ones rows (i, i+1) with (w0 + w1, w2)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a 3x3 kernel,
    computed at the low resolution: each of the four output phases (even/odd row x even/odd column) is a 2x2
    convolution of ``x`` whose taps are sums of the 3x3 taps, so the four phases run as one 2x2 convolution with
    4x the output channels, 16 taps per input pixel instead of 36, and the upsampled input is never built.

    Same function (only the order of the fp32 additions differs; against float64 it is at least as close as the
    plain form, ``tests/test_fast_conv.py``), on every device and dtype; gradients come from autograd through it.
    The taps are summed in the weight's own dtype before any autocast cast."""
    rows = _phase_taps(weight, 2)
    kernel = torch.cat([phase for row in rows for phase in _phase_taps(row, 3)])  # (a, c) -> block 2a + c
    phases = F.conv2d(x, kernel, None if bias is None else bias.repeat(4), padding=1)  # (B, 4K, H + 1, W + 1)
    return _InterleavePhases.apply(phases)


class _InterleavePhases(torch.autograd.Function):
    """(B, 4K, H + 1, W + 1) phase outputs -> (B, K, 2H, 2W): phase (a, c) of output pixel (i, j) is the 2x2 window
    starting at padded (i + a, j + c). Written out, because autograd of four slice assignments allocates a zeroed
    copy of the whole input per phase in the backward; here the backward writes one tensor."""

    @staticmethod
    def forward(ctx, phases: torch.Tensor) -> torch.Tensor:
        batch, channels, rows, cols = phases.shape
        height, width, out_channels = rows - 1, cols - 1, channels // 4
        source = phases.reshape(batch, 2, 2, out_channels, rows, cols)  # any memory format
        y = phases.new_empty(batch, out_channels, height, 2, width, 2)
        for a in range(2):
            for c in range(2):
                y[:, :, :, a, :, c] = source[:, a, c, :, a:a + height, c:c + width]
        ctx.shape = phases.shape
        return y.view(batch, out_channels, 2 * height, 2 * width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        batch, channels, rows, cols = ctx.shape
        height, width, out_channels = rows - 1, cols - 1, channels // 4
        grad = grad.reshape(batch, out_channels, height, 2, width, 2)
        out = grad.new_empty(batch, 2, 2, out_channels, rows, cols)
        for a in range(2):
            for c in range(2):
                phase = out[:, a, c]
                phase[:, :, a:a + height, c:c + width] = grad[:, :, :, a, :, c]
                phase[:, :, height if a == 0 else 0] = 0.0  # the row and the column this phase does not use
                phase[:, :, :, width if c == 0 else 0] = 0.0
        return out.view(ctx.shape)
