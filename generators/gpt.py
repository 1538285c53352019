"""Class-conditional autoregressive transformer over tokenizer codes, in the LlamaGen design (Sun et al. 2024,
"Autoregressive Model Beats Diffusion"; FoundationVision/LlamaGen).

Sequence layout. Position 0 holds the class token (a row of ``class_embedding``: ``num_classes`` rows for the classes
plus one for the null class, id ``num_classes``); position ``p >= 1`` holds image token ``p - 1`` of the
``sqrt(num_tokens) x sqrt(num_tokens)`` grid in raster order. The output at position ``p`` predicts image token ``p``.
With ``codebook_sizes`` of K > 1 codebooks (:mod:`vfmtok.tokenizer.interface`'s code layout: the vocabulary is the codebooks
side by side) the grid has ``num_tokens / K`` cells and image token ``t`` is cell ``t // K``'s code of codebook
``t % K``: the K codes of a cell follow each other and share the cell's 2D rotary position, and the logits of token
``t`` outside codebook ``t % K``'s range are set to -1e9 (in training and sampling), so only codes of the right
codebook are predicted.

Blocks are Llama pre-norm blocks: ``x + attention(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))``; RMSNorm is computed
in fp32; attention uses one fused bias-free ``qkv`` projection, 2D rotary embeddings and SDPA.

2D RoPE. Each head's ``head_dim`` channels form ``head_dim / 2`` interleaved pairs ``(x[2i], x[2i+1])``. The first
half of the pairs rotate by ``row * f_j``, the second half by ``column * f_j``, with ``f_j = base ** (-2j / (head_dim
/ 2))``, ``j = 0 .. head_dim / 4 - 1`` (LlamaGen's ``precompute_freqs_cis_2d``).

``class_token_rope`` decides the rotation entry of the class position:

* ``"zero"`` (LlamaGen / VFMTok, needed for their weights): the entry is ``cos = sin = 0``, so the class token's query
  and key are multiplied by zero. Its key therefore scores exactly 0 against every query (it still takes part in the
  softmax with weight ``exp(0)``, contributing its value), and its own output is its value (its only visible key).
  LlamaGen prepends ``cls_token_num`` such rows; class-conditional models use ``cls_token_num = 1``, as here.
* ``"none"``: the class position is not rotated (``cos = 1, sin = 0``); its query and key are used as they are.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.types import class_label_tensor
from vfmtok.tokenizer.utils.loading import StrictLoadingMixin
from vfmtok.generators.interface import GUIDANCE_SCHEDULES, AutoregressiveGeneratorMixin
from vfmtok.generators.layers import (KVCache, RMSNorm, apply_rotary_embedding, cache_attention_mask, rope_2d_table,
                                      write_at_positions)
from vfmtok.generators.sampling import filter_logits

__all__ = ["GPTModel", "KVCache", "GUIDANCE_SCHEDULES", "filter_logits", "ffn_hidden_dim"]

CLASS_TOKEN_ROPE = ("zero", "none")


def ffn_hidden_dim(dim: int, multiple_of: int = 256, dim_multiplier: Optional[float] = None) -> int:
    """LlamaGen's SwiGLU width: ``int(2 * 4 * dim / 3)``, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if dim_multiplier is not None:
        hidden = int(dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (LlamaGen's w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Attention(nn.Module):
    """Causal self-attention with a fused bias-free qkv projection (rows: all q heads, all k heads, all v heads)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, residual_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.residual_dropout = nn.Dropout(residual_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Without ``cache``: causal attention within ``x``. With ``cache`` (key, value buffers (B, H, L, head_dim)):
        writes this chunk's keys/values at ``positions`` ((S,), or (B, S) per row) and attends to the buffers under
        ``attn_mask`` ((S, L) or (B, 1, S, L))."""
        b, s, d = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(b, s, 3 * heads, self.head_dim)
        qk = apply_rotary_embedding(qkv[:, :, :2 * heads], rope)  # q and k rotated in one pass: fewer small ops
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, 2 * heads:]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.attention_dropout if self.training else 0.0)
        else:
            keys, values = cache
            write_at_positions(keys, k, positions)
            write_at_positions(values, v, positions)
            out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=attn_mask)
        return self.residual_dropout(self.proj(out.transpose(1, 2).reshape(b, s, d).to(x.dtype)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden_dim: int, norm_eps: float, attention_dropout: float,
                 residual_dropout: float, ffn_dropout: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, num_heads, attention_dropout, residual_dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = FeedForward(dim, hidden_dim, ffn_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache, positions, attn_mask)
        return x + self.ffn(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
class GPTModel(StrictLoadingMixin, ModelMixin, ConfigMixin, AutoregressiveGeneratorMixin):
    """LlamaGen-style class-conditional GPT over ``num_tokens`` image tokens (a square grid).

    ``forward(tokens, class_labels)`` -> teacher-forced logits (training); ``generate(class_labels, ...)`` -> sampled
    tokens with a static KV cache and classifier-free guidance. See the module docstring for the sequence layout.
    """

    supports_sjd = True

    config_name = "config.json"
    converter = "vfmtok.generators.convert_gpt"  # named in loading errors (StrictLoadingMixin)

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 16384,
        num_tokens: int = 256,
        num_classes: int = 1000,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_multiple_of: int = 256,
        ffn_dim_multiplier: Optional[float] = None,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        class_dropout_prob: float = 0.1,
        token_dropout: float = 0.1,
        residual_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        class_token_rope: str = "zero",
        codebook_sizes: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_tokens", num_tokens), ("num_classes", num_classes),
                            ("dim", dim), ("depth", depth), ("num_heads", num_heads),
                            ("ffn_multiple_of", ffn_multiple_of)):
            if not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        sizes = tuple(codebook_sizes) if codebook_sizes is not None else (vocab_size,)
        if not sizes or min(sizes) < 1 or sum(sizes) != vocab_size or num_tokens % len(sizes):
            raise InvalidValueError(f"codebook_sizes {list(sizes)} must be positive, sum to vocab_size ({vocab_size}) "
                                    f"and their number divide num_tokens ({num_tokens})")
        tokens_per_position = len(sizes)
        cells = num_tokens // tokens_per_position
        grid = math.isqrt(cells)
        if grid * grid != cells:
            raise InvalidValueError(f"num_tokens ({num_tokens}) must be the number of codebooks "
                                    f"({tokens_per_position}, from codebook_sizes) x a square number (a grid_size x "
                                    f"grid_size grid)")
        if dim % num_heads != 0 or (dim // num_heads) % 4 != 0:
            raise InvalidValueError(f"dim ({dim}) must be num_heads ({num_heads}) x a head_dim divisible by 4 (2D RoPE "
                             f"splits each head into row and column pairs)")
        for name, value in (("class_dropout_prob", class_dropout_prob), ("token_dropout", token_dropout),
                            ("residual_dropout", residual_dropout), ("ffn_dropout", ffn_dropout),
                            ("attention_dropout", attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise InvalidValueError(f"{name} must be in [0, 1), got {value}")
        if class_token_rope not in CLASS_TOKEN_ROPE:
            raise InvalidValueError(f"class_token_rope must be one of {CLASS_TOKEN_ROPE}, got {class_token_rope!r}")

        self.grid_size = grid
        self.tokens_per_position = tokens_per_position
        self.head_dim = dim // num_heads
        self.class_embedding = nn.Embedding(num_classes + 1, dim)  # the last row is the null class
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.embedding_dropout = nn.Dropout(token_dropout)
        hidden = ffn_hidden_dim(dim, ffn_multiple_of, ffn_dim_multiplier)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, hidden, norm_eps, attention_dropout, residual_dropout, ffn_dropout)
            for _ in range(depth))
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        # Not a weight: rebuilt in fp32 whenever the module is moved or cast (see _apply).
        self.register_buffer("rope", self._rope_table(None), persistent=False)
        # (K, vocab) True where a code belongs to codebook k; None for one codebook.
        offsets = [0, *itertools.accumulate(sizes)]
        allowed = torch.zeros(len(sizes), vocab_size, dtype=torch.bool)
        for k in range(len(sizes)):
            allowed[k, offsets[k]:offsets[k + 1]] = True
        self.register_buffer("codebook_mask", allowed if len(sizes) > 1 else None, persistent=False)
        self._init_weights()

    def _rope_table(self, device) -> torch.Tensor:
        table = rope_2d_table(self.grid_size, self.head_dim, self.config.rope_base, self.config.class_token_rope,
                              device=device)
        per_cell = self.tokens_per_position
        if per_cell == 1:
            return table
        return torch.cat([table[:1], table[1:].repeat_interleave(per_cell, dim=0)])  # a cell's codes share its entry

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(self.head.weight)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # .half() / .to(bfloat16) would round the rotation table: keep it fp32 (as the reference does).
        self.rope = self._rope_table(self.rope.device)
        return self

    # -- core ---------------------------------------------------------------------------------------------------
    def _embed(self, class_labels: Optional[torch.Tensor], tokens: Optional[torch.Tensor]) -> torch.Tensor:
        parts = []
        if class_labels is not None:
            parts.append(self.class_embedding(class_labels)[:, None])
        if tokens is not None and tokens.shape[1] > 0:
            parts.append(self.token_embedding(tokens))
        return self.embedding_dropout(torch.cat(parts, dim=1))

    def _run(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
             cache: Optional[KVCache] = None, attend_to_whole_cache: bool = False) -> torch.Tensor:
        """Input embeddings (B, S, dim) -> fp32 logits (B, S, vocab).

        Without ``cache``: ``x`` is the sequence from position 0, causal. With ``cache``: ``x`` sits at ``positions``
        (S,) or per row (B, S), attending to every cached position <= its own; ``attend_to_whole_cache`` (one token, a cache view that
        ends at its position) skips the mask.
        """
        if cache is None:
            rope, mask = self.rope[: x.shape[1]], None
        else:
            rope = self.rope[positions]
            mask = None if attend_to_whole_cache else cache_attention_mask(positions, cache.max_length)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, rope, layer_cache, positions, mask)
        logits = self.head(self.norm(x)).float()
        if self.codebook_mask is not None:  # token p (output at sequence position p) is of codebook p % K
            where = torch.arange(x.shape[1], device=x.device) if positions is None else positions
            logits = logits.masked_fill(~self.codebook_mask[where % self.tokens_per_position], -1e9)
        return logits

    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, vocab_size), ``logits[:, t]`` predicting ``tokens[:, t]`` from the class and
        ``tokens[:, :t]``; the input sequence is ``[class token, tokens[:, :-1]]``. Training loss:
        ``F.cross_entropy(logits.flatten(0, 1), tokens.flatten())``.

        tokens: (B, T) code indices, 0 <= T <= num_tokens. class_labels: (B,) ids in [0, num_classes]; the id
        ``num_classes`` is the null class. In training mode each label is replaced by the null class with probability
        ``class_dropout_prob`` (torch's global RNG); ``force_drop_ids`` (B,) bool/0-1 replaces exactly the marked labels
        instead (in any mode).
        """
        self._check_tokens(tokens, self.num_tokens)
        self._check_labels(class_labels, allow_null=True)
        if len(class_labels) != len(tokens):
            raise InvalidValueError(f"class_labels has {len(class_labels)} entries for a batch of {len(tokens)} "
                                    "sequences")
        if force_drop_ids is not None:
            class_labels = torch.where(force_drop_ids.to(class_labels.device).bool(), self.null_class, class_labels)
        elif self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(len(class_labels), device=class_labels.device) < self.config.class_dropout_prob
            class_labels = torch.where(drop, self.null_class, class_labels)
        length = tokens.shape[1]
        logits = self._run(self._embed(class_labels, tokens[:, : max(length - 1, 0)]))
        return logits[:, :length]

    # -- KV-cached inference ------------------------------------------------------------------------------------
    def allocate_kv_cache(self, batch_size: int, max_length: Optional[int] = None,
                          dtype: Optional[torch.dtype] = None,
                          device: Optional[Union[str, torch.device]] = None) -> KVCache:
        """Zeroed static buffers for ``max_length`` sequence positions (default ``num_tokens``: the class token and
        every image token but the last, all that sampling needs; at most ``num_tokens + 1``)."""
        max_length = self.num_tokens if max_length is None else max_length
        if not 1 <= max_length <= self.num_tokens + 1:
            raise InvalidValueError(f"max_length must be in [1, {self.num_tokens + 1}], got {max_length}")
        if batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
        weight = self.token_embedding.weight
        shape = (batch_size, self.config.num_heads, max_length, self.head_dim)
        kwargs = dict(dtype=dtype or weight.dtype, device=device or weight.device)
        return KVCache([torch.zeros(shape, **kwargs) for _ in self.blocks],
                       [torch.zeros(shape, **kwargs) for _ in self.blocks])

    def forward_cached(self, cache: KVCache, start: int, tokens: Optional[torch.Tensor] = None,
                       class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run a chunk of consecutive sequence positions through the model with ``cache``; no label dropout.

        With ``class_labels`` (then ``start`` must be 0) the chunk is ``[class token, tokens...]`` at positions 0, 1,
        ...; without, ``tokens[:, j]`` (image token ``start + j - 1``) sits at position ``start + j``, ``start >= 1``.
        Keys/values of earlier positions are read from ``cache``, this chunk's are written to it.
        Returns fp32 logits (B, S, vocab_size); ``logits[:, j]`` predicts the image token at the index equal to the
        position of input ``j`` (the token after it).
        """
        if class_labels is not None:
            if start != 0:
                raise InvalidValueError(f"the class token sits at position 0; got start={start} with class_labels")
            self._check_labels(class_labels, allow_null=True)
        elif start < 1:
            raise InvalidValueError(f"start must be >= 1 for a chunk of image tokens (position 0 is the class token), "
                             f"got {start}")
        if tokens is not None:
            self._check_tokens(tokens, cache.max_length)
        x = self._embed(class_labels, tokens)
        if start + x.shape[1] > cache.max_length:
            raise InvalidValueError(f"positions {start}..{start + x.shape[1] - 1} do not fit a cache of "
                             f"{cache.max_length} positions")
        if x.shape[0] != cache.batch_size:
            raise InvalidValueError(f"batch of {x.shape[0]} for a cache of batch size {cache.batch_size}")
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        return self._run(x, positions, cache)

    def prefill(self, class_labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Write the class token at position 0; return the logits (B, vocab_size) of image token 0."""
        return self.forward_cached(cache, 0, class_labels=class_labels)[:, 0]

    def decode_step(self, tokens: torch.Tensor, position: Union[int, torch.Tensor], cache: KVCache) -> torch.Tensor:
        """Feed one image token per row (``tokens`` (B,) = image token ``position - 1``) at sequence ``position``;
        return the logits (B, vocab_size) of image token ``position``. ``position`` may be a one-element tensor (no
        host sync, one compiled graph for every step)."""
        if isinstance(position, int):
            if not 1 <= position < cache.max_length:
                raise InvalidValueError(f"position must be in [1, {cache.max_length - 1}], got {position}")
            position = torch.tensor([position], device=tokens.device)
        return self._decode(tokens, position.reshape(1), cache.keys, cache.values)

    def _decode(self, tokens: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        # Static shapes throughout: this is what compile_decode=True hands to torch.compile.
        x = self.embedding_dropout(self.token_embedding(tokens.reshape(-1, 1)))
        return self._run(x, position, KVCache(keys, values))[:, 0]

    def _decode_eager(self, tokens: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """The decode step without compilation: attention reads only the written part of the cache (views of it, so
        this token's keys/values still land in the static buffers) and needs no mask, which makes a step 1.2x
        faster on CPU than attending to the whole masked buffer."""
        end = position + 1
        view = KVCache([k[:, :, :end] for k in cache.keys], [v[:, :, :end] for v in cache.values])
        x = self.embedding_dropout(self.token_embedding(tokens.reshape(-1, 1)))
        where = torch.tensor([position], device=tokens.device)
        return self._run(x, where, view, attend_to_whole_cache=True)[:, 0]

    def decode_block(self, tokens: torch.Tensor, first_index: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The block step of speculative Jacobi decoding (:class:`vfmtok.generators.sampling.BlockDecoder`): row b's
        image tokens ``first_index[b] .. first_index[b] + k - 1`` (``tokens`` (B, k)) at sequence positions
        ``first_index + 1 ..``, written to ``cache``; returns logits (B, k, vocab_size), ``[:, j]`` predicting image
        token ``first_index[b] + j + 1``."""
        positions = first_index[:, None] + 1 + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding_dropout(self.token_embedding(tokens))
        return self._run(x, positions, cache)

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        class_labels: torch.Tensor,
        guidance_scale: float = 1.0,
        guidance_schedule: str = "constant",
        guidance_power: float = 2.75,
        guidance_interval: Optional[int] = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: Optional[torch.Generator] = None,
        use_kv_cache: bool = True,
        compile_decode: bool = False,
        return_logits: bool = False,
        step_callback: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
        sjd_window: Optional[int] = None,
        return_sjd_stats: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """Sample ``num_tokens`` image tokens per class label (B,) (a tensor or a list of ints) -> LongTensor
        (B, num_tokens), raster order.

        Classifier-free guidance is on when ``guidance_scale != 1``: the batch is [cond; uncond] (uncond = the null
        class ``num_classes``), the logits combine as ``l = l_u + s_t (l_c - l_u)`` with s_t from
        :meth:`guidance_scales`, and the sampled token is fed to both halves. Once s_t is 1 for good (after
        ``guidance_interval`` tokens) the unconditional half is no longer computed. ``guidance_scale = 0`` samples
        unconditionally; with ``guidance_scale == 1`` every schedule gives s_t = 1 and only the conditional half runs.
        Each step then divides by ``temperature``, keeps the ``top_k`` most likely tokens (0 = all) and the ``top_p``
        nucleus (1 = all), and draws from the softmax with ``torch.multinomial(generator=generator)`` (a generator on
        the model's device, or None for torch's global RNG).

        use_kv_cache: static cache, prefill of the class token then one token per step; False recomputes the full
        prefix every step (reference / speed comparison). compile_decode: wrap the one-token decode step in
        torch.compile (static shapes; meant for GPUs). return_logits: also return the guided logits (B, num_tokens,
        vocab_size) each token was sampled from (before temperature and filtering). step_callback(t, tokens): called
        after token ``t`` is sampled with the (B, num_tokens) buffer (positions after ``t`` are 0); a returned
        tensor replaces the buffer, so the next tokens condition on a replaced token ``t`` (with the KV cache,
        earlier positions are already encoded and a change there only affects the output).
        sjd_window: speculative Jacobi decoding (:mod:`vfmtok.generators.sampling`) with this many draft tokens per
        step (None: one token per step). It samples the same distribution as plain decoding (the same guidance
        schedule, temperature, top-k and top-p), in fewer model calls; it needs the KV cache and takes neither
        ``compile_decode``, ``return_logits`` nor ``step_callback``; with guidance both halves run at every step.
        return_sjd_stats: with ``sjd_window``, also return the :class:`~vfmtok.generators.sampling.SJDStats` (block
        steps and tokens accepted per step).
        The model is put in eval mode for the call and restored afterwards.
        """
        class_labels = class_label_tensor(class_labels)  # refuses floats (no silent truncation of 1.5) and bools
        self._check_labels(class_labels, allow_null=False)
        scales = self.guidance_scales(guidance_scale, guidance_schedule, guidance_power, guidance_interval)
        guidance_scale = float(guidance_scale)
        temperature, top_p = self._check_sampler(temperature, top_k, top_p)
        self._check_decode_request(sjd_window, return_sjd_stats, use_kv_cache=use_kv_cache,
                                   compile_decode=compile_decode, return_logits=return_logits,
                                   step_callback=step_callback)

        total, batch = self.num_tokens, len(class_labels)
        device = self.token_embedding.weight.device
        labels = class_labels.to(device)
        guided_steps = 0
        if guidance_scale != 1.0:
            guided_steps = total if guidance_interval is None else min(guidance_interval, total)
        if guided_steps:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
        all_logits = torch.empty(batch, total, self.config.vocab_size, device=device) if return_logits else None

        if sjd_window is not None:
            with self._sampling_mode():
                tokens, stats = self._generate_sjd(self.allocate_kv_cache(len(labels), total), labels, batch, scales,
                                                   bool(guided_steps), temperature, top_k, top_p, generator,
                                                   sjd_window)
            return (tokens, stats) if return_sjd_stats else tokens
        with self._sampling_mode():
            if use_kv_cache:
                cache = self.allocate_kv_cache(len(labels), total)
                positions = torch.arange(total, device=device)
                # torch.compile caches the graphs by code object and guards: wrapping again per call recompiles
                # nothing for the same model and shapes (the narrowed CFG-off batch adds a second graph).
                decode = torch.compile(self._decode, dynamic=False) if compile_decode else None
            for t in range(total):
                rows = len(labels) if t < guided_steps else batch
                if use_kv_cache:
                    if t == 0:
                        logits = self.prefill(labels, cache)
                    else:
                        step_cache = cache if rows == cache.batch_size else cache.narrow(rows)
                        previous = tokens[:, t - 1].repeat(rows // batch)
                        if compile_decode:
                            logits = decode(previous, positions[t:t + 1], step_cache.keys, step_cache.values)
                        else:
                            logits = self._decode_eager(previous, t, step_cache)
                else:
                    prefix = tokens[:, :t].repeat(rows // batch, 1)
                    logits = self._run(self._embed(labels[:rows], prefix))[:, -1]
                if rows > batch:
                    cond, uncond = logits[:batch], logits[batch:]
                    logits = uncond + scales[t] * (cond - uncond)
                if all_logits is not None:
                    all_logits[:, t] = logits
                tokens[:, t] = self._sample(logits, temperature, top_k, top_p, generator)
                if step_callback is not None:
                    self._apply_step_callback(step_callback, t, tokens)
        return (tokens, all_logits) if return_logits else tokens

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
            "grid": [self.grid_size, self.grid_size],
            "vocab_size": c.vocab_size,
            "num_classes": c.num_classes,
            "null_class": self.null_class,
            "dim": c.dim,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "head_dim": self.head_dim,
            "ffn_hidden_dim": ffn_hidden_dim(c.dim, c.ffn_multiple_of, c.ffn_dim_multiplier),
            "class_token_rope": c.class_token_rope,
            "parameters_by_part": {name: count for name, module in self.named_children()
                                   if (count := sum(p.numel() for p in module.parameters()))},
        }
