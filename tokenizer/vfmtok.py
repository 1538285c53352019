"""VFMTok / VFMAE: image tokenizers built on a frozen vision foundation model ("Vision Foundation Models as Effective
Visual Tokenizers for Autoregressive Image Generation", 2025, and "Vision Foundation Models as Generalist Tokenizers
for Image Generation", 2026; public code CVMI-Lab/VFMTok and CVMI-Lab/VFMTok2).

Data flow:  images in [-1, 1] -> frozen VFM -> 4 feature maps (same grid, different depths)
            -> region-adaptive quantization: learnable queries on a 16x16 grid attend to the maps with deformable attention
            -> bottleneck: VQ (l2-normalised codebook) or a continuous 32-channel latent
            -> decoder transformer over [slot tokens; cls; mask tokens; registers] -> CNN pixel decoder -> image
            -> a second decoder pass predicts the VFM's last-layer features (semantic reconstruction, 1 - cosine).

The frozen VFM is held outside the module tree (see ``VFMTokModel.vfm``): it is not in ``state_dict()`` nor in
``parameters()``. The config records which VFM to load; when none names the weights the model was trained with (a
randomly initialised VFM, or weights given with ``load_vfm_weights(path)``), ``save_pretrained`` writes them next to
the tokenizer's (``vfm.safetensors``) so that the saved folder loads back by itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from vfmtok.tokenizer.frozen_encoder import VFM_WEIGHTS_NAME, FrozenVFMHolderMixin
from vfmtok.tokenizer.deformable_attention import MultiScaleDeformableAttention, grid_reference_points
from vfmtok.tokenizer.interface import CodeLayout, ImageTokenizerMixin
from vfmtok.tokenizer.layers import Attention, PixelDecoder, Transformer, VectorQuantizer, entropy_loss
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.frozen import FrozenModulesMixin
from vfmtok.tokenizer.utils.loading import StrictLoadingMixin
from vfmtok.tokenizer.vfm import FrozenVFM, VFM_PRESETS, VFMFeatures, resize_images

__all__ = ["VFMTokModel", "VFMTokOutput", "VectorQuantizer", "entropy_loss", "resize_images", "VFM_WEIGHTS_NAME"]



# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
class DeformableEncoderLayer(nn.Module):
    """Post-norm layer of the region-adaptive quantizer: deformable cross-attention to the VFM maps, self-attention
    among the queries, ReLU FFN; each followed by a residual and a LayerNorm (Deformable-DETR naming)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int, dropout: float):
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, reference_points, features, spatial_shapes, causal: bool):
        # The sampling locations are sensitive to rounding: keep the cross-attention in fp32 under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            attended = self.cross_attn((x + pos).float(), reference_points, features.float(), spatial_shapes)
        x = self.norm1(x + self.dropout(attended))
        x = self.norm3(x + self.dropout(self.self_attn(x + pos, causal)))
        x = self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x


class RegionAdaptiveEncoder(nn.Module):
    """Learnable queries on a grid gather region-adaptive information from the multi-level VFM features."""

    def __init__(self, vfm_dim: int, dim: int, depth: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, query_grid: int, dropout: float):
        super().__init__()
        self.query_grid = query_grid
        self.level_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(vfm_dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(),
                          nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim))
            for _ in range(num_levels))
        self.level_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_levels))
        num_queries = query_grid * query_grid
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * dim ** -0.5)
        self.query_pos = nn.Parameter(torch.randn(1, num_queries, dim) * dim ** -0.5)
        self.query_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(DeformableEncoderLayer(dim, ffn_dim, num_heads, num_levels, num_points, dropout)
                                    for _ in range(depth))

    def forward(self, levels: Sequence[torch.Tensor], grid: tuple[int, int], causal: bool) -> torch.Tensor:
        """levels: per level (B, h*w, vfm_dim); returns the query states (B, query_grid**2, dim)."""
        features = torch.cat([norm(proj(level)) for proj, norm, level in
                              zip(self.level_proj, self.level_norm, levels)], dim=1)
        batch = features.shape[0]
        reference = grid_reference_points(self.query_grid, self.query_grid, device=features.device)
        reference = reference[None, :, None, :].expand(1, -1, len(levels), 2)
        x = self.query_norm(self.queries).expand(batch, -1, -1)
        spatial_shapes = [tuple(grid)] * len(levels)
        for layer in self.layers:
            x = layer(x, self.query_pos, reference, features, spatial_shapes, causal)
        return x

class ContinuousProjection(nn.Module):
    """VFMAE bottleneck: GroupNorm(32) -> SiLU -> 1x1 conv to ``latent_channels``; deterministic (no KL, no noise)."""

    def __init__(self, dim: int, latent_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.conv = nn.Conv2d(dim, latent_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))

class DecoderTransformer(nn.Module):
    """Turns the slot tokens into a feature map for the pixel decoder and into predicted VFM features.

    Pixel pass: [slots + pos; cls; mask tokens on the pixel grid; registers] -> mask-token outputs as a (dim, g, g) map.
    Semantic pass: the same with learned "VFM mask" tokens on the VFM grid, projected to the VFM width. It shares the
    pixel transformer (discrete VFMTok) or has its own shallow transformer (VFMAE, ``semantic_depth > 0``).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, ffn_dim: int, dropout: float, num_slots: int,
                 pixel_grid: int, semantic_grid: int, vfm_dim: int, num_registers: int, semantic_depth: int,
                 semantic_cls: bool):
        super().__init__()
        self.pixel_grid = pixel_grid
        self.semantic_grid = semantic_grid
        self.semantic_cls = semantic_cls
        scale = dim ** -0.5
        # Position table on the VFM grid (+1 for cls); the pixel grid interpolates it.
        self.position_embedding = nn.Parameter(torch.randn(1, semantic_grid ** 2 + 1, dim) * scale)
        self.slot_position_embedding = nn.Parameter(torch.randn(1, num_slots, dim) * scale)
        self.mask_embedding = nn.Parameter(torch.randn(1, 1, dim) * scale)
        self.semantic_mask_embedding = nn.Parameter(torch.randn(1, 1, dim) * scale)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * scale)
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim)) if num_registers else None
        self.transformer = Transformer(dim, depth, num_heads, ffn_dim, dropout)
        self.semantic_transformer = (Transformer(dim, semantic_depth, num_heads, ffn_dim, dropout)
                                     if semantic_depth else None)
        self.pixel_norm = nn.LayerNorm(dim)
        self.semantic_norm = nn.LayerNorm(dim)
        self.semantic_proj = nn.Linear(dim, vfm_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _pixel_positions(self) -> torch.Tensor:
        """Position table resized from the VFM grid to the pixel grid exactly as the reference does it
        (bicubic with a 0.1 offset on the scale factor), so that released weights give the same outputs."""
        table = self.position_embedding
        if self.pixel_grid == self.semantic_grid:
            return table
        n, dim = self.semantic_grid, table.shape[-1]
        scale = (self.pixel_grid + 0.1) / n
        patches = table[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
        return torch.cat([table[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def _run(self, memory: torch.Tensor, tokens: torch.Tensor, norm: nn.LayerNorm, transformer: Transformer,
             causal: bool) -> torch.Tensor:
        """Run [norm_pixel(memory); norm(tokens; registers)] and return the outputs at the ``tokens`` positions."""
        if self.register_tokens is not None:
            tokens = torch.cat([tokens, self.register_tokens.expand(tokens.shape[0], -1, -1)], dim=1)
        x = transformer(torch.cat([self.pixel_norm(memory), norm(tokens)], dim=1), causal)
        num_registers = 0 if self.register_tokens is None else self.register_tokens.shape[1]
        return x[:, memory.shape[1]:x.shape[1] - num_registers]

    def forward(self, slots: torch.Tensor, causal: bool, semantic: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch = slots.shape[0]
        memory = slots + self.slot_position_embedding
        positions = self._pixel_positions()
        cls = self.cls_token.expand(batch, -1, -1)
        masks = (self.mask_embedding + positions[:, 1:]).expand(batch, -1, -1)
        pixel = self._run(memory, torch.cat([cls + positions[:, :1], masks], dim=1), self.pixel_norm,
                          self.transformer, causal)
        g = self.pixel_grid
        feature_map = pixel[:, 1:].transpose(1, 2).reshape(batch, -1, g, g)
        if not semantic:
            return feature_map, None
        table = self.position_embedding
        sem_masks = (self.semantic_mask_embedding + table[:, 1:]).expand(batch, -1, -1)
        transformer = self.semantic_transformer or self.transformer
        sem_causal = causal if self.semantic_transformer is None else False
        sem = self._run(memory, torch.cat([cls + table[:, :1], sem_masks], dim=1), self.semantic_norm,
                        transformer, sem_causal)
        sem = sem if self.semantic_cls else sem[:, 1:]
        return feature_map, self.semantic_proj(sem)


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class VFMTokOutput(BaseOutput):
    """Training forward of :class:`VFMTokModel`.

    reconstruction: decoded images (B, 3, S, S), S = ``image_size``, not clamped.
    target: the input resized to ``image_size`` (what ``reconstruction`` is compared with).
    semantic_prediction / semantic_target: predicted and frozen-VFM last-layer features (B, N, vfm_dim).
    tokens: code indices (B, num_tokens) for the discrete bottleneck, the latent (B, C, g, g) for the continuous one.
    losses: each loss term, unweighted except for the VQ's own beta / entropy weight: ``semantic`` (1 - cosine),
        ``pixel_l2`` (MSE), and for VQ ``codebook``, ``commitment`` (and ``entropy`` when enabled).
    codebook_usage: fraction of codes used in the rolling window (discrete only).
    """

    reconstruction: torch.Tensor = None
    target: torch.Tensor = None
    semantic_prediction: Optional[torch.Tensor] = None
    semantic_target: Optional[torch.Tensor] = None
    tokens: torch.Tensor = None
    losses: dict = None
    codebook_usage: Optional[float] = None


def _vfm_spec(vfm: dict) -> dict:
    """Expand a ``{"preset": name, ...overrides}`` VFM spec into full FrozenVFM arguments."""
    spec = dict(vfm)
    preset = spec.pop("preset", None)
    if preset is not None:
        if preset not in VFM_PRESETS:
            raise InvalidValueError(f"unknown VFM preset {preset!r}; known presets: {sorted(VFM_PRESETS)}")
        spec = {**VFM_PRESETS[preset], **spec}
    allowed = {"backend", "architecture", "image_size", "feature_layers", "pretrained", "image_mean", "image_std",
               "resize"}
    unknown = set(spec) - allowed
    if unknown:
        raise InvalidValueError(f"unknown VFM option(s) {sorted(unknown)}; allowed: {sorted(allowed | {'preset'})}")
    for key in ("backend", "architecture", "image_size"):
        if key not in spec:
            raise InvalidValueError(f"the VFM spec needs {key!r} (or a 'preset' that provides it); got {sorted(vfm)}")
    return spec


class VFMTokModel(FrozenVFMHolderMixin, StrictLoadingMixin, FrozenModulesMixin, ImageTokenizerMixin, ModelMixin,
                  ConfigMixin):
    """VFMTok (``bottleneck="vq"``) and VFMAE (``bottleneck="continuous"``) tokenizers.

    ``encode(images)`` -> token indices (B, query_grid**2) or latents (B, latent_channels, g, g);
    ``decode(tokens)`` -> images in [-1, 1]; ``forward(images)`` -> :class:`VFMTokOutput` with every loss term.
    """

    config_name = "config.json"
    converter = "vfmtok.tokenizer.convert"  # named in loading errors (StrictLoadingMixin)

    @register_to_config
    def __init__(
        self,
        vfm: dict,
        image_size: int = 336,
        bottleneck: str = "vq",
        dim: int = 512,
        query_grid: int = 16,
        encoder_depth: int = 6,
        encoder_heads: int = 8,
        encoder_points: int = 4,
        encoder_ffn_dim: int = 1024,
        encoder_causal: bool = True,
        add_cls_to_levels: bool = False,
        codebook_size: int = 16384,
        code_dim: int = 12,
        commitment_beta: float = 0.25,
        entropy_weight: float = 0.0,
        usage_window: int = 65536,
        latent_channels: int = 32,
        decoder_depth: int = 6,
        decoder_heads: int = 8,
        decoder_ffn_dim: int = 1368,
        decoder_dropout: float = 0.1,
        decoder_causal: bool = True,
        decoder_registers: int = 4,
        semantic_depth: int = 0,
        semantic_cls: bool = False,
        pixel_channels: int = 128,
        pixel_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        pixel_res_blocks: int = 2,
        upsample_factor: int = 16,
    ):
        super().__init__()
        if bottleneck not in ("vq", "continuous"):
            raise InvalidValueError(f"bottleneck must be 'vq' or 'continuous', got {bottleneck!r}")
        if upsample_factor != 2 ** (len(pixel_channel_mult) - 1):
            raise InvalidValueError(f"upsample_factor ({upsample_factor}) must equal 2**(len(pixel_channel_mult) - "
                                    "1) = "
                             f"{2 ** (len(pixel_channel_mult) - 1)} for pixel_channel_mult={list(pixel_channel_mult)}")
        if image_size % upsample_factor != 0:
            raise InvalidValueError(f"image_size ({image_size}) must be a multiple of upsample_factor "
                                    f"({upsample_factor})")
        for name, value in (("dim", dim), ("pixel_channels", pixel_channels)):
            if value % 32 != 0:
                raise InvalidValueError(f"{name} ({value}) must be a multiple of 32 (GroupNorm with 32 groups)")
        spec = _vfm_spec(vfm)
        self.hold_vfm(FrozenVFM(**spec))  # not part of the tokenizer's weights (FrozenVFMHolderMixin)
        vfm_dim, vfm_grid = self.vfm.hidden_size, self.vfm.grid
        if vfm_grid[0] != vfm_grid[1]:
            raise InvalidValueError(f"the VFM patch grid must be square, got {vfm_grid}")
        num_levels = len(spec.get("feature_layers", (5, 11, 17, 23)))

        self.encoder = RegionAdaptiveEncoder(vfm_dim, dim, encoder_depth, encoder_heads, num_levels, encoder_points,
                                             encoder_ffn_dim, query_grid, dropout=0.0)
        if bottleneck == "vq":
            self.quant_proj = nn.Linear(dim, code_dim)
            self.quantizer = VectorQuantizer(codebook_size, code_dim, commitment_beta, entropy_weight,
                                             usage_window=usage_window)
            self.post_quant_proj = nn.Linear(code_dim, dim)
        else:
            self.quant_proj = ContinuousProjection(dim, latent_channels)
            self.post_quant_proj = nn.Linear(latent_channels, dim)
        self.decoder = DecoderTransformer(dim, decoder_depth, decoder_heads, decoder_ffn_dim, decoder_dropout,
                                          num_slots=query_grid ** 2, pixel_grid=image_size // upsample_factor,
                                          semantic_grid=vfm_grid[0], vfm_dim=vfm_dim,
                                          num_registers=decoder_registers, semantic_depth=semantic_depth,
                                          semantic_cls=semantic_cls)
        self.pixel_decoder = PixelDecoder(dim, pixel_channels, pixel_channel_mult, pixel_res_blocks)

    # -- the tokenizer interface ----------------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return self.config.bottleneck == "vq"

    @property
    def code_layout(self) -> CodeLayout:
        if not self.is_discrete:
            raise InvalidValueError("a continuous tokenizer has no code layout; use latent_shape")
        g = self.config.query_grid
        return CodeLayout(grid=(g, g), codebook_sizes=(self.config.codebook_size,))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        g = self.config.query_grid
        return (self.config.latent_channels, g, g)

    @property
    def input_size(self) -> int:
        return self.config.image_size

    @property
    def output_size(self) -> int:
        return self.config.image_size

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        return self.pixel_decoder.last_layer

    def codebook_usage(self) -> Optional[float]:
        return self.quantizer.usage() if self.is_discrete else None

    # -- encoding -----------------------------------------------------------------------------------------------
    def _encode_slots(self, images: torch.Tensor, vfm_features: Optional[VFMFeatures] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot states (B, num_tokens, dim) and the semantic target (B, N, vfm_dim).

        ``vfm_features`` (e.g. read from a feature cache) replaces running the frozen VFM on ``images``.
        """
        features = self.vfm(images) if vfm_features is None else self._check_features(vfm_features, len(images))
        levels = features.levels
        if self.config.add_cls_to_levels:
            levels = [level + cls[:, None] for level, cls in zip(levels, features.cls)]
        slots = self.encoder(levels, features.grid, self.config.encoder_causal)
        target = features.levels[-1]
        if self.config.semantic_cls:
            target = torch.cat([features.cls[-1][:, None], target], dim=1)
        return slots, target

    def _check_features(self, features: VFMFeatures, batch_size: int) -> VFMFeatures:
        expected = (batch_size, self.vfm.grid[0] * self.vfm.grid[1], self.vfm.hidden_size)
        if len(features.levels) != len(self.vfm.feature_layers) or tuple(features.grid) != tuple(self.vfm.grid):
            raise InvalidValueError(f"precomputed VFM features have {len(features.levels)} levels on a "
                                    f"{features.grid} grid; "
                             f"this model expects {len(self.vfm.feature_layers)} levels on {self.vfm.grid}")
        for level in features.levels:
            if tuple(level.shape) != expected:
                raise InvalidValueError(f"precomputed VFM feature level of shape {tuple(level.shape)}; expected "
                                        f"{expected}")
        return features

    def _bottleneck(self, slots: torch.Tensor):
        """-> (decoder input tokens (B, N, dim), tokens, losses)."""
        if self.is_discrete:
            z_q, indices, losses = self.quantizer(self.quant_proj(slots))
            return self.post_quant_proj(z_q.to(slots.dtype)), indices, losses
        latent = self.quant_proj(self._slots_to_map(slots))
        return self._latent_to_decoder_tokens(latent), latent, {}

    def _slots_to_map(self, slots: torch.Tensor) -> torch.Tensor:
        g = self.config.query_grid
        return slots.transpose(1, 2).reshape(slots.shape[0], -1, g, g)

    def _latent_to_decoder_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        return self.post_quant_proj(latent.flatten(2).transpose(1, 2))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> indices (B, num_tokens) (VQ) or latents (B, C, g, g) (continuous)."""
        slots, _ = self._encode_slots(images)
        if self.is_discrete:
            _, indices, _ = self.quantizer(self.quant_proj(slots))
            return indices
        return self.quant_proj(self._slots_to_map(slots))

    # -- decoding -----------------------------------------------------------------------------------------------
    def _decode_tokens(self, decoder_tokens: torch.Tensor, semantic: bool):
        feature_map, semantic_prediction = self.decoder(decoder_tokens, self.config.decoder_causal, semantic)
        return self.pixel_decoder(feature_map), semantic_prediction

    def _tokens_to_decoder_input(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        if self.is_discrete:
            return self.post_quant_proj(self.quantizer.lookup(tokens))
        return self._latent_to_decoder_tokens(tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, output_size: Optional[int] = None) -> torch.Tensor:
        """Indices (B, num_tokens) or latents (B, C, g, g) -> images (B, 3, S, S) in [-1, 1].

        S is ``image_size`` unless ``output_size`` is given (bicubic resize, e.g. 336 -> 256 for ImageNet-256 FID).
        """
        images = self.decode_unclamped(tokens)
        if output_size is not None:
            images = resize_images(images, output_size)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def decode_unclamped(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's output (B, 3, image_size, image_size) before clamping to [-1, 1]."""
        images, _ = self._decode_tokens(self._tokens_to_decoder_input(tokens), semantic=False)
        return images

    # -- training forward ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, semantic: bool = True,
                vfm_features: Optional[VFMFeatures] = None) -> VFMTokOutput:
        """Reconstruct ``images`` and compute every loss term of the model (see :class:`VFMTokOutput`).

        ``vfm_features``: the frozen VFM's features of ``images``, precomputed (feature cache); None runs the VFM.
        """
        slots, semantic_target = self._encode_slots(images, vfm_features)
        decoder_tokens, tokens, losses = self._bottleneck(slots)
        reconstruction, semantic_prediction = self._decode_tokens(decoder_tokens, semantic)
        target = resize_images(images, reconstruction.shape[-1]).to(reconstruction.dtype)
        losses = dict(losses)
        losses["pixel_l2"] = F.mse_loss(reconstruction.float(), target.float())
        if semantic_prediction is not None:
            cosine = F.cosine_similarity(semantic_prediction.float(), semantic_target.float(), dim=-1, eps=1e-6)
            losses["semantic"] = (1 - cosine).mean()
        return VFMTokOutput(
            reconstruction=reconstruction, target=target, semantic_prediction=semantic_prediction,
            semantic_target=semantic_target, tokens=tokens, losses=losses,
            codebook_usage=self.codebook_usage())

    # -- reporting ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Facts for ``vfmtok describe``: parameter split and token layout."""
        info: dict[str, Any] = {
            "model": type(self).__name__,
            **self.tokenizer_summary(),
            "bottleneck": self.config.bottleneck,
            "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "frozen_params": sum(p.numel() for p in self.vfm.parameters()),
            "num_tokens": self.num_tokens,
            "image_size": self.config.image_size,
            "vfm": {"backend": self.vfm.backend, "hidden_size": self.vfm.hidden_size, "grid": list(self.vfm.grid)},
            "parameters_by_part": {name: sum(p.numel() for p in module.parameters())
                                   for name, module in self.named_children()},
        }
        if self.is_discrete:
            info.update(codebook_size=self.config.codebook_size, code_dim=self.config.code_dim)
        else:
            info["latent_shape"] = list(self.latent_shape)
        return info
