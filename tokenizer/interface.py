"""The tokenizer interface: what stage two, extraction, training, the pipelines and evaluation may rely on.

Every tokenizer family implements :class:`ImageTokenizerMixin`; nothing outside ``tokenizer/`` reaches into a
family's modules. Images are ``(B, 3, H, W)`` tensors in ``[-1, 1]``.

* A **discrete** tokenizer (``is_discrete``) encodes to ``(B, code_layout.num_tokens)`` integer codes in
  ``[0, code_layout.vocab_size)``, which is also the sequence an AR generator models.
* A **continuous** tokenizer encodes to latents of shape ``(B, *latent_shape)``, what a flow denoiser models.

Code layout with several codebooks (``len(codebook_sizes) > 1``): every grid cell holds one code of each codebook,
stored next to each other (``tokens_per_position = K``), so token ``p * K + k`` is cell ``p``'s code of codebook
``k``, offset by ``sum(codebook_sizes[:k])``. One embedding table of ``vocab_size = sum(codebook_sizes)`` rows then
serves every codebook, and an AR generator predicts the codes of a cell one after the other.

Loading a saved tokenizer folder (:func:`load_tokenizer`) dispatches on the class recorded in its ``config.json``.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers.configuration_utils import ConfigMixin

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.loading import read_saved_config

__all__ = ["CodeLayout", "ImageTokenizerMixin", "TOKENIZER_CLASSES", "load_tokenizer", "tokenizer_class"]


@dataclass(frozen=True)
class CodeLayout:
    """How the codes of a discrete tokenizer are laid out (see the module docstring)."""

    grid: tuple[int, int]  # (rows, columns) of code positions, raster order
    codebook_sizes: tuple[int, ...]  # one entry per codebook

    def __post_init__(self):
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise InvalidValueError(f"a code grid needs two positive sizes, got {self.grid}")
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise InvalidValueError(f"codebook sizes must be positive, got {self.codebook_sizes}")

    @property
    def tokens_per_position(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_tokens(self) -> int:
        """Length of the code sequence of one image."""
        return self.grid[0] * self.grid[1] * self.tokens_per_position

    @property
    def vocab_size(self) -> int:
        """Size of the one vocabulary every code lies in (the codebooks side by side)."""
        return sum(self.codebook_sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "codebook_sizes": list(self.codebook_sizes),
                "tokens_per_position": self.tokens_per_position, "num_tokens": self.num_tokens,
                "vocab_size": self.vocab_size}


class ImageTokenizerMixin:
    """The interface of every tokenizer family (list it among the bases of the model class).

    Families implement the abstract members; the helpers below are built on them.
    """

    # -- what the family provides ------------------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        raise NotImplementedError

    @property
    def code_layout(self) -> CodeLayout:
        """Discrete tokenizers: the layout of the codes."""
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Continuous tokenizers: the shape of one image's latent, e.g. (channels, height, width)."""
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        """Side of the square images the tokenizer is trained on (inputs of other sizes are resized inside)."""
        raise NotImplementedError

    @property
    def output_size(self) -> int:
        """Side of the images :meth:`decode` returns when no ``output_size`` is given."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, num_tokens) or latents (B, *latent_shape)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, output_size: Optional[int] = None) -> torch.Tensor:
        """Codes or latents -> images (B, 3, S, S) in [-1, 1]; ``S = output_size or self.output_size``."""
        raise NotImplementedError

    def decode_unclamped(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's output at ``output_size`` before clamping to [-1, 1] (the official evaluation scripts resize
        it as it is). Families that do not expose it return :meth:`decode`'s clamped images."""
        return self.decode(tokens)

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        """The weight of the decoder's last layer (taming's adaptive GAN weight balances gradients there)."""
        raise NotImplementedError

    @property
    def frozen_encoder(self):
        """The frozen pretrained encoder (a :class:`vfmtok.tokenizer.vfm.FrozenVFM`), or None for a tokenizer trained from
        scratch. REPA aligns a denoiser with its features; the feature cache stores them."""
        return None

    def load_vfm_weights(self, source: Optional[str] = None) -> None:
        """Load the frozen encoder's pretrained weights (default: the source its config names). Families without a
        frozen encoder do not implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen encoder")

    def codebook_usage(self) -> Optional[float]:
        """Fraction of the codebook(s) used recently in training (discrete), or None."""
        return None

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Code sequence length (discrete) or number of latent positions (continuous)."""
        if self.is_discrete:
            return self.code_layout.num_tokens
        return math.prod(self.latent_shape[1:])

    def token_shape(self) -> tuple[int, ...]:
        """The shape of one image's encoding: ``(num_tokens,)`` or ``latent_shape``."""
        return (self.code_layout.num_tokens,) if self.is_discrete else tuple(self.latent_shape)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise InvalidValueError when ``tokens`` is not a batch of this tokenizer's codes / latents."""
        expected = self.token_shape()
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != len(expected) + 1 or \
                tuple(tokens.shape[1:]) != expected:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            what = "token indices" if self.is_discrete else "latents"
            raise InvalidValueError(f"expected {what} of shape (B, {', '.join(map(str, expected))}), got {got}")
        if self.is_discrete:
            if tokens.dtype not in (torch.int32, torch.int64):
                raise InvalidValueError(f"token indices must be integers, got {tokens.dtype}")
            vocab = self.code_layout.vocab_size
            if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
                raise InvalidValueError(f"token indices must lie in [0, {vocab}), got values in "
                                        f"[{int(tokens.min())}, {int(tokens.max())}]")

    def tokenizer_summary(self) -> dict[str, Any]:
        """The interface facts as a JSON-ready dict (``vfmtok describe``, model cards, extraction metadata)."""
        summary: dict[str, Any] = {"class": type(self).__name__, "discrete": self.is_discrete,
                                   "input_size": self.input_size, "output_size": self.output_size}
        if self.is_discrete:
            summary["code_layout"] = self.code_layout.to_dict()
        else:
            summary["latent_shape"] = list(self.latent_shape)
        return summary


# Class name in a tokenizer's config.json (``_class_name``) -> "module:attribute"; imported on demand.
TOKENIZER_CLASSES: dict[str, str] = {
    "VFMTokModel": "vfmtok.tokenizer.vfmtok:VFMTokModel",
    "DINOTokModel": "vfmtok.tokenizer.dinotok:DINOTokModel",
    "GloTokModel": "vfmtok.tokenizer.glotok:GloTokModel",
}


def tokenizer_class(name: str) -> type:
    if name not in TOKENIZER_CLASSES:
        raise InvalidValueError(f"unknown tokenizer class {name!r}; known: {sorted(TOKENIZER_CLASSES)}")
    module, attribute = TOKENIZER_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), attribute)


class _ConfigFile(ConfigMixin):
    """Reads a model folder's config.json (local or from the Hub) through diffusers."""

    config_name = "config.json"


def load_tokenizer(pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
    """Load a saved tokenizer (a ``save_pretrained`` folder or Hub repo id) as the class its ``config.json`` names;
    ``kwargs`` go to that class's ``from_pretrained``."""
    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    config = read_saved_config(_ConfigFile, pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
    name = config.get("_class_name")
    if name is None:
        raise InvalidValueError(f"{pretrained_model_name_or_path}: config.json names no model class (_class_name)")
    return tokenizer_class(name).from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
