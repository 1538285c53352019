"""The interface of the autoregressive generators over discrete codes: what the AR pipeline, ``vfmtok sample``,
``vfmtok benchmark``, ``vfmtok train ar`` and the quickstart may rely on, whichever family (the LlamaGen-style
:class:`vfmtok.generators.gpt.GPTModel`, the RAR :class:`vfmtok.generators.rar.RARModel`) is behind it. It plays the
part :class:`vfmtok.tokenizer.interface.ImageTokenizerMixin` plays for the tokenizers.

A family lists :class:`AutoregressiveGeneratorMixin` among its bases and provides:

* ``config`` with ``vocab_size``, ``num_tokens``, ``num_classes`` (and optionally ``codebook_sizes``);
* ``forward(tokens, class_labels)`` -> logits (B, T, vocab_size) with ``logits[:, t]`` predicting ``tokens[:, t]``
  (teacher forcing in the family's own generation order; label dropout and, for RAR, order randomisation in training
  mode): the training loss of every family is ``cross_entropy(logits, tokens)``;
* ``generate(class_labels, guidance_scale, guidance_schedule, guidance_power, guidance_interval, temperature, top_k,
  top_p, generator, use_kv_cache, compile_decode, step_callback)`` -> (B, num_tokens) codes in raster order;
* for speculative Jacobi decoding (``supports_sjd = True``; ``generate(sjd_window=...)``): ``prefill(labels, cache)``
  -> logits (B, vocab) of token 0 and ``decode_block(tokens, first_index, cache)``
  (:class:`vfmtok.generators.sampling.BlockDecoder` with a cache), which :meth:`_generate_sjd` drives;
* ``default_sampling`` (the sampler options ``generate`` uses unless told otherwise: the family's published recipe);
* optionally ``on_train_step(step)`` (per-step training schedules, e.g. RAR's randomness annealing) and
  ``no_weight_decay_parameters()`` (parameter names AdamW must not decay).

The helpers below (the guidance schedules, top-k / top-p filtering, drawing a token) are the one implementation every
family samples with.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.types import finite_number
from vfmtok.generators.sampling import (SJDStats, filter_logits, sample_tokens, speculative_jacobi_decode,
                                        token_probabilities)

__all__ = ["AutoregressiveGeneratorMixin", "GUIDANCE_SCHEDULES", "SAMPLING_OPTIONS", "filter_logits",
           "sample_from_logits"]

GUIDANCE_SCHEDULES = ("constant", "linear", "cosine_power", "interval")
# The sampler options of ``generate`` that have family defaults (``default_sampling``) and pipeline defaults.
SAMPLING_OPTIONS = ("guidance_schedule", "guidance_power", "guidance_interval", "temperature", "top_k", "top_p")


def sample_from_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` (B, vocab): divide by ``temperature``, filter (:func:`filter_logits`), draw
    from the softmax with ``torch.multinomial(generator=generator)``."""
    return sample_tokens(token_probabilities(logits, temperature, top_k, top_p), generator)


class AutoregressiveGeneratorMixin:
    """Shared sampling arithmetic and the facts a pipeline checks (see the module docstring)."""

    # The sampler options ``generate`` uses when a caller gives none; families override with their recipe.
    default_sampling: dict[str, Any] = {"guidance_schedule": "constant", "guidance_power": 2.75,
                                        "guidance_interval": None, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    # ``generate(sjd_window=...)``: speculative Jacobi decoding (vfmtok.generators.sampling) over a block decode step
    supports_sjd: bool = False

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def null_class(self) -> int:
        """The class id of the unconditional (dropped) label: ``num_classes``."""
        return self.config.num_classes

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """The codebooks of the vocabulary (one entry for a single codebook)."""
        return tuple(self.config.get("codebook_sizes") or (self.config.vocab_size,))

    def on_train_step(self, step: int) -> None:
        """Called by ``vfmtok train ar`` before every update with the number of updates done so far."""

    def no_weight_decay_parameters(self) -> set[str]:
        """Names of parameters AdamW leaves undecayed besides the 1-D ones (biases, norms)."""
        return set()

    def sampling_options(self, **given: Any) -> dict[str, Any]:
        """``default_sampling`` updated with the options given (None = not given), checked."""
        unknown = sorted(set(given) - set(SAMPLING_OPTIONS))
        if unknown:
            raise InvalidValueError(f"unknown sampler option(s) {unknown}; known: {list(SAMPLING_OPTIONS)}")
        options = {**self.default_sampling, **{k: v for k, v in given.items() if v is not None}}
        return options

    def guidance_scales(self, guidance_scale: float, guidance_schedule: str = "constant",
                        guidance_power: float = 2.75, guidance_interval: Optional[int] = None) -> list[float]:
        """The CFG scale s_t used for image token t = 0 .. num_tokens - 1 (t tokens already generated), T = num_tokens:

        * constant: s_t = s (LlamaGen);
        * linear: s_t = 1 + (s - 1) * t / T (ramp from no guidance; the MAR / VAR idea);
        * cosine_power: s_t = 1 + (s - 1) * (1 - cos(pi * (t / T) ** power)) / 2 (RAR's "power-cosine", same t / T);
        * interval: s_t = s for t < guidance_interval, then 1.

        ``guidance_interval`` (with any schedule) sets s_t = 1 from token ``guidance_interval`` on. LlamaGen's
        ``cfg_interval = k`` guides tokens 0 .. k + 1, i.e. ``guidance_interval = k + 2``.
        """
        self._check_guidance(guidance_scale, guidance_schedule, guidance_power, guidance_interval)
        guidance_scale, guidance_power = float(guidance_scale), float(guidance_power)
        total = self.num_tokens
        scales = []
        for t in range(total):
            if guidance_schedule == "linear":
                s = 1.0 + (guidance_scale - 1.0) * t / total
            elif guidance_schedule == "cosine_power":
                s = 1.0 + (guidance_scale - 1.0) * (1.0 - math.cos(math.pi * (t / total) ** guidance_power)) / 2.0
            else:
                s = float(guidance_scale)
            if guidance_interval is not None and t >= guidance_interval:
                s = 1.0
            scales.append(s)
        return scales

    def _check_guidance(self, guidance_scale, guidance_schedule, guidance_power, guidance_interval) -> None:
        guidance_scale = finite_number("guidance_scale", guidance_scale)
        guidance_power = finite_number("guidance_power", guidance_power)
        if guidance_scale < 0:
            raise InvalidValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise InvalidValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if guidance_power <= 0:
            raise InvalidValueError(f"guidance_power must be > 0, got {guidance_power}")
        if guidance_schedule == "interval" and guidance_interval is None:
            raise InvalidValueError("guidance_schedule='interval' needs guidance_interval (the number of guided "
                                    "tokens)")
        if guidance_interval is not None and not (isinstance(guidance_interval, int) and guidance_interval >= 0):
            raise InvalidValueError(f"guidance_interval must be an integer >= 0 (number of guided tokens), "
                                    f"got {guidance_interval!r}")

    @staticmethod
    def _check_sampler(temperature: float, top_k: int, top_p: float) -> tuple[float, float]:
        temperature = finite_number("temperature", temperature)
        top_p = finite_number("top_p", top_p)
        if temperature <= 0:
            raise InvalidValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(top_k, int) or top_k < 0:
            raise InvalidValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise InvalidValueError(f"top_p must be in (0, 1], got {top_p}")
        return temperature, top_p

    def _check_labels(self, class_labels: torch.Tensor, allow_null: bool) -> None:
        if not isinstance(class_labels, torch.Tensor) or class_labels.ndim != 1 or class_labels.is_floating_point() \
                or class_labels.dtype == torch.bool:
            raise InvalidValueError(f"class_labels must be a 1-D integer tensor, got "
                                    f"{getattr(class_labels, 'shape', type(class_labels))}"
                                    + (f" of dtype {class_labels.dtype}" if isinstance(class_labels, torch.Tensor)
                                       else ""))
        high = self.config.num_classes + int(allow_null)
        bad = class_labels[(class_labels < 0) | (class_labels >= high)]
        if bad.numel():
            raise InvalidValueError(f"class ids {bad.unique().tolist()[:10]} are outside [0, {high})"
                                    + (" (the null class is num_classes)" if allow_null else ""))

    def _check_tokens(self, tokens: torch.Tensor, max_tokens: int) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
            raise InvalidValueError(f"tokens must be a (B, T) integer tensor, got "
                                    f"{getattr(tokens, 'shape', type(tokens))}")
        if tokens.shape[1] > max_tokens:
            raise InvalidValueError(f"got {tokens.shape[1]} tokens; at most {max_tokens} fit here")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)].unique().tolist()[:10]
            raise InvalidValueError(f"token ids {bad} are outside [0, {self.config.vocab_size})")

    def _apply_step_callback(self, step_callback, t: int, tokens: torch.Tensor) -> None:
        """``generate``'s ``step_callback(t, tokens)`` after token ``t``: a returned tensor replaces the buffer."""
        replaced = step_callback(t, tokens)
        if replaced is not None:
            self._check_tokens(replaced, tokens.shape[1])
            if tuple(replaced.shape) != tuple(tokens.shape):
                raise InvalidValueError(f"step_callback returned tokens of shape {tuple(replaced.shape)}, expected "
                                        f"{tuple(tokens.shape)}")
            tokens.copy_(replaced)

    @contextmanager
    def _sampling_mode(self) -> Iterator[None]:
        """``generate`` runs in eval mode; the caller's mode is restored afterwards, also after an error."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @staticmethod
    def _check_decode_request(sjd_window: Optional[int], return_sjd_stats: bool, *, use_kv_cache: bool,
                              compile_decode: bool = False, return_logits: bool = False,
                              step_callback: Any = None) -> None:
        """``generate``'s decoding arguments: a compiled decode step needs the KV cache; an SJD window is >= 1, with
        the KV cache and none of the per-step options."""
        if compile_decode and not use_kv_cache:
            raise InvalidValueError("compile_decode=True compiles the KV-cached decode step: it needs "
                                    "use_kv_cache=True")
        if sjd_window is None:
            if return_sjd_stats:
                raise InvalidValueError("return_sjd_stats needs sjd_window")
            return
        if not use_kv_cache or compile_decode or return_logits or step_callback is not None:
            raise InvalidValueError("sjd_window (speculative Jacobi decoding) needs use_kv_cache=True and takes "
                                    "no compile_decode, return_logits or step_callback")
        if isinstance(sjd_window, bool) or not isinstance(sjd_window, int) or sjd_window < 1:
            raise InvalidValueError(f"sjd_window must be an integer >= 1 (draft tokens per step), got {sjd_window!r}")

    def _generate_sjd(self, cache: Any, labels: torch.Tensor, batch: int, scales: list[float], guided: bool,
                      temperature: float, top_k: int, top_p: float, generator: Optional[torch.Generator],
                      window: int) -> tuple[torch.Tensor, SJDStats]:
        """``generate`` by speculative Jacobi decoding over the family's ``prefill`` and ``decode_block`` with an
        empty ``cache`` of ``len(labels)`` rows (labels: [cond; null class] when ``guided``). Both halves run at
        every step; the guidance scale of each logit is that of the token it predicts (``scales[t]``)."""
        total, device = self.num_tokens, labels.device
        scale_of = torch.tensor(scales, device=device)

        def guide(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
            if not guided:
                return logits
            cond, uncond = logits[:batch], logits[batch:]
            return uncond + scale_of[predicted.clamp(max=total - 1)][..., None] * (cond - uncond)

        def decode(tokens: torch.Tensor, first_index: torch.Tensor) -> torch.Tensor:
            copies = len(labels) // batch
            logits = self.decode_block(tokens.repeat(copies, 1), first_index.repeat(copies), cache)
            return guide(logits, first_index[:, None] + 1 + torch.arange(tokens.shape[1], device=device))

        first = guide(self.prefill(labels, cache)[:, None], torch.zeros(batch, 1, dtype=torch.long, device=device))
        return speculative_jacobi_decode(decode, first[:, 0], total,
                                         lambda logits: token_probabilities(logits, temperature, top_k, top_p),
                                         window=window, generator=generator)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        return sample_from_logits(logits, temperature, top_k, top_p, generator)
