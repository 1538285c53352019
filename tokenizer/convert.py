"""Convert the official VFMTok / VFMAE checkpoints (CVMI-Lab/VFMTok, CVMI-Lab/VFMTok2) to :class:`VFMTokModel`.

The official training scripts save ``torch.save({"model": ..., "ema": ..., "optimizer": ..., ...})``; the tokenizer
weights are taken from ``"ema"`` when present (the released models are evaluated with EMA), else ``"model"`` /
``"state_dict"`` / the file itself. Key mapping, reference -> ours (everything below the named prefix is unchanged):

=====================================================  ===========================================================
reference (VFMTok ``VQModel`` / VFMTok2 ``AutoencoderAE``)   this project (``VFMTokModel``)
=====================================================  ===========================================================
``encode_transformer.backbone.*``                      dropped: the frozen VFM, loaded from the config's ``vfm``
``encode_transformer.projectors.{i}.mlp.{j}.*``        ``encoder.level_proj.{i}.{j}.*``
``encode_transformer.norm_layers.{i}.*``               ``encoder.level_norm.{i}.*``
``encode_transformer.carrier_tokens``                  ``encoder.queries``
``encode_transformer.slots_pos``                       ``encoder.query_pos``
``encode_transformer.norm_pre1.*``                     ``encoder.query_norm.*``
``encode_transformer.transformer.layers.{k}.*``        ``encoder.layers.{k}.*`` (cross_attn, self_attn, norm1-3,
                                                       linear1-2 as in Deformable-DETR)
``pre_slots_quant.*``                                  ``quant_proj.*`` (VQ: Linear dim -> code_dim)
``slot_quantize.embedding.weight``                     ``quantizer.embedding.weight``
``slot_quantize.codebook_used``                        dropped: a training statistic (usage window)
``slots_quant.norm_out.*`` / ``slots_quant.conv_out.*``  ``quant_proj.norm.*`` / ``quant_proj.conv.*`` (VFMAE)
``post_slots_quant.*``                                 ``post_quant_proj.*``
``decode_transformer.norm_post1.*``                    ``decoder.pixel_norm.*``
``decode_transformer.norm_post2.*``                    ``decoder.semantic_norm.*``
``decode_transformer.mask_dino`` / ``.dino_mask``      ``decoder.semantic_mask_embedding``
``decode_transformer.dino_transformer.*``              ``decoder.semantic_transformer.*`` (VFMAE)
``decode_transformer.proj.*``                          ``decoder.semantic_proj.*``
``decode_transformer.*`` (other)                       ``decoder.*`` (position_embedding, slot_position_embedding,
                                                       mask_embedding, cls_token, register_tokens, transformer.layers)
``...ffnet.w1`` + ``...ffnet.w2`` (xformers, unpacked)  ``...ffnet.w12`` (concatenated: gate first)
``decoder.*`` (the CNN)                                ``pixel_decoder.*``
=====================================================  ===========================================================

``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped first.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from vfmtok.tokenizer.utils.loading import RenameRules, load_state_dict_strict, read_training_checkpoint, rename_state_dict

__all__ = ["load_reference_checkpoint", "convert_reference_state_dict", "convert_reference_checkpoint"]

_RULES: RenameRules = [
    (r"^encode_transformer\.backbone\..*", None),
    (r"^slot_quantize\.codebook_used$", None),
    (r"^encode_transformer\.projectors\.(\d+)\.mlp\.(.*)$", r"encoder.level_proj.\1.\2"),
    (r"^encode_transformer\.norm_layers\.(.*)$", r"encoder.level_norm.\1"),
    (r"^encode_transformer\.carrier_tokens$", r"encoder.queries"),
    (r"^encode_transformer\.slots_pos$", r"encoder.query_pos"),
    (r"^encode_transformer\.norm_pre1\.(.*)$", r"encoder.query_norm.\1"),
    (r"^encode_transformer\.transformer\.layers\.(.*)$", r"encoder.layers.\1"),
    (r"^pre_slots_quant\.(.*)$", r"quant_proj.\1"),
    (r"^slot_quantize\.embedding\.weight$", r"quantizer.embedding.weight"),
    (r"^slots_quant\.norm_out\.(.*)$", r"quant_proj.norm.\1"),
    (r"^slots_quant\.conv_out\.(.*)$", r"quant_proj.conv.\1"),
    (r"^post_slots_quant\.(.*)$", r"post_quant_proj.\1"),
    (r"^decode_transformer\.norm_post1\.(.*)$", r"decoder.pixel_norm.\1"),
    (r"^decode_transformer\.norm_post2\.(.*)$", r"decoder.semantic_norm.\1"),
    (r"^decode_transformer\.(?:mask_dino|dino_mask)$", r"decoder.semantic_mask_embedding"),
    (r"^decode_transformer\.dino_transformer\.(.*)$", r"decoder.semantic_transformer.\1"),
    (r"^decode_transformer\.proj\.(.*)$", r"decoder.semantic_proj.\1"),
    (r"^decode_transformer\.((?:position_embedding|slot_position_embedding|mask_embedding|cls_token|"
     r"register_tokens)|transformer\.layers\..*)$", r"decoder.\1"),
    (r"^decoder\.(.*)$", r"pixel_decoder.\1"),
]


def load_reference_checkpoint(path: str | Path, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read an official VFMTok / VFMAE checkpoint safely and return the tokenizer state dict in it."""
    return read_training_checkpoint(path, prefer)


def _pack_swiglu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """xformers' unpacked SwiGLU stores w1 (gate) and w2 (value) separately; ours fuses them into w12."""
    for key in [k for k in state if re.search(r"\.ffnet\.w1\.(weight|bias)$", k)]:
        twin = key.replace(".ffnet.w1.", ".ffnet.w2.")
        if twin in state:
            state[key.replace(".ffnet.w1.", ".ffnet.w12.")] = torch.cat([state.pop(key), state.pop(twin)], dim=0)
    return state


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official state dict to this project's layout. Returns (converted, dropped keys).

    Raises CheckpointError listing every key that no rule knows (a mistaken file is never half-converted).
    """
    converted, dropped = rename_state_dict(state_dict, _RULES, "VFMTok/VFMAE")
    return _pack_swiglu(converted), list(dropped)


def convert_reference_checkpoint(checkpoint: str | Path, model, prefer: str = "ema") -> list[str]:
    """Load an official checkpoint file into ``model`` (a VFMTokModel built from the matching config), strictly.

    Returns the dropped keys (frozen VFM weights and statistics). A missing, unexpected or mis-shaped weight raises.
    """
    converted, dropped = convert_reference_state_dict(load_reference_checkpoint(checkpoint, prefer))
    load_state_dict_strict(model, converted, source=str(checkpoint),
                           hint="Check that the config matches the checkpoint.")
    return dropped
