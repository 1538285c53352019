"""Convert RAR checkpoints (bytedance/1d-tokenizer and CVMI-Lab/VFMTok-RAR ``modeling/rar.py``: the released
``model.safetensors`` / ``*.safetensors`` and ``pytorch_model.bin`` / ``*.bin`` files) to
:class:`vfmtok.generators.rar.RARModel`, and the facts of the VFMTok-RAR releases.

Key mapping, reference -> ours (every tensor copied unchanged, the three position tables squeezed from (1, L, D)):

==================================================  ==================================================
reference (``RAR``)                                 this project (``RARModel``)
==================================================  ==================================================
``cls_token``                                       ``start_token``
``embeddings.weight``                               ``embedding.weight``
``pos_embed``                                       ``position_embedding``
``target_aware_pos_embed``                          ``target_position_embedding``
``timesteps_embeddings``                            ``step_embedding``
``blocks.{i}.norm1.{weight,bias}``                  ``blocks.{i}.norm1.*``
``blocks.{i}.attn.qkv.{weight,bias}``               ``blocks.{i}.attention.qkv.*``
``blocks.{i}.attn.{q,k}_norm.{weight,bias}``        ``blocks.{i}.attention.{q,k}_norm.*``
``blocks.{i}.attn.proj.{weight,bias}``              ``blocks.{i}.attention.proj.*``
``blocks.{i}.norm2.{weight,bias}``                  ``blocks.{i}.norm2.*``
``blocks.{i}.mlp.fc{1,2}.{weight,bias}``            ``blocks.{i}.mlp.fc{1,2}.*``
``blocks.{i}.adaLN_modulation.1.{weight,bias}``     ``blocks.{i}.modulation.*``
``adaln_before_head.adaLN_modulation.1.*``          ``final_modulation.*``
``lm_head.{weight,bias}``                           ``head.*``
``attn_mask``                                       dropped (a non-persistent buffer; some files carry it)
==================================================  ==================================================

Containers: a flat state dict (accelerate's ``model.safetensors``), or ``{"model"|"ema"|"state_dict"|"module": ...}``
in a ``.bin``/``.pt`` (read with ``torch.load(weights_only=True)``); ``module.`` / ``_orig_mod.`` prefixes are stripped.
:func:`rar_params_from_state_dict` reads the architecture from the tensor shapes, so a file whose sizes differ from a
config is named precisely instead of failing on the first mis-shaped tensor.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError
from vfmtok.tokenizer.utils.loading import RenameRules, read_state_dict, read_training_checkpoint, rename_state_dict

__all__ = ["load_rar_checkpoint", "convert_rar_state_dict", "convert_rar_checkpoint", "rar_params_from_state_dict",
           "RAR_RELEASES", "TOKENIZER_RELEASE", "HUB_REPO", "release_files", "release_evaluation"]

_RULES: RenameRules = [
    (r"^attn_mask$", None),
    (r"^cls_token$", r"start_token"),
    (r"^embeddings\.weight$", r"embedding.weight"),
    (r"^pos_embed$", r"position_embedding"),
    (r"^target_aware_pos_embed$", r"target_position_embedding"),
    (r"^timesteps_embeddings$", r"step_embedding"),
    (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^blocks\.(\d+)\.attn\.(qkv|proj|q_norm|k_norm)\.(weight|bias)$", r"blocks.\1.attention.\2.\3"),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$", r"blocks.\1.modulation.\2"),
    (r"^adaln_before_head\.adaLN_modulation\.1\.(weight|bias)$", r"final_modulation.\1"),
    (r"^lm_head\.(weight|bias)$", r"head.\1"),
]
_TABLES = ("position_embedding", "target_position_embedding", "step_embedding")


def load_rar_checkpoint(path: str | Path, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read a RAR checkpoint safely and return its state dict: a ``.safetensors`` file as it is; otherwise
    ``torch.load(weights_only=True)`` and ``prefer`` (``"ema"`` or ``"model"``), then ``"ema"``, ``"model"``,
    ``"module"``, ``"state_dict"``, or the file itself when it is a flat dict of tensors."""
    if Path(path).suffix == ".safetensors":
        return read_state_dict(path)
    return read_training_checkpoint(path, prefer, containers=("ema", "model", "module", "state_dict"), what="RAR")


def convert_rar_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a reference RAR state dict to :class:`RARModel`'s layout. Returns (converted, dropped keys).

    Raises CheckpointError listing every key no rule knows (a LlamaGen GPT or any other file is never half-converted).
    """
    converted, dropped = rename_state_dict(state_dict, _RULES, "RAR")
    for name in _TABLES:
        table = converted.get(name)
        if table is not None:
            if table.ndim != 3 or table.shape[0] != 1:
                raise CheckpointError(f"RAR tensor for {name} has shape {tuple(table.shape)}; expected (1, L, dim)")
            converted[name] = table[0]
    return converted, list(dropped)


def rar_params_from_state_dict(state: Mapping[str, torch.Tensor], num_classes: int = 1000) -> dict[str, Any]:
    """The architecture (``RARModel`` constructor sizes) a converted state dict implies. ``num_classes`` splits the
    embedding table (``vocab + 1 + num_classes + 1`` rows), since the vocabulary is the head's output size."""
    try:
        vocab_size, dim = state["head.weight"].shape
        depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
        intermediate = state["blocks.0.mlp.fc1.weight"].shape[0]
        head_dim = state["blocks.0.attention.q_norm.weight"].shape[0]
        rows = state["embedding.weight"].shape[0]
        positions = state["position_embedding"].shape[0]
        steps = state["step_embedding"].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"not a complete RAR state dict (missing {error}); keys: {sorted(state)[:8]} ...") \
            from None
    if rows != vocab_size + num_classes + 2:
        raise CheckpointError(f"the RAR embedding table has {rows} rows; {vocab_size} codes and {num_classes} classes "
                              f"need {vocab_size + num_classes + 2} (codes, mask, classes, null class)")
    return {"vocab_size": int(vocab_size), "num_classes": num_classes, "dim": int(dim), "depth": depth,
            "num_heads": int(dim // head_dim), "intermediate_size": int(intermediate),
            "extra_position_slots_plus_tokens": int(positions), "extra_step_slots_plus_tokens": int(steps)}


def _check_sizes(state: Mapping[str, torch.Tensor], model) -> None:
    """Name every architectural size where the file and ``model``'s config differ."""
    found = rar_params_from_state_dict(state, model.config.num_classes)
    c = model.config
    expected = {"vocab_size": c.vocab_size, "num_classes": c.num_classes, "dim": c.dim, "depth": c.depth,
                "num_heads": c.num_heads, "intermediate_size": c.intermediate_size,
                "extra_position_slots_plus_tokens": c.num_tokens + c.extra_position_slots,
                "extra_step_slots_plus_tokens": c.num_tokens + c.extra_step_slots}
    differences = [f"{k}: file {found[k]}, config {expected[k]}" for k in expected if found[k] != expected[k]]
    if differences:
        raise CheckpointError("the RAR checkpoint does not fit the config (" + "; ".join(differences) + ")")


def convert_rar_checkpoint(checkpoint: str | Path, model, prefer: str = "ema") -> list[str]:
    """Load a reference RAR file into ``model`` (a RARModel built from the matching config), strictly. Returns the
    dropped keys; a size that differs from the config raises CheckpointError naming each."""
    converted, dropped = convert_rar_state_dict(load_rar_checkpoint(checkpoint, prefer))
    _check_sizes(converted, model)
    model.load_state_dict(converted, strict=True)  # StrictLoadingMixin: names every mismatch
    return dropped


# ----------------------------------------------------------------------------------------------------------------------
# The VFMTok-RAR releases (CVMI-Lab/VFMTok-RAR README; numbers in REFERENCE.md section 4b). Plain data for the
# release table of ``vfmtok convert pipeline --official``; :func:`vfmtok.pipelines.convert.convert_rar_release` turns
# one release's downloaded files into a pipeline (pipelines sit a layer above the generators).
# ----------------------------------------------------------------------------------------------------------------------
HUB_REPO = "yexiguafu/VFMTok"
TOKENIZER_RELEASE = {"path": "DINOv2/tokenizer/vfmtok-tokenizer.pt", "config": "configs/tokenizer/vfmtok-l.yaml"}

# Sampling behind the published numbers. The paper and README give no per-model scale; these are the released
# configs' (configs/training/generator/{rar,rar_xl,rar_xxl}.yaml, read by test_net.py): power-cosine CFG with scale
# 16 and power 2.75 (L, ultra, XXL), 6.5 and power 1 (XL); randomize_temperature 1; no top-k / top-p. Without CFG:
# scale 1 (the conditional logits only).
RAR_RELEASES: dict[str, dict[str, Any]] = {
    "RAR-L-ultra": {
        "path": "VFMTok-RAR/RAR-L-ultra/model.safetensors", "config": "configs/ar/rar-l-ultra.yaml",
        "params_published": "461M", "epochs": 400,
        "published": {"with_cfg": {"gfid": 1.33, "sfid": 5.72, "is": 317.4, "precision": 0.78, "recall": 0.65},
                      "without_cfg": {"gfid": 2.01, "sfid": 5.34, "is": 211.1, "precision": 0.78, "recall": 0.63}},
        "sampling": {"guidance_scale": 16.0, "guidance_schedule": "cosine_power", "guidance_power": 2.75,
                     "temperature": 1.0},
    },
    "RAR-L": {
        "path": "VFMTok-RAR/RAR-vanilla/vfmtok-rar-l.safetensors", "config": "configs/ar/rar-l.yaml",
        "params_published": "461M", "epochs": 400,
        "published": {"with_cfg": {"gfid": 1.44, "sfid": 6.03, "is": 312.8, "precision": 0.78, "recall": 0.66},
                      "without_cfg": {"gfid": 2.02, "sfid": 5.51, "is": 210.4, "precision": 0.79, "recall": 0.63}},
        "sampling": {"guidance_scale": 16.0, "guidance_schedule": "cosine_power", "guidance_power": 2.75,
                     "temperature": 1.0},
    },
    "RAR-XL": {
        "path": "VFMTok-RAR/RAR-vanilla/vfmtok-rar-xl.safetensors", "config": "configs/ar/rar-xl.yaml",
        "params_published": "955M", "epochs": 400,
        "published": {"with_cfg": {"gfid": 1.38, "sfid": 5.86, "is": 310.2, "precision": 0.78, "recall": 0.65},
                      "without_cfg": {"gfid": 1.74, "sfid": 5.33, "is": 233.0, "precision": 0.80, "recall": 0.63}},
        "sampling": {"guidance_scale": 6.5, "guidance_schedule": "cosine_power", "guidance_power": 1.0,
                     "temperature": 1.0},
    },
    "RAR-XXL": {
        "path": "VFMTok-RAR/RAR-vanilla/vfmtok-rar-xxl.safetensors", "config": "configs/ar/rar-xxl.yaml",
        "params_published": "1.5B", "epochs": 400,
        "published": {"with_cfg": {"gfid": 1.36, "sfid": 5.86, "is": 301.3, "precision": 0.78, "recall": 0.66},
                      "without_cfg": {"gfid": 1.65, "sfid": 5.55, "is": 253.7, "precision": 0.80, "recall": 0.63}},
        "sampling": {"guidance_scale": 16.0, "guidance_schedule": "cosine_power", "guidance_power": 2.75,
                     "temperature": 1.0},
    },
}


def release_files(name: str) -> dict[str, str]:
    """Hub repo and file paths of one release (``tokenizer`` and ``generator``)."""
    if name not in RAR_RELEASES:
        raise InvalidValueError(f"unknown RAR release {name!r}; known: {sorted(RAR_RELEASES)}")
    return {"repo_id": HUB_REPO, "tokenizer": TOKENIZER_RELEASE["path"], "generator": RAR_RELEASES[name]["path"]}


def release_evaluation(name: str) -> dict[str, Any]:
    """The published numbers of a release as a pipeline's ``evaluation`` (model card), with the sampling behind them."""
    release = RAR_RELEASES[name]
    with_cfg, without = release["published"]["with_cfg"], release["published"]["without_cfg"]
    scale = release["sampling"]["guidance_scale"]
    return {f"gFID (cfg-{scale:g})": with_cfg["gfid"], "gFID (cfg-1)": without["gfid"],
            f"IS (cfg-{scale:g})": with_cfg["is"], "IS (cfg-1)": without["is"],
            "protocol": {"source": "published (CVMI-Lab/VFMTok-RAR README)", "num_samples": 50000,
                         "reference": "ADM ImageNet 256 reference batch", "sampler_options": release["sampling"]}}
