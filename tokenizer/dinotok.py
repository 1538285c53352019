"""DINO-Tok: a grid tokenizer on hierarchically fused frozen-DINO features, with global PCA reweighting before VQ
(REFERENCE.md section 2; the paper publishes no code, so the paper is the specification and the choices it leaves open
are ours, listed below).

Data flow::

    images in [-1, 1] -> frozen VFM -> feature maps of shallow and deep blocks (same patch grid)
      -> fusion: per-level LayerNorm, channel concatenation, Linear to ``fusion_dim``, GELU, ``fusion_depth``
         transformer layers, Linear to ``latent_channels``                       -> latent z (C, g, g), 16x down
      AE:  z is the continuous latent (what a flow denoiser models)
      VQ:  y = ((z - mean) @ U[:, :K]) * lambda[:K] ** (-power / 2)       (PCA rotation + reweighting, K = pca_rank)
           y split into ``num_codebooks`` equal chunks, each quantized by its own codebook
           z_hat = (y_q * lambda[:K] ** (power / 2)) @ U[:, :K].T + mean  (inverted before the decoder)
      -> decoder: Linear to ``decoder_dim`` + positions, transformer, LayerNorm, CNN pixel decoder (16x) -> image

Design choices the paper leaves open (ours):

* **Fusion.** The paper fuses shallow (texture, colour) and deep (semantic) DINO features into an 832-channel latent
  at 16x downsampling. We concatenate the LayerNorm-ed patch tokens of ``vfm.feature_layers`` (e.g. blocks 3, 6, 9,
  12 of DINOv2-B/14) and project them; the paper presets take DINOv2-B/14 with registers at 224 px (16 x 16 patches
  for 256 px images), so 832 = 768 (the VFM width) + 64, a plausible reading of the paper's figure that our
  projection does not rely on.
* **PCA statistics** (mean, principal directions U sorted by decreasing variance, variances lambda) are buffers of
  the model (``pca_mean``, ``pca_components``, ``pca_variances``, ``pca_num_samples``; saved with the weights). They
  start as the identity transform (mean 0, U = I, lambda = 1, no samples) and are set by ``vfmtok pca-stats``, which
  streams the model's pre-quantization latent over a dataset in float64 (:class:`LatentMoments`, Chan et al.'s
  pairwise update, sharded across processes and merged). ``pca_power`` 1 whitens (every principal direction gets
  unit variance: no dimension dominates the distances), 0 only rotates; ``pca_rank`` K < C quantizes only the
  dominant K-dimensional subspace (the paper's later "dominant-subspace quantization"), the other components are
  replaced by their mean (0 in PCA space) before the decoder. With K = C the transform is exactly invertible.
* **Recipe.** The statistics describe a fixed encoder, so the VQ preset is trained from an AE: train
  ``dinotok-ae.yaml``; ``vfmtok pca-stats --tokenizer AE --data D --output-dir S``; then train ``dinotok-vq.yaml``
  with ``--init-from S`` (the fusion encoder and decoder start from the AE, the fusion stays frozen with
  ``train_encoder: false`` so the statistics stay exact; codebooks and decoder train).
* **Two codebooks, code layout.** With ``num_codebooks = 2`` the first codebook quantizes the leading principal
  components (coarse), the second the remaining ones. Every grid cell holds one code of each codebook next to each
  other (the interface's layout, :mod:`vfmtok.tokenizer.interface`): token ``2 p`` is cell ``p``'s code of codebook 0,
  token ``2 p + 1`` its code of codebook 1 offset by ``codebook_size``. An AR model predicts the coarse code of a
  cell, then its fine code; vocabulary ``2 x codebook_size``, sequence length ``2 g^2``.
* **Codebooks** are Euclidean (not l2-normalised: the norm carries information in the whitened space), initialised
  with unit-variance Gaussian vectors (the scale of whitened data), trained by gradient with the usual codebook and
  commitment losses (:class:`vfmtok.tokenizer.layers.VectorQuantizer`), straight-through.
* No semantic-reconstruction loss (the paper does not describe one); the decoder sizes follow VFMTok's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from vfmtok.tokenizer.frozen_encoder import FrozenVFMHolderMixin
from vfmtok.tokenizer.interface import CodeLayout, ImageTokenizerMixin
from vfmtok.tokenizer.layers import PixelDecoder, Transformer, VectorQuantizer
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.frozen import FrozenModulesMixin
from vfmtok.tokenizer.utils.loading import StrictLoadingMixin
from vfmtok.tokenizer.vfm import FrozenVFM, VFMFeatures, resize_images
from vfmtok.tokenizer.vfmtok import _vfm_spec

__all__ = ["DINOTokModel", "DINOTokOutput", "LatentMoments", "FeatureFusion", "GridDecoder"]


# ----------------------------------------------------------------------------------------------------------------------
# Streaming latent statistics
# ----------------------------------------------------------------------------------------------------------------------
class LatentMoments:
    """Count, mean and centred second moment ``M2 = sum (x - mean)(x - mean)^T`` of a stream of vectors, in float64.

    Each batch is centred on its own mean before its outer products are summed, and batches (or the moments of other
    processes) are merged with the pairwise update of Chan, Golub and LeVeque, which avoids the cancellation of the
    naive ``E[x x^T] - mean mean^T``.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, vectors: torch.Tensor) -> None:
        """Add a batch of vectors (N, dim)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InvalidValueError(f"expected vectors of shape (N, {self.dim}), got {tuple(vectors.shape)}")
        if len(vectors) == 0:
            return
        x = vectors.detach().to(device="cpu", dtype=torch.float64)
        mean = x.mean(0)
        centred = x - mean
        self._merge(len(x), mean, centred.t() @ centred)

    def merge(self, other: LatentMoments) -> None:
        if other.dim != self.dim:
            raise InvalidValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        if other.count:
            self._merge(other.count, other.mean, other.m2)

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def to_tensor(self) -> torch.Tensor:
        """(1 + dim + dim^2,) float64: count, mean, M2 (to gather across processes)."""
        return torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.mean, self.m2.flatten()])

    @classmethod
    def from_tensor(cls, packed: torch.Tensor, dim: int) -> LatentMoments:
        moments = cls(dim)
        packed = packed.to(device="cpu", dtype=torch.float64)
        moments.count = int(round(float(packed[0])))
        moments.mean = packed[1:1 + dim].clone()
        moments.m2 = packed[1 + dim:].reshape(dim, dim).clone()
        return moments

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance (dim, dim), float64."""
        if self.count < 2:
            raise InvalidValueError(f"a covariance needs at least 2 vectors, got {self.count}")
        return self.m2 / (self.count - 1)

    def principal_directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(variances (dim,) descending, components (dim, dim) with the principal directions as columns), float64.
        Each direction's sign is fixed (its largest-magnitude entry positive) so that the result is deterministic."""
        covariance = self.covariance()
        if not torch.isfinite(covariance).all():
            raise InvalidValueError(f"the latent's covariance over {self.count} vectors holds NaN or infinite values "
                                    "(a degenerate or diverged encoder): no principal directions")
        try:
            variances, vectors = torch.linalg.eigh(covariance)
        except torch.linalg.LinAlgError as error:
            raise InvalidValueError(f"the latent's covariance over {self.count} vectors has no eigendecomposition "
                                    f"(a degenerate latent): {error}") from None
        variances, vectors = variances.flip(0).clamp_min(0.0), vectors.flip(1)
        largest = vectors.abs().argmax(0)
        signs = torch.sign(vectors[largest, torch.arange(self.dim)])
        signs[signs == 0] = 1.0
        return variances, vectors * signs


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
class FeatureFusion(nn.Module):
    """Shallow + deep VFM levels -> a grid latent: LayerNorm per level, concatenation, Linear, GELU, transformer
    layers (with learned positions), Linear to the latent width."""

    def __init__(self, vfm_dim: int, num_levels: int, dim: int, depth: int, num_heads: int, ffn_dim: int,
                 num_positions: int, latent_channels: int):
        super().__init__()
        self.level_norms = nn.ModuleList(nn.LayerNorm(vfm_dim) for _ in range(num_levels))
        self.proj_in = nn.Linear(num_levels * vfm_dim, dim)
        self.position = nn.Parameter(torch.randn(1, num_positions, dim) * dim ** -0.5)
        self.transformer = Transformer(dim, depth, num_heads, ffn_dim, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, latent_channels)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """levels: per level (B, N, vfm_dim) -> (B, N, latent_channels)."""
        x = torch.cat([norm(level) for norm, level in zip(self.level_norms, levels)], dim=-1)
        x = F.gelu(self.proj_in(x)) + self.position
        return self.proj_out(self.norm(self.transformer(x, causal=False)))


class GridDecoder(nn.Module):
    """A grid of latent vectors -> image: Linear + positions, pre-norm transformer, LayerNorm, CNN pixel decoder."""

    def __init__(self, latent_channels: int, dim: int, depth: int, num_heads: int, ffn_dim: int, grid: int,
                 pixel_channels: int, pixel_channel_mult: Sequence[int], pixel_res_blocks: int):
        super().__init__()
        self.grid = grid
        self.proj_in = nn.Linear(latent_channels, dim)
        self.position = nn.Parameter(torch.randn(1, grid * grid, dim) * dim ** -0.5)
        self.transformer = Transformer(dim, depth, num_heads, ffn_dim, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.pixel_decoder = PixelDecoder(dim, pixel_channels, pixel_channel_mult, pixel_res_blocks)

    def forward(self, latent_tokens: torch.Tensor) -> torch.Tensor:
        """(B, g*g, latent_channels) -> images (B, 3, 16 g, 16 g), not clamped."""
        x = self.transformer(self.proj_in(latent_tokens) + self.position, causal=False)
        x = self.norm(x)
        feature_map = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return self.pixel_decoder(feature_map)


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class DINOTokOutput(BaseOutput):
    """Training forward of :class:`DINOTokModel`.

    reconstruction / target: decoded images (not clamped) and the input resized to ``image_size``.
    tokens: codes (B, num_tokens) (VQ) or the latent (B, C, g, g) (AE).
    latent: the pre-quantization latent (B, g*g, C).
    losses: ``pixel_l2`` (MSE) and, for VQ, ``codebook`` and ``commitment`` (summed over the codebooks; the
        commitment includes beta).
    codebook_usage: mean over the codebooks of the fraction of codes used in the rolling window (VQ only).
    """

    reconstruction: torch.Tensor = None
    target: torch.Tensor = None
    tokens: torch.Tensor = None
    latent: torch.Tensor = None
    losses: dict = None
    codebook_usage: Optional[float] = None


class DINOTokModel(FrozenVFMHolderMixin, StrictLoadingMixin, FrozenModulesMixin, ImageTokenizerMixin, ModelMixin,
                   ConfigMixin):
    """DINO-Tok autoencoder (``bottleneck="continuous"``) and VQ tokenizer (``bottleneck="vq"``); see the module
    docstring. ``encode`` -> codes (B, num_codebooks * g^2) or latents (B, C, g, g); ``decode`` -> images."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vfm: dict,
        image_size: int = 256,
        bottleneck: str = "vq",
        fusion_dim: int = 768,
        fusion_depth: int = 2,
        fusion_heads: int = 12,
        fusion_ffn_dim: int = 2048,
        latent_channels: int = 832,
        train_encoder: bool = True,
        num_codebooks: int = 2,
        codebook_size: int = 16384,
        commitment_beta: float = 0.25,
        usage_window: int = 65536,
        pca_rank: Optional[int] = None,
        pca_power: float = 1.0,
        pca_eps: float = 1e-6,
        decoder_dim: int = 512,
        decoder_depth: int = 6,
        decoder_heads: int = 8,
        decoder_ffn_dim: int = 1368,
        pixel_channels: int = 128,
        pixel_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        pixel_res_blocks: int = 2,
    ):
        super().__init__()
        if bottleneck not in ("vq", "continuous"):
            raise InvalidValueError(f"bottleneck must be 'vq' or 'continuous', got {bottleneck!r}")
        factor = 2 ** (len(pixel_channel_mult) - 1)
        if image_size % factor:
            raise InvalidValueError(f"image_size ({image_size}) must be a multiple of the decoder's upsampling "
                                    f"({factor}, from pixel_channel_mult={list(pixel_channel_mult)})")
        if pixel_channels % 32:
            raise InvalidValueError(f"pixel_channels ({pixel_channels}) must be a multiple of 32 (GroupNorm)")
        rank = latent_channels if pca_rank is None else pca_rank
        if not 1 <= rank <= latent_channels:
            raise InvalidValueError(f"pca_rank must be in [1, latent_channels={latent_channels}], got {pca_rank}")
        if num_codebooks < 1 or rank % num_codebooks:
            raise InvalidValueError(f"the quantized dimensions (pca_rank or latent_channels = {rank}) must split "
                                    f"evenly into num_codebooks ({num_codebooks})")
        if not math.isfinite(pca_power) or pca_power < 0 or not pca_eps > 0:
            raise InvalidValueError(f"pca_power must be >= 0 and pca_eps > 0, got {pca_power} and {pca_eps}")
        spec = _vfm_spec(vfm)
        self.hold_vfm(FrozenVFM(**spec))
        grid = self.vfm.grid
        if grid[0] != grid[1] or grid[0] * factor != image_size:
            raise InvalidValueError(
                f"the VFM patch grid {list(grid)} must be square with {factor} x its side = image_size "
                f"({image_size}): a grid latent at {factor}x downsampling (e.g. 224 px DINOv2/14 for 256 px images)")
        self.grid = grid[0]
        self.rank = rank
        num_levels = len(self.vfm.feature_layers)
        self.fusion = FeatureFusion(self.vfm.hidden_size, num_levels, fusion_dim, fusion_depth, fusion_heads,
                                    fusion_ffn_dim, self.grid ** 2, latent_channels)
        if not train_encoder:
            self.fusion.requires_grad_(False)
        # PCA statistics of the latent: identity until `vfmtok pca-stats` sets them (see the module docstring).
        self.register_buffer("pca_mean", torch.zeros(latent_channels))
        self.register_buffer("pca_components", torch.eye(latent_channels))
        self.register_buffer("pca_variances", torch.ones(latent_channels))
        self.register_buffer("pca_num_samples", torch.zeros((), dtype=torch.int64))
        if bottleneck == "vq":
            self.quantizers = nn.ModuleList(
                VectorQuantizer(codebook_size, rank // num_codebooks, commitment_beta, l2_normalize=False,
                                usage_window=usage_window) for _ in range(num_codebooks))
            with torch.no_grad():
                for quantizer in self.quantizers:  # unit scale: the scale of whitened latents
                    quantizer.embedding.weight.normal_()
        self.decoder = GridDecoder(latent_channels, decoder_dim, decoder_depth, decoder_heads, decoder_ffn_dim,
                                   self.grid, pixel_channels, pixel_channel_mult, pixel_res_blocks)

    # -- the tokenizer interface ----------------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return self.config.bottleneck == "vq"

    @property
    def code_layout(self) -> CodeLayout:
        if not self.is_discrete:
            raise InvalidValueError("a continuous tokenizer has no code layout; use latent_shape")
        return CodeLayout(grid=(self.grid, self.grid),
                          codebook_sizes=(self.config.codebook_size,) * self.config.num_codebooks)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, self.grid, self.grid)

    @property
    def input_size(self) -> int:
        return self.config.image_size

    @property
    def output_size(self) -> int:
        return self.config.image_size

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        return self.decoder.pixel_decoder.last_layer

    def codebook_usage(self) -> Optional[float]:
        if not self.is_discrete:
            return None
        return sum(q.usage() for q in self.quantizers) / len(self.quantizers)

    # -- PCA reweighting ------------------------------------------------------------------------------------------
    @property
    def pca_fitted(self) -> bool:
        return int(self.pca_num_samples) > 0

    def set_pca_statistics(self, moments: LatentMoments) -> None:
        """Store the mean, principal directions and variances of ``moments`` (of this model's latent)."""
        if moments.dim != self.config.latent_channels:
            raise InvalidValueError(f"statistics of dimension {moments.dim} for a latent of "
                                    f"{self.config.latent_channels} channels")
        variances, components = moments.principal_directions()
        with torch.no_grad():
            self.pca_mean.copy_(moments.mean.to(self.pca_mean))
            self.pca_components.copy_(components.to(self.pca_components))
            self.pca_variances.copy_(variances.to(self.pca_variances))
            self.pca_num_samples.fill_(moments.count)

    def _pca_scale(self) -> torch.Tensor:
        """Per-component weight lambda ** (-power / 2) of the first ``rank`` components."""
        return (self.pca_variances[:self.rank] + self.config.pca_eps) ** (-0.5 * self.config.pca_power)

    def to_pca_space(self, latent: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., rank): centred, rotated onto the principal directions, reweighted."""
        components = self.pca_components[:, :self.rank].to(latent.dtype)
        return ((latent - self.pca_mean.to(latent.dtype)) @ components) * self._pca_scale().to(latent.dtype)

    def from_pca_space(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_pca_space` (exact when rank = C; else the dropped components are their mean)."""
        components = self.pca_components[:, :self.rank].to(y.dtype)
        return (y / self._pca_scale().to(y.dtype)) @ components.t() + self.pca_mean.to(y.dtype)

    # -- encoding -------------------------------------------------------------------------------------------------
    def latent_tokens(self, images: torch.Tensor, vfm_features: Optional[VFMFeatures] = None) -> torch.Tensor:
        """Images -> the pre-quantization latent (B, g*g, C). ``vfm_features``: precomputed VFM features."""
        features = self.vfm(images) if vfm_features is None else vfm_features
        if len(features.levels) != len(self.vfm.feature_layers) or tuple(features.grid) != tuple(self.vfm.grid):
            raise InvalidValueError(f"VFM features with {len(features.levels)} levels on {features.grid}; this model "
                                    f"expects {len(self.vfm.feature_layers)} levels on {self.vfm.grid}")
        return self.fusion(features.levels)

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(B, N, C) latent -> (quantized latent back in latent space (B, N, C), codes (B, N * K), losses).
        The PCA transform and the quantization run in fp32, also under autocast."""
        with torch.autocast(device_type=latent.device.type, enabled=False):
            return self._quantize(latent.float())

    def _quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        y = self.to_pca_space(latent)
        chunks = y.chunk(len(self.quantizers), dim=-1)
        quantized, indices, losses = [], [], {"codebook": 0.0, "commitment": 0.0}
        for quantizer, chunk in zip(self.quantizers, chunks):
            z_q, idx, terms = quantizer(chunk)
            quantized.append(z_q)
            indices.append(idx)
            losses["codebook"] = losses["codebook"] + terms["codebook"]
            losses["commitment"] = losses["commitment"] + terms["commitment"]
        return self.from_pca_space(torch.cat(quantized, dim=-1)), self._interleave(indices), losses

    def _interleave(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-codebook indices (B, N) -> codes (B, N * K): cell p's K codes side by side, offset per codebook."""
        offsets = [k * self.config.codebook_size for k in range(len(indices))]
        return torch.stack([idx + off for idx, off in zip(indices, offsets)], dim=-1).flatten(1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N * K) -> the quantized latent (B, N, C)."""
        self.check_tokens(codes)
        k = self.config.num_codebooks
        per_cell = codes.reshape(codes.shape[0], -1, k)
        parts = [quantizer.lookup(per_cell[..., i] - i * self.config.codebook_size)
                 for i, quantizer in enumerate(self.quantizers)]
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self.from_pca_space(torch.cat(parts, dim=-1).float())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, num_tokens) (VQ) or latents (B, C, g, g) (AE)."""
        latent = self.latent_tokens(images)
        if self.is_discrete:
            return self.quantize(latent)[1]
        return latent.transpose(1, 2).reshape(latent.shape[0], -1, self.grid, self.grid)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, output_size: Optional[int] = None, antialias: bool = True) -> torch.Tensor:
        """Codes (B, num_tokens) or latents (B, C, g, g) -> images (B, 3, S, S) in [-1, 1]."""
        if self.is_discrete:
            latent = self.codes_to_latent(tokens)
        else:
            self.check_tokens(tokens)
            latent = tokens.flatten(2).transpose(1, 2)
        images = self.decoder(latent.to(self.decoder.proj_in.weight.dtype))
        if output_size is not None:
            images = resize_images(images, output_size, antialias)
        return images.clamp(-1, 1)

    # -- training forward -----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, vfm_features: Optional[VFMFeatures] = None) -> DINOTokOutput:
        """Reconstruct ``images`` and compute the model's loss terms (see :class:`DINOTokOutput`)."""
        latent = self.latent_tokens(images, vfm_features)
        losses: dict[str, torch.Tensor] = {}
        if self.is_discrete:
            decoder_input, tokens, losses = self.quantize(latent)
        else:
            decoder_input = latent
            tokens = latent.transpose(1, 2).reshape(latent.shape[0], -1, self.grid, self.grid)
        reconstruction = self.decoder(decoder_input.to(latent.dtype))
        target = resize_images(images, reconstruction.shape[-1]).to(reconstruction.dtype)
        losses = dict(losses)
        losses["pixel_l2"] = F.mse_loss(reconstruction.float(), target.float())
        return DINOTokOutput(reconstruction=reconstruction, target=target, tokens=tokens, latent=latent,
                             losses=losses, codebook_usage=self.codebook_usage())

    # -- reporting ------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Facts for ``vfmtok describe``: parameter split, token layout, latent shape."""
        info: dict[str, Any] = {
            "model": type(self).__name__,
            **self.tokenizer_summary(),
            "bottleneck": self.config.bottleneck,
            "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in self.parameters()),
            "frozen_params": sum(p.numel() for p in self.vfm.parameters()),
            "num_tokens": self.num_tokens,
            "image_size": self.config.image_size,
            "latent_shape": list(self.latent_shape),
            "vfm": {"backend": self.vfm.backend, "hidden_size": self.vfm.hidden_size, "grid": list(self.vfm.grid),
                    "feature_layers": list(self.vfm.feature_layers)},
            "parameters_by_part": {name: sum(p.numel() for p in module.parameters())
                                   for name, module in self.named_children()},
            "pca": {"rank": self.rank, "power": self.config.pca_power, "fitted": self.pca_fitted,
                    "num_samples": int(self.pca_num_samples)},
        }
        if self.is_discrete:
            info.update(codebook_size=self.config.codebook_size, num_codebooks=self.config.num_codebooks,
                        code_dim=self.rank // self.config.num_codebooks)
        return info
