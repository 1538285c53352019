"""Class-conditional diffusion / flow transformer over continuous tokenizer latents (DiT: Peebles & Xie 2023,
facebookresearch/DiT; SiT: Ma et al. 2024, willisma/SiT).

One class covers DiT / SiT, LightningDiT and DiT^DH (RAE / VFMTok2's ``DiTwDDTHead``):

* **Trunk** (DiT / SiT). The latent (B, C, H, W) is cut into ``patch_size x patch_size`` patches by a strided conv
  (``x_embedder``), plus an optional fixed 2D sin-cos position embedding (``pos_embed="sincos"``, DiT's layout: the
  first half of the channels encodes the column, the second half the row). Conditioning ``c = t_emb + y_emb``:
  ``t_emb`` = MLP(sinusoidal(``time_embedding_scale * t``, 256 frequencies)), ``y_emb`` = a row of ``class_embedding``
  (``num_classes + 1`` rows, the last the null class). Each block is adaLN-Zero:
  ``shift/scale/gate (attention, MLP) = Linear(SiLU(c))``, ``x += gate * attn(norm(x) * (1 + scale) + shift)``, the
  same for the MLP. The modulation layers and the final layer start at zero, so the model outputs exactly 0 at init.
* **LightningDiT options**: ``norm`` (``"layernorm"``: no affine, eps 1e-6, as DiT; ``"rmsnorm"``: with weight),
  ``mlp`` (``"gelu"``: tanh-GELU, hidden ``mlp_ratio * dim``; ``"swiglu"``: fused ``w12`` and ``w3``, hidden
  ``int(2/3 * mlp_ratio * dim)``, as LightningDiT), ``qk_norm`` (per-head norm of the same kind on q and k) and
  ``rope`` (2D RoPE in every block: the first half of each head's interleaved channel pairs rotates by the row, the
  second half by the column, with ``f_j = rope_base ** (-2j / (head_dim / 2))``; EVA's ``VisionRotaryEmbeddingFast``,
  the same table as ``generators.layers.rope_2d_table``). RoPE and the sin-cos embedding can be combined (VFMTok2 does).
* **DiT^DH wide shallow head** (``head_depth > 0``). My reading of DDT / RAE's ``DiTwDDTHead``: the trunk
  (``depth`` blocks at width ``dim``) has no final layer; its output ``s`` (B, N, dim) becomes a *per-token* condition
  ``z = head_projection(SiLU(t_emb + s))`` (B, N, head_width) (``head_projection`` is the identity when the widths are
  equal). The head re-embeds the *noisy latent itself* with its own patch embedding (``head_embedder``, patch size
  ``head_patch_size``, default ``patch_size``), runs ``head_depth`` adaLN-Zero blocks at ``head_width`` whose
  modulation is computed per token from ``z`` (``Linear(SiLU(z))``, repeated over the head's tokens when the head has
  a finer patch), and the final adaLN layer is also conditioned on ``z``. No position embedding is added in the head
  (VFMTok2 leaves ``x_pos_embed = None``); with ``rope`` the head uses its own RoPE table at its head dimension.
* **Options that reproduce the reference exactly** (``configs/flow/ditdh-xl.yaml`` sets them; the defaults keep the
  DiT / SiT behaviour): ``time_embedding="gaussian_fourier"`` (RAE / VFMTok2's ``GaussianFourierEmbedding``: a fixed
  random vector ``W`` of ``time_frequency_dim`` frequencies drawn from N(0, ``time_fourier_scale``**2), features
  ``[sin(2 pi t W), cos(2 pi t W)]`` (2 x ``time_frequency_dim`` MLP inputs); ``W`` is the persistent buffer
  ``t_embedder.frequencies``: saved and loaded, never trained, not counted as a parameter), ``condition_silu=True``
  (the trunk's condition is ``SiLU(t_emb + y_emb)``, before the blocks' own SiLU; the head's per-token condition
  still uses the raw ``t_emb``, as the reference) and ``reverse_time=True`` (the reference's time convention: t = 1 is
  noise and the target is ``noise - data``; the model embeds ``1 - t`` and negates its output, so ``forward`` keeps
  this project's SiT convention below). The reference's sin-cos table is a frozen parameter; here it is a
  non-persistent buffer (not counted, not saved; ``generators.convert_dit`` checks the checkpoint's copy equals it).
  Not reproduced: the reference's ``wo_shift`` blocks, and its q/k LayerNorm eps (1e-5, used only with
  ``qk_norm`` and ``norm="layernorm"``; 1e-6 here); both are off in every released DiT^DH config.

``forward(latents, timesteps, class_labels, force_drop_ids=None)`` returns the velocity, shaped like ``latents``.
Time convention (SiT): ``x_t = t * x_data + (1 - t) * noise``, ``t in [0, 1]``, target ``x_data - noise``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.layers import FusedSwiGLU
from vfmtok.tokenizer.utils.loading import StrictLoadingMixin
from vfmtok.generators.layers import RMSNorm, apply_rotary_embedding, rope_2d_table

__all__ = ["DiTModel", "sincos_2d_pos_embed", "timestep_embedding", "gaussian_fourier_embedding",
           "swiglu_hidden_dim"]

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBEDS = ("sincos", "none")
TIME_EMBEDDINGS = ("sinusoidal", "gaussian_fourier")


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU width: ``int(2/3 * int(dim * mlp_ratio))``."""
    return int(2 / 3 * int(dim * mlp_ratio))


def sincos_2d_pos_embed(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """(grid_size**2, dim) fp32 fixed 2D sin-cos embedding in DiT's layout (raster order; the first ``dim / 2``
    channels encode the column, the last ``dim / 2`` the row; each half is ``[sin(pos * w), cos(pos * w)]`` with
    ``w_k = 10000 ** (-k / (dim / 4))``)."""
    if dim % 4:
        raise InvalidValueError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, device=device, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding (B,) -> (B, dim): ``[cos(t * f), sin(t * f)]``, ``f_k = max_period ** (-k / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def gaussian_fourier_embedding(t: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """RAE / VFMTok2's Gaussian Fourier features (B,) -> (B, 2 * F): ``[sin(2 pi t W), cos(2 pi t W)]``, in fp32."""
    args = t.float()[:, None] * frequencies.float()[None] * 2 * torch.pi
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
def make_norm(kind: str, dim: int, affine_layernorm: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=affine_layernorm, eps=1e-6)


class GeluMLP(nn.Module):
    """DiT's MLP: ``fc2(gelu_tanh(fc1(x)))`` (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Bidirectional self-attention: fused ``qkv`` (with bias), optional per-head q/k norm and 2D RoPE, SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, norm: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # LightningDiT: q/k norm is RMSNorm with rmsnorm blocks, an affine LayerNorm otherwise.
        self.q_norm = make_norm(norm, self.head_dim, affine_layernorm=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, affine_layernorm=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(dim=2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary_embedding(q, rope), apply_rotary_embedding(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2).to(v.dtype), k.transpose(1, 2).to(v.dtype),
                                             v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _per_token(cond: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, dim) -> (B, 1, dim); (B, L, dim) -> (B, num_tokens, dim), each of the L rows repeated num_tokens / L times."""
    if cond.ndim == 2:
        return cond[:, None]
    if cond.shape[1] != num_tokens:
        cond = cond.repeat_interleave(num_tokens // cond.shape[1], dim=1)
    return cond


class DiTBlock(nn.Module):
    """adaLN-Zero block; the condition is (B, dim) (trunk) or per token (B, L, dim) (DiT^DH head)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm, norm)
        self.norm2 = make_norm(norm, dim)
        self.mlp = FusedSwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio)) if mlp == "swiglu" else \
            GeluMLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        mod = _per_token(self.adaLN_modulation(cond), x.shape[1])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_features: int, norm: str):
        super().__init__()
        self.norm_final = make_norm(norm, dim)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = _per_token(self.adaLN_modulation(cond), x.shape[1]).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """MLP over DiT's sinusoidal features (``frequency_dim`` inputs) or, with ``kind="gaussian_fourier"``, over
    Gaussian Fourier features of the fixed random frequencies ``self.frequencies`` (``2 * frequency_dim`` inputs)."""

    def __init__(self, dim: int, frequency_dim: int = 256, kind: str = "sinusoidal", fourier_scale: float = 1.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.kind = kind
        in_features = frequency_dim
        if kind == "gaussian_fourier":
            # A persistent buffer: saved with the weights (it is random), never trained, not a parameter.
            self.register_buffer("frequencies", torch.randn(frequency_dim) * fourier_scale)
            in_features = 2 * frequency_dim
        self.mlp = nn.Sequential(nn.Linear(in_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "gaussian_fourier":
            emb = gaussian_fourier_embedding(t, self.frequencies)
        else:
            emb = timestep_embedding(t, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
class DiTModel(StrictLoadingMixin, ModelMixin, ConfigMixin):
    """DiT / SiT / LightningDiT / DiT^DH velocity model over (B, in_channels, latent_size, latent_size) latents.

    See the module docstring for the layout. ``head_depth = 0`` gives a plain DiT / SiT / LightningDiT.
    """

    config_name = "config.json"
    converter = "vfmtok.generators.convert_dit"  # named in loading errors (StrictLoadingMixin)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        latent_size: int = 32,
        patch_size: int = 2,
        num_classes: int = 1000,
        dim: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        pos_embed: str = "sincos",
        class_dropout_prob: float = 0.1,
        time_embedding_scale: float = 1.0,
        time_embedding: str = "sinusoidal",
        time_frequency_dim: int = 256,
        time_fourier_scale: float = 1.0,
        condition_silu: bool = False,
        reverse_time: bool = False,
        head_width: Optional[int] = None,
        head_depth: int = 0,
        head_num_heads: Optional[int] = None,
        head_patch_size: Optional[int] = None,
        repa_layer: Optional[int] = None,
        repa_dim: Optional[int] = None,
        repa_projector_dim: int = 2048,
    ):
        super().__init__()
        if (repa_layer is None) != (repa_dim is None):
            raise InvalidValueError(f"repa_layer and repa_dim go together (REPA alignment), got {repa_layer!r} and "
                             f"{repa_dim!r}")
        if repa_layer is not None and not (isinstance(repa_layer, int) and 1 <= repa_layer <= depth):
            raise InvalidValueError(f"repa_layer must be a block count in [1, depth={depth}], got {repa_layer!r}")
        for name, value in (("in_channels", in_channels), ("latent_size", latent_size), ("patch_size", patch_size),
                            ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            if not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        if norm not in NORMS:
            raise InvalidValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if mlp not in MLPS:
            raise InvalidValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
        if pos_embed not in POS_EMBEDS:
            raise InvalidValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if time_embedding not in TIME_EMBEDDINGS:
            raise InvalidValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {time_embedding!r}")
        if not isinstance(time_frequency_dim, int) or time_frequency_dim < 1:
            raise InvalidValueError(f"time_frequency_dim must be a positive integer, got {time_frequency_dim!r}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise InvalidValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if latent_size % patch_size:
            raise InvalidValueError(f"latent_size ({latent_size}) must be divisible by patch_size ({patch_size})")
        if not isinstance(head_depth, int) or head_depth < 0:
            raise InvalidValueError(f"head_depth must be a non-negative integer, got {head_depth!r}")
        head_width = head_width or dim
        head_num_heads = head_num_heads or num_heads
        head_patch_size = head_patch_size or patch_size
        if head_depth and (latent_size % head_patch_size or patch_size % head_patch_size):
            raise InvalidValueError(f"head_patch_size ({head_patch_size}) must divide patch_size ({patch_size}) and "
                             f"latent_size ({latent_size})")
        for name, width, heads in (("dim", dim, num_heads), ("head_width", head_width, head_num_heads)):
            if width % heads:
                raise InvalidValueError(f"{name} ({width}) must be divisible by its number of heads ({heads})")
            if rope and (width // heads) % 4:
                raise InvalidValueError(f"rope needs a head dimension divisible by 4; {name} {width} / {heads} heads")
        if pos_embed == "sincos" and dim % 4:
            raise InvalidValueError(f"the sin-cos position embedding needs dim divisible by 4, got {dim}")

        self.grid_size = latent_size // patch_size
        self.head_grid_size = latent_size // head_patch_size
        self.out_patch = head_patch_size if head_depth else patch_size
        self.x_embedder = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(dim, time_frequency_dim, time_embedding, time_fourier_scale)
        self.class_embedding = nn.Embedding(num_classes + 1, dim)  # the last row is the null class
        block = dict(mlp_ratio=mlp_ratio, norm=norm, mlp=mlp, qk_norm=qk_norm)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, **block) for _ in range(depth))
        if head_depth:
            self.head_embedder = nn.Conv2d(in_channels, head_width, head_patch_size, stride=head_patch_size)
            self.head_projection = nn.Linear(dim, head_width) if head_width != dim else nn.Identity()
            self.head_blocks = nn.ModuleList(DiTBlock(head_width, head_num_heads, **block) for _ in range(head_depth))
        out_width = head_width if head_depth else dim
        self.final_layer = FinalLayer(out_width, self.out_patch ** 2 * in_channels, norm)
        # REPA: an MLP from the trunk's tokens after block `repa_layer` to the frozen VFM's feature width; used only
        # by the alignment loss in training (forward(..., return_alignment=True)).
        self.repa_projector = None if repa_layer is None else nn.Sequential(
            nn.Linear(dim, repa_projector_dim), nn.SiLU(), nn.Linear(repa_projector_dim, repa_projector_dim),
            nn.SiLU(), nn.Linear(repa_projector_dim, repa_dim))
        # The per-element statistics that normalise the tokenizer's latents for this model (set from the training
        # data with set_latent_statistics; identity until then). Persistent state: saved and loaded with the weights,
        # so a saved denoiser needs no side file to de-normalise what it generates. Kept in fp32 (see _apply).
        self.register_buffer("latent_mean", torch.zeros(in_channels, latent_size, latent_size))
        self.register_buffer("latent_std", torch.ones(in_channels, latent_size, latent_size))
        # Not weights: rebuilt in fp32 whenever the module is moved or cast (see _apply).
        self._register_tables(None)
        self._init_weights()

    # -- tables -------------------------------------------------------------------------------------------------
    def _tables(self, device) -> dict[str, torch.Tensor]:
        c = self.config
        empty = torch.zeros(0, device=device)
        tables = {"pos_table": sincos_2d_pos_embed(c.dim, self.grid_size, device)
                  if c.pos_embed == "sincos" else empty,
                  "rope_table": rope_2d_table(self.grid_size, c.dim // c.num_heads, c.rope_base, device=device)[1:]
                  if c.rope else empty,
                  "head_rope_table": empty}
        if c.rope and c.head_depth:
            head_width, head_heads = c.head_width or c.dim, c.head_num_heads or c.num_heads
            tables["head_rope_table"] = rope_2d_table(self.head_grid_size, head_width // head_heads, c.rope_base,
                                                      device=device)[1:]
        return tables

    def _register_tables(self, device) -> None:
        for name, table in self._tables(device).items():
            self.register_buffer(name, table, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name, table in self._tables(self.pos_table.device).items():
            setattr(self, name, table)
        for name in ("latent_mean", "latent_std"):  # .half() / .to(bfloat16) would round the statistics
            if self._buffers[name].is_floating_point() and self._buffers[name].dtype != torch.float32:
                self._buffers[name] = self._buffers[name].float()
        return self

    # -- latent normalisation -----------------------------------------------------------------------------------
    def set_latent_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the per-element mean / std (each ``latent_shape``) of the tokenizer's latents over the training
        data: the model is trained on and generates ``(latents - mean) / std``."""
        for name, value in (("mean", mean), ("std", std)):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(self.latent_shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidValueError(f"latent {name} must have shape {list(self.latent_shape)}, got {got}")
            if not torch.isfinite(value).all():
                raise InvalidValueError(f"latent {name} has non-finite values")
        if not (std > 0).all():
            raise InvalidValueError(f"latent std must be > 0 everywhere, got a minimum of {float(std.min())}")
        with torch.no_grad():
            self.latent_mean.copy_(mean)
            self.latent_std.copy_(std)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents -> the normalised space the model works in."""
        return ((latents.float() - self.latent_mean) / self.latent_std).to(latents.dtype)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's normalised latents -> tokenizer latents (what the tokenizer decodes)."""
        return (latents.float() * self.latent_std + self.latent_mean).to(latents.dtype)

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears, patch embeddings like linears, N(0, 0.02) for the class
        table and the timestep MLP, and zero for every adaLN modulation and the final layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        embedders = [self.x_embedder] + ([self.head_embedder] if self.config.head_depth else [])
        for conv in embedders:
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in list(self.blocks) + list(getattr(self, "head_blocks", [])):
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        """The class id of the unconditional (dropped) label: ``num_classes``."""
        return self.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.latent_size, c.latent_size)

    # -- core ---------------------------------------------------------------------------------------------------
    def _check_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape[1:]) != self.latent_shape:
            raise InvalidValueError(f"latents must be (B, {', '.join(map(str, self.latent_shape))}), got "
                             f"{tuple(getattr(latents, 'shape', ())) or type(latents)}")
        b = latents.shape[0]
        if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (b,):
            raise InvalidValueError(f"timesteps must be a ({b},) tensor, got "
                                    f"{getattr(timesteps, 'shape', type(timesteps))}")
        if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (b,) or \
                class_labels.is_floating_point() or class_labels.dtype == torch.bool:
            raise InvalidValueError(f"class_labels must be a ({b},) integer tensor, got "
                             f"{getattr(class_labels, 'shape', type(class_labels))}"
                             + (f" of dtype {class_labels.dtype}" if isinstance(class_labels, torch.Tensor) else ""))
        bad = class_labels[(class_labels < 0) | (class_labels > self.null_class)]
        if bad.numel():
            raise InvalidValueError(f"class ids {bad.unique().tolist()[:10]} are outside [0, {self.null_class}] "
                             f"(the null class is num_classes)")

    def drop_labels(self, class_labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``force_drop_ids`` (B,) bool / 0-1: replace exactly the marked labels by the null class (any mode).
        Otherwise, in training mode, each label becomes the null class with probability ``class_dropout_prob``
        (torch's global RNG); in eval mode labels are unchanged."""
        if force_drop_ids is not None:
            return torch.where(force_drop_ids.to(class_labels.device).bool(), self.null_class, class_labels)
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            return torch.where(drop, self.null_class, class_labels)
        return class_labels

    def _patchify(self, embedder: nn.Conv2d, latents: torch.Tensor) -> torch.Tensor:
        return embedder(latents.to(embedder.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, width)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.out_patch, self.config.in_channels
        g = self.config.latent_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None, return_alignment: bool = False):
        """Velocity (B, C, H, W) for noisy ``latents`` (B, C, H, W) at ``timesteps`` (B,) in [0, 1] (SiT convention,
        1 = data) for ``class_labels`` (B,) in [0, num_classes] (``num_classes`` = null class). See ``drop_labels``
        for label dropout and ``force_drop_ids``. ``return_alignment``: also return the REPA projection (B, tokens,
        repa_dim) of the trunk's tokens after block ``repa_layer``."""
        if return_alignment and self.repa_projector is None:
            raise InvalidValueError("return_alignment=True needs a model built with repa_layer and repa_dim")
        self._check_inputs(latents, timesteps, class_labels)
        labels = self.drop_labels(class_labels, force_drop_ids)
        if self.config.reverse_time:  # the network was trained with t = 1 at the noise (RAE / VFMTok2)
            timesteps = 1 - timesteps
        t_emb = self.t_embedder(timesteps * self.config.time_embedding_scale)
        cond = t_emb + self.class_embedding(labels)
        if self.config.condition_silu:
            cond = F.silu(cond)
        x = self._patchify(self.x_embedder, latents)
        if self.config.pos_embed == "sincos":
            x = x + self.pos_table.to(x.dtype)
        rope = self.rope_table if self.config.rope else None
        aligned = None
        for index, blk in enumerate(self.blocks, start=1):
            x = blk(x, cond, rope)
            if return_alignment and index == self.config.repa_layer:
                aligned = self.repa_projector(x)
        if self.config.head_depth:
            cond = self.head_projection(F.silu(t_emb[:, None] + x))  # per-token condition (B, N, head_width)
            x = self._patchify(self.head_embedder, latents)
            head_rope = self.head_rope_table if self.config.rope else None
            for blk in self.head_blocks:
                x = blk(x, cond, head_rope)
        out = self._unpatchify(self.final_layer(x, cond))
        if self.config.reverse_time:  # its velocity is noise - data; ours is data - noise
            out = -out
        return (out.to(latents.dtype), aligned) if return_alignment else out.to(latents.dtype)

    def describe(self) -> dict[str, Any]:
        """Facts for ``vfmtok describe``: parameter counts and the latent / token layout."""
        c = self.config
        return {
            "model": type(self).__name__,
            "total_params": sum(p.numel() for p in self.parameters()),
            "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "frozen_params": sum(p.numel() for p in self.parameters() if not p.requires_grad),
            "latent_shape": list(self.latent_shape),
            "patch_size": c.patch_size,
            "num_tokens": self.grid_size ** 2,
            "grid": [self.grid_size, self.grid_size],
            "num_classes": c.num_classes,
            "null_class": self.null_class,
            "dim": c.dim,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "head_dim": c.dim // c.num_heads,
            "norm": c.norm,
            "mlp": c.mlp,
            "mlp_hidden_dim": swiglu_hidden_dim(c.dim, c.mlp_ratio) if c.mlp == "swiglu" else int(c.dim * c.mlp_ratio),
            "qk_norm": c.qk_norm,
            "rope": c.rope,
            "pos_embed": c.pos_embed,
            "time_embedding": c.time_embedding,
            "condition_silu": c.condition_silu,
            "reverse_time": c.reverse_time,
            "head": None if not c.head_depth else {
                "width": c.head_width or c.dim, "depth": c.head_depth, "num_heads": c.head_num_heads or c.num_heads,
                "patch_size": self.out_patch, "num_tokens": self.head_grid_size ** 2},
            "parameters_by_part": {name: count for name, module in self.named_children()
                                   if (count := sum(p.numel() for p in module.parameters()))},
        }
