"""Multi-scale deformable attention (Deformable-DETR) in pure PyTorch.

The reference VFMTok code needs a compiled CUDA extension. This module computes the same function with
``torch.nn.functional.grid_sample`` (bilinear, zero padding, ``align_corners=False``), so it runs on any device,
under autocast and with autograd, without compiling anything.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError

__all__ = ["multi_scale_deformable_attention", "MultiScaleDeformableAttention", "grid_reference_points"]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample each level at the given locations and sum the samples with the given weights.

    Args:
        value: (B, S, heads, head_dim) with S = sum(H_l * W_l); levels are concatenated in row-major order.
        spatial_shapes: (H_l, W_l) of each level.
        sampling_locations: (B, Q, heads, levels, points, 2) as (x, y) in [0, 1] (0 = left/top edge of the map).
        attention_weights: (B, Q, heads, levels, points), already normalised.

    Returns:
        (B, Q, heads * head_dim).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if len(shapes) != levels:
        raise InvalidValueError(f"got {len(shapes)} spatial shapes for {levels} sampling levels")
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)

    if len(set(shapes)) == 1:
        # All levels share one size (VFMTok's multi-depth features): sample them in a single grid_sample call.
        h, w = shapes[0]
        # (B, h*w, heads, D) x levels -> (B, heads, levels, D, h, w) -> (B*heads*levels, D, h, w)
        stacked = torch.stack(value_per_level, dim=2).permute(0, 3, 2, 4, 1)
        stacked = stacked.reshape(batch * heads * levels, head_dim, h, w)
        # (B, Q, heads, levels, P, 2) -> (B*heads*levels, Q, P, 2)
        grid = grids.permute(0, 2, 3, 1, 4, 5).reshape(batch * heads * levels, queries, points, 2)
        sampled = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B*heads*levels, D, Q, P) -> (B*heads, D, Q, levels*P)
        sampled = sampled.view(batch, heads, levels, head_dim, queries, points)
        sampled = sampled.permute(0, 1, 3, 4, 2, 5).reshape(batch * heads, head_dim, queries, levels * points)
    else:
        samples = []
        for level, (h, w) in enumerate(shapes):
            level_value = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
            level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
            samples.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=False))
        sampled = torch.stack(samples, dim=-2).flatten(-2)  # (B*heads, D, Q, levels*P)

    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (sampled * weights).sum(-1).view(batch, heads * head_dim, queries)
    return output.transpose(1, 2).contiguous()


def grid_reference_points(height: int, width: int, device=None) -> torch.Tensor:
    """Cell centres of an ``height x width`` grid in row-major order, as (x, y) in [0, 1]: shape (height*width, 2)."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable cross-attention of queries to a few feature maps (Zhu et al., 2021), parameter names as in
    Deformable-DETR so that its checkpoints and VFMTok's load without renaming."""

    def __init__(self, dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if dim % num_heads != 0:
            raise InvalidValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR init: points start on rays in ``num_heads`` directions at distances 1..P (in cells)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        bias = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        bias = bias * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, features: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, dim); reference_points (B or 1, Q, levels, 2) in [0, 1] as (x, y);
        features (B, S, dim), the levels flattened row-major and concatenated; returns (B, Q, dim)."""
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != levels:
            raise InvalidValueError(f"expected {levels} feature levels, got {len(spatial_shapes)}")
        if features.shape[1] != sum(int(h) * int(w) for h, w in spatial_shapes):
            raise InvalidValueError(f"features have {features.shape[1]} positions, spatial shapes "
                                    f"{list(spatial_shapes)} "
                             f"describe {sum(int(h) * int(w) for h, w in spatial_shapes)}")
        value = self.value_proj(features).view(batch, -1, heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        # Offsets are in cells of each level: divide by (W, H) to move in normalised coordinates.
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)
