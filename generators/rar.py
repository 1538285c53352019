"""Randomized autoregressive generation (RAR; Yu et al. 2024, "Randomized Autoregressive Visual Generation",
bytedance/1d-tokenizer ``modeling/rar.py``), the generator behind the VFMTok paper's headline discrete results
(CVMI-Lab/VFMTok-RAR): a class-conditional decoder-only transformer over the raster sequence of tokenizer codes,
trained on randomly permuted orders with the permutation probability annealed to zero, sampled in raster order.

Sequence layout (``T = num_tokens``, generation order ``o`` a permutation of ``0 .. T - 1``; raster: ``o_j = j``)::

    position   0            1              2 + j  (j = 0 .. T - 2)
    input      start token  class token    code of image token o_j
    predicts   (nothing)    token o_0      token o_{j+1}

Every input row is ``embedding + position_embedding[slot] + target_position_embedding[target slot]``:

* ``embedding`` is one table for codes ``[0, V)``, a mask code ``V`` (unused by RAR, kept for the released
  weights), the classes ``V + 1 .. V + C`` and the null class ``V + C + 1``;
* the *position* of input ``2 + j`` is that of the token it holds (slot ``2 + o_j``; the start and class tokens use
  slots 0 and 1);
* the *target-aware* position is that of the token the row predicts (slot ``2 + o_{j+1}``, the class row ``2 + o_0``;
  zero for the start row and for a row that predicts nothing). With random orders this is how the model knows
  which token comes next.

Blocks are DiT-style adaLN-zero pre-norm blocks (``x + gate * f(LayerNorm(x) * (1 + scale) + shift)`` for attention
and the GELU MLP), conditioned on ``class embedding + step_embedding[position]``; attention has a biased ``qkv``,
per-head LayerNorm on queries and keys (QK-norm) and a causal mask. The head is an adaLN-modulated LayerNorm (no
affine) then a biased linear layer. LayerNorms use eps 1e-6.

Sampling (:meth:`RARModel.generate`) runs in raster order with a KV cache (one forward of the start and class tokens,
then one decode step per token, :meth:`RARModel.decode`; or speculative Jacobi decoding over
:meth:`RARModel.decode_block` with ``sjd_window``); classifier-free guidance batches ``[cond; null]`` and uses
RAR's power-cosine schedule by default (``s_t = 1 + (s - 1) (1 - cos(pi (t / T) ** p)) / 2``, so the first token is
unguided); RAR's ``randomize_temperature`` is the plain softmax temperature of every step (the reference divides the
logits by it), ``temperature`` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vfmtok.generators.interface import AutoregressiveGeneratorMixin
from vfmtok.generators.layers import KVCache, cache_attention_mask, write_at_positions
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.loading import StrictLoadingMixin
from vfmtok.tokenizer.utils.types import class_label_tensor

__all__ = ["RARModel", "RARCache", "permutation_probability"]

# Input slots before the image tokens: the start token (0) and the class token (1).
PREFIX = 2


def permutation_probability(step: int, anneal_start: int, anneal_end: int) -> float:
    """RAR's randomness annealing: the probability that a training sequence uses a random order at ``step`` (updates
    done): 1 before ``anneal_start``, linear down to 0 at ``anneal_end``, 0 after (``train_utils.get_rar_random_ratio``;
    with ``anneal_start == anneal_end`` a step from 1 to 0 there, where the reference would divide by zero)."""
    if step < anneal_start:
        return 1.0
    if step >= anneal_end:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention: biased fused ``qkv`` (rows: all q, all k, all v), LayerNorm on each head's queries and
    keys, SDPA, biased output projection."""

    def __init__(self, dim: int, num_heads: int, norm_eps: float, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                start: int = 0, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Without ``cache``: causal attention within ``x``. With ``cache`` (key, value buffers (B, H, L, head_dim)):
        this chunk sits at positions ``start ..``, its keys/values are written there and it attends to every position
        up to its own; or at ``positions`` (B, S), each row its own, attending to the whole buffer under
        ``attn_mask`` (:func:`~vfmtok.generators.layers.cache_attention_mask`)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attention_dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif positions is not None:  # per-row positions (the SJD block step)
            keys, values = cache
            write_at_positions(keys, k, positions)
            write_at_positions(values, v, positions)
            out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=attn_mask)
        else:
            keys, values = cache
            keys[:, :, start:start + s] = k.to(keys.dtype)
            values[:, :, start:start + s] = v.to(values.dtype)
            keys, values = keys[:, :, :start + s], values[:, :, :start + s]
            # Row i (position start + i) sees positions <= start + i; a single row sees the whole written cache.
            mask = None if s == 1 else \
                torch.ones(s, start + s, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(b, s, d).to(x.dtype)))


class MLP(nn.Module):
    """``fc2(dropout(gelu(fc1(x))))`` then dropout (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class AdaLNBlock(nn.Module):
    """adaLN-zero block: ``modulation(silu(c))`` gives shift, scale, gate for attention, then for the MLP."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, norm_eps: float, attention_dropout: float,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attention = Attention(dim, num_heads, norm_eps, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, hidden_dim, dropout)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                start: int = 0, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, dim=-1)
        x = x + gate_a * self.attention(modulate(self.norm1(x), shift_a, scale_a), cache, start, positions, attn_mask)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


@dataclass
class RARCache(KVCache):
    """:class:`~vfmtok.generators.layers.KVCache` buffers (batch, heads, max_length, head_dim) and each row's class
    embedding (the blocks' conditioning at every later step). ``length``: positions written so far."""

    condition: torch.Tensor
    length: int = 0

    def narrow(self, batch_size: int) -> "RARCache":
        """The first ``batch_size`` rows, as views sharing storage."""
        narrowed = super().narrow(batch_size)
        return RARCache(narrowed.keys, narrowed.values, self.condition[:batch_size], self.length)


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
class RARModel(StrictLoadingMixin, ModelMixin, ConfigMixin, AutoregressiveGeneratorMixin):
    """RAR over ``num_tokens`` codes of a ``vocab_size`` vocabulary, ``num_classes`` classes (see the module docstring).

    ``forward(tokens, class_labels)`` -> teacher-forced logits aligned with ``tokens`` (a random order per sequence
    with probability :attr:`permutation_probability` in training mode, raster otherwise); ``generate(...)`` ->
    sampled codes (raster order, KV cache, CFG with the power-cosine schedule).
    """

    config_name = "config.json"
    converter = "vfmtok.generators.convert_rar"  # named in loading errors (StrictLoadingMixin)
    supports_sjd = True
    # RAR's published sampling recipe (configs/training/generator/rar.yaml): power-cosine CFG, power 2.75,
    # randomize_temperature 1.0; no top-k / top-p.
    default_sampling = {"guidance_schedule": "cosine_power", "guidance_power": 2.75, "guidance_interval": None,
                        "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 16384,
        num_tokens: int = 256,
        num_classes: int = 1000,
        dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        intermediate_size: int = 4096,
        norm_eps: float = 1e-6,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        class_dropout_prob: float = 0.1,
        extra_position_slots: int = 1024,
        extra_step_slots: int = 100,
        randomness_anneal_start: int = 125_000,
        randomness_anneal_end: int = 187_500,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_tokens", num_tokens), ("num_classes", num_classes),
                            ("dim", dim), ("depth", depth), ("num_heads", num_heads),
                            ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        if dim % num_heads:
            raise InvalidValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        for name, value in (("extra_position_slots", extra_position_slots), ("extra_step_slots", extra_step_slots)):
            if not isinstance(value, int) or value < 0:
                raise InvalidValueError(f"{name} must be an integer >= 0, got {value!r}")
        if extra_position_slots < PREFIX or extra_step_slots < PREFIX:
            raise InvalidValueError(f"extra_position_slots ({extra_position_slots}) and extra_step_slots "
                                    f"({extra_step_slots}) must be >= {PREFIX} (the start and class positions)")
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout),
                            ("class_dropout_prob", class_dropout_prob)):
            if not 0.0 <= value < 1.0:
                raise InvalidValueError(f"{name} must be in [0, 1), got {value}")
        if not 0 <= randomness_anneal_start <= randomness_anneal_end:
            raise InvalidValueError(f"need 0 <= randomness_anneal_start ({randomness_anneal_start}) <= "
                                    f"randomness_anneal_end ({randomness_anneal_end})")
        self.head_dim = dim // num_heads
        self.start_token = nn.Parameter(torch.zeros(1, 1, dim))
        # codes, the mask code, the classes, the null class
        self.embedding = nn.Embedding(vocab_size + 1 + num_classes + 1, dim)
        self.position_embedding = nn.Parameter(torch.zeros(num_tokens + extra_position_slots, dim))
        self.target_position_embedding = nn.Parameter(torch.zeros(num_tokens + extra_position_slots, dim))
        self.step_embedding = nn.Parameter(torch.zeros(num_tokens + extra_step_slots, dim))
        self.blocks = nn.ModuleList(
            AdaLNBlock(dim, num_heads, intermediate_size, norm_eps, attention_dropout, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, vocab_size)
        self.permutation_probability = 0.0  # set per step in training (on_train_step); sampling is raster
        self._init_weights()

    def _init_weights(self) -> None:
        """RAR's init: truncated normal for linear, embedding and position weights, zero biases, adaLN-zero."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for table in (self.position_embedding, self.target_position_embedding, self.step_embedding):
            nn.init.trunc_normal_(table, mean=0.0, std=std)
        for modulation in (self.final_modulation, *(block.modulation for block in self.blocks)):
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)

    # -- ids and checks -------------------------------------------------------------------------------------------
    def class_token_ids(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Class ids (the null class is ``num_classes``) -> rows of the embedding table."""
        return class_labels + self.config.vocab_size + 1

    def _check_orders(self, orders: torch.Tensor, batch: int) -> None:
        total = self.num_tokens
        if not isinstance(orders, torch.Tensor) or tuple(orders.shape) != (batch, total) or \
                orders.is_floating_point():
            raise InvalidValueError(f"orders must be a ({batch}, {total}) integer tensor, got "
                                    f"{getattr(orders, 'shape', type(orders))}")
        expected = torch.arange(total, device=orders.device).expand(batch, -1)
        if not torch.equal(orders.sort(dim=1).values, expected):
            raise InvalidValueError(f"every row of orders must be a permutation of 0 .. {total - 1}")

    # -- training ---------------------------------------------------------------------------------------------------
    def on_train_step(self, step: int) -> None:
        """Set the permutation probability of RAR's randomness annealing for this step (``step`` updates done)."""
        self.permutation_probability = permutation_probability(step, self.config.randomness_anneal_start,
                                                               self.config.randomness_anneal_end)

    def no_weight_decay_parameters(self) -> set[str]:
        """RAR's optimizer leaves embeddings and position tables undecayed (names with "embed", the start token)."""
        return {name for name, _ in self.named_parameters() if "embedding" in name or name == "start_token"}

    def sample_orders(self, batch_size: int, device: Union[str, torch.device]) -> torch.Tensor:
        """(B, T) generation orders: each row a uniformly random permutation with probability
        :attr:`permutation_probability`, else raster (torch's global RNG, saved in training checkpoints)."""
        total = self.num_tokens
        raster = torch.arange(total, device=device).expand(batch_size, -1)
        permute = torch.rand(batch_size, device=device) < self.permutation_probability
        if not bool(permute.any()):
            return raster.clone()
        random_orders = torch.rand(batch_size, total, device=device).argsort(dim=1)
        return torch.where(permute[:, None], random_orders, raster)

    # -- core -------------------------------------------------------------------------------------------------------
    def _inputs(self, class_ids: torch.Tensor, tokens: torch.Tensor, orders: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded rows of ``[start, class, tokens in order o]`` (B, 2 + S, dim) and their conditioning; ``tokens``
        (B, S) are ``codes[o_0 .. o_{S-1}]``, ``orders`` the full (B, T) orders (targets of the rows)."""
        b, s = tokens.shape
        class_embedding = self.embedding(class_ids)
        x = torch.cat([self.start_token.expand(b, -1, -1), class_embedding[:, None], self.embedding(tokens)], dim=1)
        slots = orders + PREFIX
        position = torch.cat([self.position_embedding[:PREFIX].expand(b, -1, -1),
                              self.position_embedding[slots[:, :s]]], dim=1)
        # Row p >= 1 predicts the token at order index p - 1: its slot's target embedding; none for the start row
        # and for a row past the last target.
        targets = self.target_position_embedding[slots[:, :s + 1]]
        target = torch.cat([torch.zeros_like(x[:, :1]), targets, torch.zeros_like(x[:, :max(0, s + 1 - targets.shape[1])])],
                           dim=1)[:, :x.shape[1]]
        c = class_embedding[:, None] + self.step_embedding[None, :x.shape[1]]
        return x + position + target, c

    def _head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        return self.head(modulate(self.final_norm(x), shift, scale)).float()

    def teacher_forced_logits(self, tokens: torch.Tensor, class_labels: torch.Tensor,
                              orders: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab) in *generation* order: ``[:, j]`` predicts ``tokens[:, orders[:, j]]`` from the class
        and ``tokens[:, orders[:, :j]]`` (the reference's ``forward_fn`` output without its last row). No dropout
        of labels here; ``class_labels`` may hold the null class."""
        self._check_tokens(tokens, self.num_tokens)
        self._check_labels(class_labels, allow_null=True)
        b, total = tokens.shape
        if total != self.num_tokens:
            raise InvalidValueError(f"teacher forcing needs all {self.num_tokens} tokens, got {total}")
        if len(class_labels) != b:
            raise InvalidValueError(f"class_labels has {len(class_labels)} entries for a batch of {b} sequences")
        orders = torch.arange(total, device=tokens.device).expand(b, -1) if orders is None else orders
        self._check_orders(orders, b)
        ordered = tokens.gather(1, orders)
        x, c = self._inputs(self.class_token_ids(class_labels), ordered[:, :-1], orders)
        for block in self.blocks:
            x = block(x, c)
        return self._head(x[:, 1:], c[:, 1:])

    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor, orders: Optional[torch.Tensor] = None,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing, aligned with ``tokens``: logits (B, T, vocab) with ``[:, t]`` predicting ``tokens[:, t]``
        given the class and the tokens before ``t`` in the row's generation order. Training loss (every order):
        ``F.cross_entropy(logits.flatten(0, 1), tokens.flatten())``.

        ``orders`` (B, T): the generation orders; default raster, or in training mode random with probability
        :attr:`permutation_probability` per row (:meth:`sample_orders`). In training mode each label is replaced by
        the null class with probability ``class_dropout_prob``; ``force_drop_ids`` (B,) replaces exactly the marked
        ones (any mode). Both draw from torch's global RNG.
        """
        self._check_labels(class_labels, allow_null=True)
        if force_drop_ids is not None:
            class_labels = torch.where(force_drop_ids.to(class_labels.device).bool(), self.null_class, class_labels)
        elif self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(len(class_labels), device=class_labels.device) < self.config.class_dropout_prob
            class_labels = torch.where(drop, self.null_class, class_labels)
        if orders is None and self.training:
            orders = self.sample_orders(len(tokens), tokens.device)
        logits = self.teacher_forced_logits(tokens, class_labels, orders)
        if orders is None:
            return logits
        return torch.empty_like(logits).scatter_(1, orders[..., None].expand_as(logits), logits)

    # -- KV-cached inference --------------------------------------------------------------------------------------
    def allocate_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> RARCache:
        """Zeroed buffers for the ``num_tokens + 1`` positions sampling writes (start, class, all tokens but the
        last)."""
        if batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
        weight = self.embedding.weight
        shape = (batch_size, self.config.num_heads, self.num_tokens + 1, self.head_dim)
        kwargs = dict(dtype=dtype or weight.dtype, device=weight.device)
        return RARCache([torch.zeros(shape, **kwargs) for _ in self.blocks],
                        [torch.zeros(shape, **kwargs) for _ in self.blocks],
                        torch.zeros(batch_size, self.config.dim, **kwargs))

    def _run_cached(self, x: torch.Tensor, c: torch.Tensor, cache: RARCache) -> torch.Tensor:
        start = cache.length
        if start + x.shape[1] > cache.max_length:
            raise InvalidValueError(f"positions {start}..{start + x.shape[1] - 1} do not fit a cache of "
                                    f"{cache.max_length} positions")
        for i, block in enumerate(self.blocks):
            x = block(x, c, (cache.keys[i], cache.values[i]), start)
        cache.length = start + x.shape[1]
        return self._head(x, c)

    def prefill(self, class_labels: torch.Tensor, cache: RARCache) -> torch.Tensor:
        """Write the start and class tokens (positions 0, 1) for ``class_labels`` (B,) (the null class allowed);
        return the logits (B, vocab) of image token 0 (raster order)."""
        self._check_labels(class_labels, allow_null=True)
        if len(class_labels) != cache.batch_size or cache.length:
            raise InvalidValueError(f"prefill needs an empty cache of batch {len(class_labels)}; got batch "
                                    f"{cache.batch_size} with {cache.length} positions written")
        class_ids = self.class_token_ids(class_labels)
        cache.condition.copy_(self.embedding(class_ids))
        orders = torch.arange(self.num_tokens, device=class_labels.device).expand(len(class_labels), -1)
        x, c = self._inputs(class_ids, orders[:, :0], orders)
        return self._run_cached(x, c, cache)[:, -1]

    def decode(self, tokens: torch.Tensor, cache: RARCache) -> torch.Tensor:
        """The decode step: feed ``k`` new image tokens per row (``tokens`` (B, k), raster indices ``cache.length -
        2 ..``) against the cache; returns logits (B, k, vocab), ``[:, i]`` predicting the token after
        ``tokens[:, i]``. Any ``k`` >= 1 (a speculative / Jacobi decoder verifies several tokens in one call)."""
        self._check_tokens(tokens, self.num_tokens)
        if tokens.shape[0] != cache.batch_size:
            raise InvalidValueError(f"batch of {tokens.shape[0]} for a cache of batch size {cache.batch_size}")
        if cache.length < PREFIX:
            raise InvalidValueError("decode needs a prefilled cache (prefill writes the start and class tokens)")
        first, k = cache.length - PREFIX, tokens.shape[1]
        if first + k > self.num_tokens - 1:
            raise InvalidValueError(f"image tokens {first}..{first + k - 1} do not fit: sampling feeds tokens 0.."
                                    f"{self.num_tokens - 2}")
        index = torch.arange(first, first + k, device=tokens.device)
        x = self.embedding(tokens) + self.position_embedding[index + PREFIX] \
            + self.target_position_embedding[index + 1 + PREFIX]
        c = cache.condition[:, None] + self.step_embedding[index + PREFIX]
        return self._run_cached(x, c, cache)

    def decode_block(self, tokens: torch.Tensor, first_index: torch.Tensor, cache: RARCache) -> torch.Tensor:
        """The block step of speculative Jacobi decoding (:class:`vfmtok.generators.sampling.BlockDecoder`): row b's
        raster image tokens ``first_index[b] .. first_index[b] + k - 1`` (``tokens`` (B, k)) at sequence positions
        ``first_index + 2 ..``, written to a prefilled ``cache`` (``cache.length`` is left as it is: rows sit at
        different positions); returns logits (B, k, vocab), ``[:, j]`` predicting raster token ``first_index[b] + j +
        1``."""
        if tokens.ndim != 2 or tokens.shape[0] != cache.batch_size or first_index.shape != tokens.shape[:1]:
            raise InvalidValueError(f"decode_block needs tokens (B, k) and first_index (B,) for a cache of batch "
                                    f"{cache.batch_size}; got {tuple(tokens.shape)} and {tuple(first_index.shape)}")
        if cache.length < PREFIX:
            raise InvalidValueError("decode_block needs a prefilled cache (prefill writes the start and class tokens)")
        return self._decode_at(tokens, first_index, cache.keys, cache.values, cache.condition)

    def _decode_at(self, tokens: torch.Tensor, first_index: torch.Tensor, keys: list[torch.Tensor],
                   values: list[torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
        # Static shapes throughout (the whole buffer under a mask): what compile_decode=True hands to torch.compile.
        index = first_index[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding(tokens) + self.position_embedding[index + PREFIX] \
            + self.target_position_embedding[index + 1 + PREFIX]
        c = condition[:, None] + self.step_embedding[index + PREFIX]
        positions = index + PREFIX
        mask = cache_attention_mask(positions, keys[0].shape[2])
        for i, block in enumerate(self.blocks):
            x = block(x, c, (keys[i], values[i]), positions=positions, attn_mask=mask)
        return self._head(x, c)

    # -- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        class_labels: torch.Tensor,
        guidance_scale: float = 1.0,
        guidance_schedule: Optional[str] = None,
        guidance_power: Optional[float] = None,
        guidance_interval: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        use_kv_cache: bool = True,
        compile_decode: bool = False,
        return_logits: bool = False,
        step_callback: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
        sjd_window: Optional[int] = None,
        return_sjd_stats: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """Sample ``num_tokens`` codes per class label (B,) -> LongTensor (B, num_tokens), raster order.

        Options left None take :attr:`default_sampling` (RAR's: power-cosine guidance, power 2.75, temperature 1).
        CFG when ``guidance_scale != 1``: the batch is [cond; null class] and ``l = l_u + s_t (l_c - l_u)`` with s_t
        from :meth:`guidance_scales` (the reference computes both halves even where s_t = 1; the result is the
        same); ``guidance_scale = 0`` samples unconditionally. Each token is drawn from ``softmax(l / temperature)``
        after top-k / top-p (off by default), with ``torch.multinomial(generator=generator)``.
        use_kv_cache=False recomputes the whole prefix every step (the reference without its cache).
        compile_decode: wrap the one-token decode step in torch.compile (static shapes: it attends to the whole cache
        under a mask; meant for GPUs).
        return_logits: also return the guided logits (B, num_tokens, vocab). step_callback(t, tokens): as
        :meth:`vfmtok.generators.gpt.GPTModel.generate` (a returned tensor replaces the buffer).
        sjd_window, return_sjd_stats: speculative Jacobi decoding with this many draft tokens per step over
        :meth:`decode_block`, as :meth:`vfmtok.generators.gpt.GPTModel.generate` (the same distribution as plain
        sampling, in fewer model calls; needs the KV cache, takes neither ``return_logits`` nor ``step_callback``).
        """
        class_labels = class_label_tensor(class_labels)
        self._check_labels(class_labels, allow_null=False)
        options = self.sampling_options(guidance_schedule=guidance_schedule, guidance_power=guidance_power,
                                        guidance_interval=guidance_interval, temperature=temperature, top_k=top_k,
                                        top_p=top_p)
        scales = self.guidance_scales(guidance_scale, options["guidance_schedule"], options["guidance_power"],
                                      options["guidance_interval"])
        temperature, top_p = self._check_sampler(options["temperature"], options["top_k"], options["top_p"])
        top_k = options["top_k"]
        self._check_decode_request(sjd_window, return_sjd_stats, use_kv_cache=use_kv_cache,
                                   compile_decode=compile_decode, return_logits=return_logits,
                                   step_callback=step_callback)
        total, batch = self.num_tokens, len(class_labels)
        device = self.embedding.weight.device
        labels = class_labels.to(device)
        guided = float(guidance_scale) != 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        rows = len(labels)
        tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
        all_logits = torch.empty(batch, total, self.config.vocab_size, device=device) if return_logits else None

        if sjd_window is not None:
            with self._sampling_mode():
                tokens, stats = self._generate_sjd(self.allocate_cache(rows), labels, batch, scales, guided,
                                                   temperature, top_k, top_p, generator, sjd_window)
            return (tokens, stats) if return_sjd_stats else tokens
        with self._sampling_mode():
            cache = self.allocate_cache(rows) if use_kv_cache else None
            # torch.compile caches the graph by code object and guards: wrapping again per call recompiles nothing
            decode = torch.compile(self._decode_at, dynamic=False) if compile_decode else None
            for t in range(total):
                if not use_kv_cache:
                    logits = self._uncached_step(tokens[:, :t].repeat(rows // batch, 1), labels)
                elif t == 0:
                    logits = self.prefill(labels, cache)
                else:
                    previous = tokens[:, t - 1:t].repeat(rows // batch, 1)
                    if decode is None:
                        logits = self.decode(previous, cache)[:, -1]
                    else:
                        index = torch.full((rows,), t - 1, dtype=torch.long, device=device)
                        logits = decode(previous, index, cache.keys, cache.values, cache.condition)[:, -1]
                if guided:
                    cond, uncond = logits[:batch], logits[batch:]
                    logits = uncond + scales[t] * (cond - uncond)
                if all_logits is not None:
                    all_logits[:, t] = logits
                tokens[:, t] = self._sample(logits, temperature, top_k, top_p, generator)
                if step_callback is not None:
                    self._apply_step_callback(step_callback, t, tokens)
        return (tokens, all_logits) if return_logits else tokens

    def _uncached_step(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of raster token ``prefix.shape[1]`` from the whole prefix (no cache)."""
        orders = torch.arange(self.num_tokens, device=prefix.device).expand(len(labels), -1)
        x, c = self._inputs(self.class_token_ids(labels), prefix, orders)
        for block in self.blocks:
            x = block(x, c)
        return self._head(x[:, -1:], c[:, -1:])[:, 0]

    # -- reporting ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Facts for ``vfmtok describe``: parameter counts and the token / class layout."""
        c = self.config
        return {
            "model": type(self).__name__,
            "total_params": sum(p.numel() for p in self.parameters()),
            "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "frozen_params": sum(p.numel() for p in self.parameters() if not p.requires_grad),
            "num_tokens": c.num_tokens,
            "vocab_size": c.vocab_size,
            "num_classes": c.num_classes,
            "null_class": self.null_class,
            "dim": c.dim,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "head_dim": self.head_dim,
            "intermediate_size": c.intermediate_size,
            "randomness_anneal": [c.randomness_anneal_start, c.randomness_anneal_end],
            "default_sampling": dict(self.default_sampling),
            "parameters_by_part": {name: sum(p.numel() for p in module.parameters())
                                   for name, module in self.named_children()
                                   if sum(p.numel() for p in module.parameters())}
            | {name: p.numel() for name, p in self.named_parameters(recurse=False)},
        }
