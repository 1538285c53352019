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
from typing import Mapping, Optional, Sequence

import torch

__all__ = ["load_reference_checkpoint", "convert_reference_state_dict", "convert_reference_checkpoint"]

# (pattern, replacement) applied in order; the first match wins. ``None`` drops the key.
_RULES: list[tuple[str, Optional[str]]] = [
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
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointLoadError(RuntimeError):
    pass


def read_training_checkpoint(path: str | Path, prefer: str = "ema",
                             containers: Sequence[str] = ("ema", "model", "state_dict"),
                             what: str = "tokenizer") -> dict[str, torch.Tensor]:
    """Read a checkpoint saved by a training script safely and return the state dict in it.

    Uses ``torch.load(weights_only=True)``: no code in the file is executed. The weights are looked up under
    ``prefer`` (``"ema"`` or ``"model"``, when the file holds both), then under each of ``containers``, else the file
    must itself be a flat dict of tensors. ``what`` names the weights in error messages.
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's message names the offending global
        raise CheckpointLoadError(
            f"torch.load(weights_only=True) refused {str(path)!r}: {error}\n"
            "The file contains Python objects besides tensors (for example argparse.Namespace training arguments). "
            "Only if you trust where the file comes from, re-save just its tensors with\n"
            "  python -c \"import torch; c = torch.load('IN', map_location='cpu', weights_only=False); "
            "torch.save({k: c[k] for k in ('ema', 'model') if k in c}, 'OUT')\"\n"
            "and convert OUT instead; or allow the specific class with torch.serialization.add_safe_globals."
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointLoadError(f"{str(path)!r} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    for key in (prefer, *containers):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointLoadError(f"{str(path)!r} has no {what} weights: expected one of {list(containers)} or a flat "
                              f"state dict, found keys {sorted(checkpoint)[:10]}")


def load_reference_checkpoint(path: str | Path, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read an official VFMTok / VFMAE checkpoint safely and return the tokenizer state dict in it."""
    return read_training_checkpoint(path, prefer)


def describe_key_mismatch(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = (),
                          converter: str = "tokenizer.convert", limit: int = 10) -> str:
    """The message for weights that do not fit a model: what is missing, unexpected or mis-shaped, and what to do."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing weight(s), e.g. {list(missing)[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {list(unexpected)[:limit]}")
    if mismatched:
        parts.append(f"{len(mismatched)} weight(s) of the wrong shape, e.g. {list(mismatched)[:limit]}")
    return ("checkpoint does not match the model: " + "; ".join(parts) +
            f". Check that the config matches the checkpoint (or convert an official checkpoint with `{converter}`).")


class StrictLoadingMixin:
    """For diffusers ``ModelMixin`` subclasses (list it first among the bases): ``from_pretrained`` and
    ``load_state_dict`` raise ValueError naming every missing, unexpected or mis-shaped weight, where diffusers and
    torch would only warn or fail on the first. ``converter`` names the module that converts official checkpoints."""

    converter = "tokenizer.convert"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        mismatched = [f"{key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in info["mismatched_keys"]]
        if info["missing_keys"] or info["unexpected_keys"] or mismatched:
            raise ValueError(f"{pretrained_model_name_or_path}: " + describe_key_mismatch(
                info["missing_keys"], info["unexpected_keys"], mismatched, converter=cls.converter))
        return (model, info) if want_info else model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        mismatched = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                      for key, value in state_dict.items()
                      if key in own and tuple(value.shape) != tuple(own[key].shape)]
        if mismatched and strict:
            raise ValueError(describe_key_mismatch([], [], mismatched, converter=self.converter))
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise ValueError(describe_key_mismatch(result.missing_keys, result.unexpected_keys,
                                                   converter=self.converter))
        return result


def strip_wrapper_prefixes(key: str) -> str:
    """Remove the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes training wrappers add to keys."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def rename_by_rules(key: str, rules: Sequence[tuple[str, Optional[str]]]) -> tuple[bool, Optional[str]]:
    """Apply the first ``(pattern, replacement)`` rule whose pattern matches ``key`` -> (matched, new name, or None
    when the rule drops the key). Shared by every checkpoint converter of the project."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return True, None if replacement is None else re.sub(pattern, replacement, key)
    return False, None


def _pack_swiglu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """xformers' unpacked SwiGLU stores w1 (gate) and w2 (value) separately; ours fuses them into w12."""
    for key in [k for k in state if re.search(r"\.ffnet\.w1\.(weight|bias)$", k)]:
        twin = key.replace(".ffnet.w1.", ".ffnet.w2.")
        if twin in state:
            state[key.replace(".ffnet.w1.", ".ffnet.w12.")] = torch.cat([state.pop(key), state.pop(twin)], dim=0)
    return state


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official state dict to this project's layout. Returns (converted, dropped keys).

    Raises ValueError listing every key that no rule knows (a mistaken file is never half-converted).
    """
    converted, dropped, unknown = {}, [], []
    for key, tensor in state_dict.items():
        matched, new_key = rename_by_rules(strip_wrapper_prefixes(key), _RULES)
        if not matched:
            unknown.append(key)
        elif new_key is None:
            dropped.append(key)
        else:
            converted[new_key] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) of the checkpoint are not VFMTok/VFMAE weights, e.g. {unknown[:10]}")
    return _pack_swiglu(converted), dropped


def convert_reference_checkpoint(checkpoint: str | Path, model, prefer: str = "ema") -> list[str]:
    """Load an official checkpoint file into ``model`` (a VFMTokModel built from the matching config), strictly.

    Returns the dropped keys (frozen VFM weights and statistics). A missing, unexpected or mis-shaped weight raises.
    """
    converted, dropped = convert_reference_state_dict(load_reference_checkpoint(checkpoint, prefer))
    expected = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in converted.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise ValueError(f"{len(mismatched)} weight(s) have the wrong shape for this config, e.g. {mismatched[:5]}")
    model.load_state_dict(converted, strict=True)
    return dropped
