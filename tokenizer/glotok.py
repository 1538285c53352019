"""GloTok: a conv tokenizer with dual semantic and visual codebooks, a codebook-wise histogram relation loss to a
pretrained model's feature geometry, and residual refinement (REFERENCE.md section 3; the paper publishes no code, so
the paper is the specification and the choices it leaves open are ours, listed below).

Data flow::

    images in [-1, 1] -> VQGAN-style conv encoder (trained from scratch, 16x down)   [or: frozen VFM, our variant]
      -> semantic adapter -> z_s (8, g, g) -> semantic codebook (4096 x 8)  -> q_s -> q_s + R_s(q_s)
      -> visual adapter   -> z_v (8, g, g) -> visual codebook (12288 x 8)   -> q_v -> q_v + R_v(q_v)
      -> concatenate along channels (16, g, g) -> VQGAN-style CNN decoder (16x up) -> image

Losses (the model's own terms, weighted in :class:`vfmtok.tokenizer.losses.TokenizerLoss`): codebook + commitment of both
quantizers; residual refinement ``refinement = sum over streams mean((sg(z) - q - R(q))^2)`` (paper weight 0.5);
the histogram relation loss ``KL(H(teacher) || H(semantic codebook))`` (paper weight 0.01), computed by the loss
from ``GloTokOutput.semantic_codebook`` and a teacher file (``loss.histogram_teacher``, built by
``vfmtok glotok-teacher``), so no image passes through the pretrained model during tokenizer training.

Design choices the paper leaves open (ours):

* **Encoder / decoder**: LlamaGen's VQ-16 layout (ch 128, mult [1, 1, 2, 2, 4], 2 ResBlocks per level, attention in
  the middle block), encoder width ``encoder_dim`` = 256. The decoder is the suite's CNN pixel decoder
  (:class:`vfmtok.tokenizer.layers.PixelDecoder`, the same as VFMTok's) on the 16 concatenated code channels.
* **Adapters**: per stream a ResBlock at the encoder width, GroupNorm, SiLU and a 1x1 conv to the code dim (8).
* **Quantizers**: l2-normalised codebooks (LlamaGen), gradient-trained, straight-through.
* **Residual refinement** ``R``: Linear(8 -> 256) + learned positions, one pre-norm transformer layer over the grid,
  LayerNorm, Linear(256 -> 8) initialised to zero (the block starts as the identity). It reads only the looked-up
  code vectors, so the refined features, hence the decoded image, are a function of the code indices alone. The
  decoder input is ``q + R(q)`` plus the encoder's straight-through gradient (``z - sg(z)``): the reconstruction
  loss trains R, the codebooks and (through the straight-through path) the encoder.
* **Histogram relation loss** (:func:`similarity_histogram`, :func:`histogram_relation_loss`): the pairwise cosine
  similarities ``i <= j`` of a set of vectors, soft-binned into 40 bins on [-1, 1] (centres ``-1 + (m + 1/2) w``,
  ``w = 2 / 40``) with the kernel ``exp(-a (d - b)^2)``, ``a = 1 / (2 w^2)`` by default (a Gaussian of one bin width),
  summed and normalised. It is computed in row blocks (each block's contribution recomputed in the backward pass),
  so a 16384-entry codebook needs memory of one block, never the 16384^2 similarity matrix.
* **Teacher**: k-means centroids (scikit-learn's MiniBatchKMeans, fed in chunks as features stream in) of the
  frozen VFM's last-layer patch features over a dataset, or the codebook of a trained tokenizer.
* **Code layout**: two codes per grid cell, semantic first, visual second offset by the semantic codebook size
  (:mod:`vfmtok.tokenizer.interface`): vocabulary 4096 + 12288 = 16384, sequence length 2 g^2.
* ``encoder_type="vfm"`` (our variant): the frozen VFM's last-layer patch tokens, Linear to ``encoder_dim``, replace the
  conv encoder; the VFM grid must then be ``image_size / 16``. With ``encoder_type="conv"`` the ``vfm`` spec, if given,
  only names the teacher's model for ``vfmtok glotok-teacher`` and no VFM is built.
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
from torch.utils.checkpoint import checkpoint

from vfmtok.tokenizer.frozen_encoder import FrozenVFMHolderMixin
from vfmtok.tokenizer.interface import CodeLayout, ImageTokenizerMixin
from vfmtok.tokenizer.layers import AttnBlock, PixelDecoder, ResnetBlock, TransformerLayer, VectorQuantizer
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.frozen import FrozenModulesMixin
from vfmtok.tokenizer.utils.loading import StrictLoadingMixin
from vfmtok.tokenizer.vfm import FrozenVFM, VFMFeatures, resize_images
from vfmtok.tokenizer.vfmtok import _vfm_spec

__all__ = ["GloTokModel", "GloTokOutput", "ConvEncoder", "StreamAdapter", "ResidualRefiner", "similarity_histogram",
           "histogram_relation_loss", "histogram_bin_centres", "default_sharpness", "StreamingKMeans"]

ENCODERS = ("conv", "vfm")


# ----------------------------------------------------------------------------------------------------------------------
# Histogram relation loss
# ----------------------------------------------------------------------------------------------------------------------
def histogram_bin_centres(bins: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of ``bins`` equal bins on [-1, 1]."""
    width = 2.0 / bins
    return -1.0 + width * (torch.arange(bins, device=device, dtype=dtype) + 0.5)


def default_sharpness(bins: int) -> float:
    """``a = 1 / (2 w^2)``: a Gaussian kernel whose standard deviation is one bin width ``w = 2 / bins``."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise InvalidValueError(f"bins must be a whole number >= 1, got {bins!r}")
    return 1.0 / (2.0 * (2.0 / bins) ** 2)


def _block_counts(rows: torch.Tensor, columns: torch.Tensor, row_start: int, centres: torch.Tensor,
                  sharpness: float) -> torch.Tensor:
    """Soft counts (bins,) of the similarities between ``rows`` (indices row_start...) and ``columns`` (indices
    row_start... too), pairs with column index >= row index only."""
    sims = rows @ columns.t()  # (R, M): pair (row_start + r, row_start + c)
    r = torch.arange(rows.shape[0], device=rows.device)[:, None]
    c = torch.arange(columns.shape[0], device=rows.device)[None, :]
    keep = (c >= r).to(sims.dtype)
    weights = torch.exp(-sharpness * (sims[..., None] - centres) ** 2)  # (R, M, bins)
    return (weights * keep[..., None]).sum(dim=(0, 1))


def similarity_histogram(vectors: torch.Tensor, bins: int = 40, sharpness: Optional[float] = None,
                         block_elements: Optional[int] = 1 << 24) -> torch.Tensor:
    """Normalised soft histogram (bins,) of the pairwise cosine similarities ``i <= j`` of ``vectors`` (N, D).

    ``block_elements``: the largest number of (pair, bin) values held at once; rows are processed in blocks of
    ``block_elements // (N * bins)`` and, when gradients are needed, each block is recomputed in the backward pass
    (activation checkpointing). None: one dense block. Differentiable with respect to ``vectors``.
    """
    if vectors.ndim != 2 or len(vectors) < 1:
        raise InvalidValueError(f"expected a non-empty set of vectors (N, D), got shape {tuple(vectors.shape)}")
    if bins < 1:
        raise InvalidValueError(f"bins must be >= 1, got {bins}")
    sharpness = default_sharpness(bins) if sharpness is None else float(sharpness)
    with torch.autocast(device_type=vectors.device.type, enabled=False):  # similarities in fp32 (or fp64)
        return _similarity_histogram(vectors, bins, sharpness, block_elements)


def _similarity_histogram(vectors: torch.Tensor, bins: int, sharpness: float,
                          block_elements: Optional[int]) -> torch.Tensor:
    x = F.normalize(vectors.float() if vectors.dtype != torch.float64 else vectors, dim=-1)
    centres = histogram_bin_centres(bins, device=x.device, dtype=x.dtype)
    n = len(x)
    if block_elements is None:
        counts = _block_counts(x, x, 0, centres, sharpness)
    else:
        step = max(1, int(block_elements) // (n * bins))
        counts = x.new_zeros(bins)
        for start in range(0, n, step):
            rows, columns = x[start:start + step], x[start:]
            if torch.is_grad_enabled() and x.requires_grad:
                counts = counts + checkpoint(_block_counts, rows, columns, start, centres, sharpness,
                                             use_reentrant=False)
            else:
                counts = counts + _block_counts(rows, columns, start, centres, sharpness)
    return counts / counts.sum()


def histogram_relation_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``KL(teacher || student) = sum t (log t - log s)`` of two normalised histograms; the teacher is detached."""
    if student.shape != teacher.shape:
        raise InvalidValueError(f"histograms of different bins: the student's has {student.shape[-1]} bins, the "
                                f"teacher's {teacher.shape[-1]} bins")
    teacher = teacher.detach().to(student.dtype)
    return (teacher * (torch.log(teacher + eps) - torch.log(student + eps))).sum()


class StreamingKMeans:
    """k-means centroids of a stream of feature batches: scikit-learn's ``MiniBatchKMeans.partial_fit`` on chunks
    of at least ``chunk_size`` (>= 3 * clusters) vectors, buffered as batches arrive; deterministic for a seed."""

    def __init__(self, clusters: int, seed: int = 0, chunk_size: Optional[int] = None):
        from sklearn.cluster import MiniBatchKMeans

        if clusters < 2:
            raise InvalidValueError(f"k-means needs at least 2 clusters, got {clusters}")
        self.clusters = clusters
        self.chunk_size = max(chunk_size or 0, 3 * clusters, 1024)
        self.kmeans = MiniBatchKMeans(n_clusters=clusters, random_state=seed, batch_size=self.chunk_size,
                                      n_init=1)
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self.seen = 0
        self._fitted = False

    def update(self, features: torch.Tensor) -> None:
        """Add feature vectors (N, D)."""
        self._buffer.append(features.detach().to(device="cpu", dtype=torch.float32).reshape(-1, features.shape[-1]))
        self._buffered += len(self._buffer[-1])
        self.seen += len(self._buffer[-1])
        if self._buffered >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        chunk = torch.cat(self._buffer).numpy()
        self._buffer, self._buffered = [], 0
        if not self._fitted and len(chunk) < self.clusters:
            raise InvalidValueError(f"k-means with {self.clusters} clusters needs at least as many feature vectors; "
                                    f"got {len(chunk)} (use more images or fewer clusters)")
        self.kmeans.partial_fit(chunk)
        self._fitted = True

    def centroids(self) -> torch.Tensor:
        self._flush()
        if not self._fitted:  # nothing was added (e.g. every image of the data unreadable)
            raise InvalidValueError(f"k-means with {self.clusters} clusters got no feature vectors (were all images "
                                    "unreadable?)")
        return torch.from_numpy(self.kmeans.cluster_centers_.copy()).float()


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
class Downsample(nn.Module):
    """Stride-2 3x3 convolution with taming's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ConvEncoder(nn.Module):
    """VQGAN / LlamaGen CNN encoder: conv_in -> per level ``num_res_blocks`` ResBlocks (+ 2x down) -> (res, attn,
    res) -> GroupNorm, SiLU, conv_out to ``out_channels``."""

    def __init__(self, channels: int, channel_mult: Sequence[int], num_res_blocks: int, out_channels: int,
                 in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.levels = nn.ModuleList()
        block_in = channels
        for level, mult in enumerate(channel_mult):
            block = nn.Module()
            block.res = nn.ModuleList()
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(block_in, channels * mult))
                block_in = channels * mult
            if level != len(channel_mult) - 1:
                block.downsample = Downsample(block_in)
            self.levels.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.norm_out = nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.levels:
            for res in block.res:
                h = res(h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class StreamAdapter(nn.Module):
    """Encoder features (B, C, g, g) -> one stream's pre-quantization vectors (B, code_dim, g, g)."""

    def __init__(self, channels: int, code_dim: int):
        super().__init__()
        self.block = ResnetBlock(channels, channels)
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj = nn.Conv2d(channels, code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.norm(self.block(x))))


class ResidualRefiner(nn.Module):
    """``R`` of the residual refinement: code vectors (B, N, code_dim) -> a correction of the same shape (one
    transformer layer over the grid); zero at initialisation."""

    def __init__(self, code_dim: int, dim: int, num_heads: int, ffn_dim: int, num_positions: int):
        super().__init__()
        self.proj_in = nn.Linear(code_dim, dim)
        self.position = nn.Parameter(torch.randn(1, num_positions, dim) * dim ** -0.5)
        self.layer = TransformerLayer(dim, num_heads, ffn_dim, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, code_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.layer(self.proj_in(codes) + self.position, causal=False)
        return self.proj_out(self.norm(x))


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class GloTokOutput(BaseOutput):
    """Training forward of :class:`GloTokModel`.

    reconstruction / target: decoded images (not clamped) and the input resized to ``image_size``.
    tokens: codes (B, num_tokens) in the layout of :attr:`GloTokModel.code_layout`.
    semantic_codebook: the semantic codebook (K_s, code_dim), differentiable: the histogram relation loss's student.
    losses: ``pixel_l2``, ``codebook`` and ``commitment`` (both streams; commitment includes beta) and
        ``refinement`` (both streams; absent with ``refinement=False``).
    codebook_usage: mean over the two codebooks of the fraction of codes used in the rolling window.
    """

    reconstruction: torch.Tensor = None
    target: torch.Tensor = None
    tokens: torch.Tensor = None
    semantic_codebook: torch.Tensor = None
    losses: dict = None
    codebook_usage: Optional[float] = None


class GloTokModel(FrozenVFMHolderMixin, StrictLoadingMixin, FrozenModulesMixin, ImageTokenizerMixin, ModelMixin,
                  ConfigMixin):
    """GloTok (see the module docstring): ``encode`` -> codes (B, 2 g^2), ``decode`` -> images in [-1, 1]."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        image_size: int = 256,
        encoder_type: str = "conv",
        vfm: Optional[dict] = None,
        encoder_channels: int = 128,
        encoder_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        encoder_res_blocks: int = 2,
        encoder_dim: int = 256,
        semantic_codebook_size: int = 4096,
        visual_codebook_size: int = 12288,
        code_dim: int = 8,
        commitment_beta: float = 0.25,
        usage_window: int = 65536,
        refinement: bool = True,
        refinement_dim: int = 256,
        refinement_heads: int = 4,
        refinement_ffn_dim: int = 683,
        pixel_channels: int = 128,
        pixel_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        pixel_res_blocks: int = 2,
    ):
        super().__init__()
        if encoder_type not in ENCODERS:
            raise InvalidValueError(f"encoder_type must be one of {list(ENCODERS)}, got {encoder_type!r}")
        factor = 2 ** (len(pixel_channel_mult) - 1)
        if image_size % factor:
            raise InvalidValueError(f"image_size ({image_size}) must be a multiple of the decoder's upsampling "
                                    f"({factor}, from pixel_channel_mult={list(pixel_channel_mult)})")
        for name, value in (("encoder_channels", encoder_channels), ("encoder_dim", encoder_dim),
                            ("pixel_channels", pixel_channels)):
            if value % 32:
                raise InvalidValueError(f"{name} ({value}) must be a multiple of 32 (GroupNorm with 32 groups)")
        self.grid = image_size // factor
        if encoder_type == "vfm":
            if vfm is None:
                raise InvalidValueError("encoder_type='vfm' needs a VFM spec (vfm: {preset: ..., image_size: ...})")
            self.hold_vfm(FrozenVFM(**_vfm_spec(vfm)))
            if tuple(self.vfm.grid) != (self.grid, self.grid):
                raise InvalidValueError(f"with encoder_type='vfm' the VFM patch grid {list(self.vfm.grid)} must be "
                                        f"image_size / {factor} = {self.grid} on each side")
            self.encoder = nn.Linear(self.vfm.hidden_size, encoder_dim)
        else:
            if vfm is not None:
                _vfm_spec(vfm)  # checked: it names the teacher's model
            if 2 ** (len(encoder_channel_mult) - 1) != factor:
                raise InvalidValueError(f"the encoder's downsampling (encoder_channel_mult={list(encoder_channel_mult)})"
                                        f" must match the decoder's ({factor}x)")
            self.hold_vfm(None)
            self.encoder = ConvEncoder(encoder_channels, encoder_channel_mult, encoder_res_blocks, encoder_dim)
        self.semantic_adapter = StreamAdapter(encoder_dim, code_dim)
        self.visual_adapter = StreamAdapter(encoder_dim, code_dim)
        self.semantic_quantizer = VectorQuantizer(semantic_codebook_size, code_dim, commitment_beta,
                                                  usage_window=usage_window)
        self.visual_quantizer = VectorQuantizer(visual_codebook_size, code_dim, commitment_beta,
                                                usage_window=usage_window)
        if refinement:
            self.semantic_refiner = ResidualRefiner(code_dim, refinement_dim, refinement_heads, refinement_ffn_dim,
                                                    self.grid ** 2)
            self.visual_refiner = ResidualRefiner(code_dim, refinement_dim, refinement_heads, refinement_ffn_dim,
                                                  self.grid ** 2)
        self.decoder = PixelDecoder(2 * code_dim, pixel_channels, pixel_channel_mult, pixel_res_blocks)

    # -- the tokenizer interface ----------------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return True

    @property
    def code_layout(self) -> CodeLayout:
        return CodeLayout(grid=(self.grid, self.grid),
                          codebook_sizes=(self.config.semantic_codebook_size, self.config.visual_codebook_size))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (2 * self.config.code_dim, self.grid, self.grid)

    @property
    def input_size(self) -> int:
        return self.config.image_size

    @property
    def output_size(self) -> int:
        return self.config.image_size

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def codebook_usage(self) -> Optional[float]:
        return 0.5 * (self.semantic_quantizer.usage() + self.visual_quantizer.usage())

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _features(self, images: torch.Tensor, vfm_features: Optional[VFMFeatures]) -> torch.Tensor:
        """Encoder output (B, encoder_dim, g, g)."""
        if self.vfm is None:
            if vfm_features is not None:
                raise InvalidValueError("precomputed VFM features were given, but this GloTok has a conv encoder")
            return self.encoder(resize_images(images, self.config.image_size))
        features = self.vfm(images) if vfm_features is None else vfm_features
        x = self.encoder(features.levels[-1])
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def _streams(self, features: torch.Tensor) -> list[tuple[torch.Tensor, VectorQuantizer, Optional[nn.Module]]]:
        """Per stream (semantic, visual): pre-quantization vectors (B, g*g, code_dim), quantizer, refiner."""
        out = []
        for adapter, quantizer, name in ((self.semantic_adapter, self.semantic_quantizer, "semantic"),
                                         (self.visual_adapter, self.visual_quantizer, "visual")):
            z = adapter(features).flatten(2).transpose(1, 2)
            out.append((z, quantizer, getattr(self, f"{name}_refiner", None)))
        return out

    def refine(self, codes: torch.Tensor, refiner: Optional[nn.Module]) -> torch.Tensor:
        """Looked-up code vectors (B, N, code_dim) -> refined ``q + R(q)`` (or ``q`` without refinement)."""
        return codes if refiner is None else codes + refiner(codes)

    def _decode_streams(self, refined: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(refined, dim=-1)  # (B, N, 2 code_dim)
        return self.decoder(x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid))

    def _interleave(self, semantic: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return torch.stack([semantic, visual + self.config.semantic_codebook_size], dim=-1).flatten(1)

    def refined_code_vectors(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Codes (B, 2 g^2) -> the refined vectors of each stream [(B, g^2, code_dim)] * 2, a function of the codes
        only (what the decoder receives)."""
        self.check_tokens(codes)
        per_cell = codes.reshape(codes.shape[0], -1, 2)
        semantic = self.semantic_quantizer.lookup(per_cell[..., 0])
        visual = self.visual_quantizer.lookup(per_cell[..., 1] - self.config.semantic_codebook_size)
        return [self.refine(semantic, getattr(self, "semantic_refiner", None)),
                self.refine(visual, getattr(self, "visual_refiner", None))]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, 2 g^2)."""
        indices = [quantizer(z)[1] for z, quantizer, _ in self._streams(self._features(images, None))]
        return self._interleave(*indices)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, output_size: Optional[int] = None, antialias: bool = True) -> torch.Tensor:
        """Codes (B, 2 g^2) -> images (B, 3, S, S) in [-1, 1]."""
        images = self._decode_streams(self.refined_code_vectors(tokens))
        if output_size is not None:
            images = resize_images(images, output_size, antialias)
        return images.clamp(-1, 1)

    # -- training forward -----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, vfm_features: Optional[VFMFeatures] = None) -> GloTokOutput:
        """Reconstruct ``images`` and compute the model's loss terms (see :class:`GloTokOutput`)."""
        streams = self._streams(self._features(images, vfm_features))
        losses: dict[str, torch.Tensor] = {}
        decoder_inputs, indices = [], []
        for z, quantizer, refiner in streams:
            z_st, idx, terms = quantizer(z)  # z_st: the l2-normalised z with the straight-through gradient
            for name, value in terms.items():
                losses[name] = losses.get(name, 0.0) + value
            refined = self.refine(quantizer.lookup(idx), refiner)
            if refiner is not None:
                target = F.normalize(z.float(), dim=-1).detach()
                losses["refinement"] = losses.get("refinement", 0.0) + F.mse_loss(refined, target)
            decoder_inputs.append(refined + (z_st - z_st.detach()))  # value: refined codes; gradient: also to z
            indices.append(idx)
        reconstruction = self._decode_streams([x.to(images.dtype) for x in decoder_inputs])
        target = resize_images(images, reconstruction.shape[-1]).to(reconstruction.dtype)
        losses["pixel_l2"] = F.mse_loss(reconstruction.float(), target.float())
        return GloTokOutput(reconstruction=reconstruction, target=target, tokens=self._interleave(*indices),
                            semantic_codebook=self.semantic_quantizer.codebook(), losses=losses,
                            codebook_usage=self.codebook_usage())

    # -- reporting ------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Facts for ``vfmtok describe``: parameter split, code layout, latent (code grid) shape."""
        frozen = 0 if self.vfm is None else sum(p.numel() for p in self.vfm.parameters())
        info: dict[str, Any] = {
            "model": type(self).__name__,
            **self.tokenizer_summary(),
            "encoder_type": self.config.encoder_type,
            "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "frozen_params": frozen,
            "num_tokens": self.num_tokens,
            "image_size": self.config.image_size,
            "latent_shape": list(self.latent_shape),
            "codebooks": {"semantic": [self.config.semantic_codebook_size, self.config.code_dim],
                          "visual": [self.config.visual_codebook_size, self.config.code_dim]},
            "parameters_by_part": {name: sum(p.numel() for p in module.parameters())
                                   for name, module in self.named_children()},
        }
        return info
