"""Layers shared across stages (the tokenizers' decoder transformer and the flow denoiser)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedSwiGLU"]


class FusedSwiGLU(nn.Module):
    """SwiGLU FFN ``w3(silu(a) * b)`` with the gate ``a`` and value ``b`` projections fused in one Linear ``w12``
    (gate first), with biases: DINOv2's ``SwiGLUFFNFused`` layout, also LightningDiT's."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
