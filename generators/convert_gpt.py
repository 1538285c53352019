"""Convert official LlamaGen / VFMTok class-conditional GPT checkpoints (``autoregressive/models/gpt.py``) to
:class:`vfmtok.generators.gpt.GPTModel`.

The training scripts save ``torch.save({"model": ..., "ema": ..., "optimizer": ..., "steps": ...})``; DeepSpeed runs
save ``{"module": ...}``, FSDP runs a bare state dict. ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes
are stripped first. Key mapping, reference -> ours (every tensor is copied unchanged):

==============================================  ==================================================
reference (LlamaGen ``Transformer``, c2i)       this project (``GPTModel``)
==============================================  ==================================================
``cls_embedding.embedding_table.weight``        ``class_embedding.weight`` (num_classes + 1 rows)
``tok_embeddings.weight``                       ``token_embedding.weight``
``layers.{i}.attention_norm.weight``            ``blocks.{i}.attention_norm.weight``
``layers.{i}.attention.wqkv.weight``            ``blocks.{i}.attention.qkv.weight``
``layers.{i}.attention.wo.weight``              ``blocks.{i}.attention.proj.weight``
``layers.{i}.ffn_norm.weight``                  ``blocks.{i}.ffn_norm.weight``
``layers.{i}.feed_forward.w1.weight``           ``blocks.{i}.ffn.gate_proj.weight``
``layers.{i}.feed_forward.w3.weight``           ``blocks.{i}.ffn.up_proj.weight``
``layers.{i}.feed_forward.w2.weight``           ``blocks.{i}.ffn.down_proj.weight``
``norm.weight``                                 ``norm.weight``
``output.weight``                               ``head.weight``
``freqs_cis``                                   dropped (recomputed: ``GPTModel.rope``)
``layers.{i}.attention.kv_cache.{k,v}_cache``   dropped (sampling buffers saved after ``setup_caches``)
==============================================  ==================================================

Text-conditional (t2i) checkpoints (``cls_embedding.cap_proj.*``, ``uncond_embedding``) are not supported: their keys
are reported as unknown. Released c2i models use ``cls_token_num = 1`` and the zero class-token rotation, i.e.
``class_token_rope: zero`` (configs/ar/gpt-*.yaml).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from vfmtok.tokenizer.utils.errors import CheckpointError
from vfmtok.tokenizer.utils.loading import RenameRules, read_training_checkpoint, rename_state_dict

__all__ = ["CheckpointError", "load_llamagen_checkpoint", "convert_llamagen_state_dict",
           "convert_llamagen_checkpoint"]

_RULES: RenameRules = [
    (r"^freqs_cis$", None),
    (r"^layers\.(\d+)\.attention\.kv_cache\.[kv]_cache$", None),
    (r"^cls_embedding\.embedding_table\.weight$", r"class_embedding.weight"),
    (r"^tok_embeddings\.weight$", r"token_embedding.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"blocks.\1.attention_norm.weight"),
    (r"^layers\.(\d+)\.attention\.wqkv\.weight$", r"blocks.\1.attention.qkv.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"blocks.\1.attention.proj.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"blocks.\1.ffn_norm.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"blocks.\1.ffn.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"blocks.\1.ffn.up_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"blocks.\1.ffn.down_proj.weight"),
    (r"^norm\.weight$", r"norm.weight"),
    (r"^output\.weight$", r"head.weight"),
]


def load_llamagen_checkpoint(path: str | Path, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read an official GPT checkpoint safely (``torch.load(weights_only=True)``) and return the state dict in it:
    ``prefer`` (``"ema"`` or ``"model"``), then ``"ema"``, ``"model"``, ``"module"`` (DeepSpeed), ``"state_dict"``,
    or the file itself when it is a flat dict of tensors."""
    return read_training_checkpoint(path, prefer, containers=("ema", "model", "module", "state_dict"), what="GPT")


def convert_llamagen_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a LlamaGen / VFMTok GPT state dict to :class:`GPTModel`'s layout. Returns (converted, dropped keys).

    Raises CheckpointError listing every key no rule knows (a mistaken file is never half-converted).
    """
    converted, dropped = rename_state_dict(state_dict, _RULES, "class-conditional LlamaGen GPT")
    return converted, list(dropped)


def convert_llamagen_checkpoint(checkpoint: str | Path, model, prefer: str = "ema") -> list[str]:
    """Load an official checkpoint file into ``model`` (a GPTModel built from the matching config), strictly.

    Returns the dropped keys. A missing, unexpected or mis-shaped weight raises ValueError naming it.
    """
    converted, dropped = convert_llamagen_state_dict(load_llamagen_checkpoint(checkpoint, prefer))
    model.load_state_dict(converted, strict=True)  # StrictLoadingMixin: names every mismatch
    return dropped
