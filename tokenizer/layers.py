"""Layers shared by the tokenizer families: the pre-norm transformer of the decoders, the l2-normalised vector
quantizer, and the LlamaGen / taming CNN pixel decoder (Esser et al. 2021; FoundationVision/LlamaGen)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.fast_conv import Conv3x3, upsample2x_conv3x3
from vfmtok.tokenizer.utils.layers import FusedSwiGLU

__all__ = ["Attention", "TransformerLayer", "Transformer", "VectorQuantizer", "entropy_loss", "PixelDecoder",
           "ResnetBlock", "AttnBlock", "Upsample"]


# ----------------------------------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (with bias), SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise InvalidValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + SwiGLU(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffnet = FusedSwiGLU(dim, ffn_dim)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), causal)
        return x + self.ffnet(self.norm2(x))

class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, ffn_dim, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Vector quantization
# ----------------------------------------------------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ with an l2-normalised codebook trained by gradient, straight-through estimator.

    Losses (taming/LlamaGen): codebook ``mean((z_q - sg(z))^2)``, commitment ``beta * mean((sg(z_q) - z)^2)``, and an
    optional entropy penalty. Usage is tracked over a rolling window of the last ``usage_window`` assigned indices.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_beta: float = 0.25,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01, l2_normalize: bool = True,
                 usage_window: int = 65536):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment_beta = commitment_beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(codebook_size, code_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_normalize:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # -1 marks an empty slot, so that an unfilled window does not count as uses of code 0. Not persistent: a
        # monitoring statistic, kept out of exported weights (it restarts empty after loading).
        self.register_buffer("recent_indices", torch.full((usage_window,), -1, dtype=torch.long), persistent=False)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices`` (any shape) -> (*indices.shape, code_dim)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token indices must be integers, got {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise InvalidValueError(f"token indices must lie in [0, {self.codebook_size}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices, self.codebook())

    def usage(self) -> float:
        """Fraction of the codebook used in the rolling window."""
        seen = self.recent_indices[self.recent_indices >= 0]
        return torch.unique(seen).numel() / self.codebook_size

    @torch.no_grad()
    def _record(self, indices: torch.Tensor) -> None:
        flat = indices.flatten()[-self.recent_indices.numel():]
        self.recent_indices.copy_(torch.cat([self.recent_indices[flat.numel():], flat]))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (..., code_dim) -> (z_q with straight-through gradient, indices (...), losses)."""
        z = z.float()
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook().float()
        flat = z.reshape(-1, self.code_dim)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e; the argmin does not need the ||z||^2 term.
        distances = (codebook.pow(2).sum(-1)[None, :] - 2 * flat @ codebook.t())
        indices = distances.argmin(dim=-1)
        z_q = codebook[indices].view_as(z)
        losses = {
            "codebook": F.mse_loss(z_q, z.detach()),
            "commitment": self.commitment_beta * F.mse_loss(z, z_q.detach()),
        }
        if self.entropy_weight > 0:
            full = flat.pow(2).sum(-1, keepdim=True) + distances
            losses["entropy"] = self.entropy_weight * entropy_loss(-full, self.entropy_temperature)
        if self.training:
            self._record(indices)
        z_q = z + (z_q - z).detach()
        return z_q, indices.view(z.shape[:-1]), losses


def entropy_loss(affinity: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample entropy minus entropy of the batch-average assignment (MaskGIT / LlamaGen)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = logits.softmax(-1)
    log_probs = logits.log_softmax(-1)
    mean_probs = probs.mean(0)
    batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - batch_entropy


# ----------------------------------------------------------------------------------------------------------------------
# CNN pixel decoder
# ----------------------------------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3x3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention of the taming decoder (1x1 conv projections), SDPA kernel."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """2x nearest upsampling then a 3x3 convolution. While training it is computed at the low resolution
    (:func:`upsample2x_conv3x3`, the same function with less than half the multiply-adds, forward and backward).
    Without gradients it runs literally: oneDNN's kernel for the fused form splits its sums by thread count, and
    sampled images must be bit-equal whichever process (of however many threads) made them."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad):
            return upsample2x_conv3x3(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """LlamaGen/taming CNN decoder: conv_in -> (res, attn, res) -> per level ``num_res_blocks`` ResBlocks + 2x upsample.

    The 3x3 convolutions are :class:`~tokenizer.utils.fast_conv.Conv3x3` (plain ``nn.Conv2d`` parameters; opt-in
    NNPACK Winograd kernels on the CPU in fp32, see :mod:`vfmtok.tokenizer.utils.fast_conv`); while training,
    each upsampling convolution runs at the low resolution (:func:`~tokenizer.utils.fast_conv.upsample2x_conv3x3`),
    the same function with 16 instead of 36 multiply-adds per input pixel and channel pair."""

    def __init__(self, in_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 out_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        block_in = channels * channel_mult[-1]
        self.conv_in = Conv3x3(in_channels, block_in)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(channel_mult)):
            block = nn.Module()
            res = nn.ModuleList()
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, channels * mult, dropout))
                block_in = channels * mult
            block.res = res
            if level != len(channel_mult) - 1:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = Conv3x3(block_in, out_channels)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight used by adaptive GAN weighting."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            for res in block.res:
                h = res(h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
