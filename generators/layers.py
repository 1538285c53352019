"""Layers shared by the generators: the AR generators' KV cache, RMSNorm (in fp32, as Llama) and the 2D rotary
position embedding that the GPT (LlamaGen's ``precompute_freqs_cis_2d``) and the LightningDiT / DiT^DH options of the
denoiser (EVA's ``VisionRotaryEmbeddingFast``) use.

2D RoPE. Each head's ``head_dim`` channels form ``head_dim / 2`` interleaved pairs ``(x[2i], x[2i+1])``. The first
half of the pairs rotate by ``row * f_j``, the second half by ``column * f_j``, with ``f_j = base ** (-2j / (head_dim
/ 2))``, ``j = 0 .. head_dim / 4 - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["RMSNorm", "rope_2d_table", "apply_rotary_embedding", "KVCache", "write_at_positions",
           "cache_attention_mask"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, the statistics computed in fp32 and the result cast back to the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0, class_token_rope: str = "zero",
                  device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """(1 + grid_size**2, head_dim // 2, 2) float32 table of (cos, sin): row 0 for the class token, then the grid."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size, device=device), freqs)  # (grid, head_dim // 4)
    grid_angles = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),  # rows
                             angles[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # columns
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    class_row = torch.zeros(1, half, 2, device=device)
    if class_token_rope == "none":
        class_row[..., 0] = 1.0
    return torch.cat([class_row, table])


def apply_rotary_embedding(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` (B, S, H, head_dim) by ``rope`` (S, head_dim // 2, 2), or per row
    (B, S, head_dim // 2, 2), in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if rope.dim() == 3:
        rope = rope[None]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Static key/value buffers of an AR generator, one pair per block, each (batch, heads, max_length, head_dim),
    written in place. Slot ``p`` holds sequence position ``p`` (the GPT's class token is 0; RAR's start and class
    tokens are 0 and 1). Unwritten slots are masked out by position."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def narrow(self, batch_size: int) -> "KVCache":
        """The first ``batch_size`` rows, as views sharing storage (writes reach this cache)."""
        return KVCache([k[:batch_size] for k in self.keys], [v[:batch_size] for v in self.values])


def write_at_positions(buffer: torch.Tensor, chunk: torch.Tensor, positions: torch.Tensor) -> None:
    """``buffer`` (B, H, L, D) <- ``chunk`` (B, H, S, D) at sequence ``positions``: (S,) for every row, or (B, S),
    each row its own (a speculative decoder's rows sit at different positions)."""
    chunk = chunk.to(buffer.dtype)
    if positions.dim() == 1:
        buffer.index_copy_(2, positions, chunk)
    else:
        buffer.scatter_(2, positions[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3]), chunk)


def cache_attention_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Which of a ``length``-slot cache each query may attend to (the slots up to its own position; unwritten and stale
    slots beyond it are masked): (S, L) for ``positions`` (S,), (B, 1, S, L) for per-row positions (B, S)."""
    mask = torch.arange(length, device=positions.device) <= positions[..., None]
    return mask[:, None] if positions.dim() == 2 else mask
