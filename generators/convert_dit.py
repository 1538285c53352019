"""Convert official RAE / VFMTok2 DiT^DH checkpoints (``denoise/models/DDT.py``, ``DiTwDDTHead``) and VFMTok2
LightningDiT checkpoints (``denoise/models/lightningDiT.py``, ``LightningDiT``) to
:class:`vfmtok.generators.dit.DiTModel`.

**LightningDiT** is a DiTModel without a head: build it from ``configs/flow/lightningdit-xl.yaml`` (the same reference
options as DiT^DH except ``condition_silu: false``: LightningDiT conditions on ``t + y`` itself), then
``convert_lightningdit_checkpoint(path, model)``. Its keys map as DiT^DH's trunk does, except that the patch embedding
is ``x_embedder.proj`` (-> ``x_embedder``) and the RoPE table ``feat_rope.freqs_{cos,sin}`` (dropped, checked).
The released VFMTok2 configs never set ``wo_shift`` (4-way adaLN) or ``learn_sigma``, which DiTModel does not have:
such a checkpoint fails to load with the mis-shaped adaLN / final weights named.

**DiT^DH**:

Build the model from ``configs/flow/ditdh-xl.yaml`` (or any config with ``time_embedding: gaussian_fourier``,
``condition_silu: true``, ``reverse_time: true``, ``norm: rmsnorm``, ``mlp: swiglu``, ``rope: true``, patch 1 and a
head), then ``convert_ddt_checkpoint(path, model)``. The training script saves ``{"model": ..., "ema": ...,
"opt": ...}``; bare state dicts and DeepSpeed ``{"module": ...}`` files are accepted too, and the ``module.`` (DDP)
and ``_orig_mod.`` (torch.compile) prefixes are stripped. The reference keeps trunk and head blocks in one list
``blocks``: the first ``depth`` are the trunk. Key mapping, reference -> ours (every tensor copied unchanged):

===============================================  ======================================================
reference (``DiTwDDTHead``)                      this project (``DiTModel``)
===============================================  ======================================================
``s_embedder.proj.{weight,bias}``                ``x_embedder.{weight,bias}`` (trunk patch embedding)
``x_embedder.proj.{weight,bias}``                ``head_embedder.{weight,bias}`` (head patch embedding)
``s_projector.{weight,bias}``                    ``head_projection.{weight,bias}`` (widths differ only)
``t_embedder.W``                                 ``t_embedder.frequencies`` (buffer)
``t_embedder.mlp.{0,2}.{weight,bias}``           ``t_embedder.mlp.{0,2}.{weight,bias}``
``y_embedder.embedding_table.weight``            ``class_embedding.weight`` (num_classes + 1 rows)
``blocks.{i}.*``, ``i < depth``                  ``blocks.{i}.*``
``blocks.{i}.*``, ``i >= depth``                 ``head_blocks.{i - depth}.*``
  (``norm{1,2}.weight``, ``attn.qkv.*``, ``attn.{q,k}_norm.*``, ``attn.proj.*``, ``mlp.w12.*``, ``mlp.w3.*``,
  ``mlp.fc{1,2}.*``, ``adaLN_modulation.1.*``: the same names inside a block)
``final_layer.*``                                ``final_layer.*`` (same names)
``pos_embed`` (frozen parameter)                 dropped: recomputed; checked equal to ``sincos_2d_pos_embed``
``{enc,dec}_feat_rope.freqs_{cos,sin}``          dropped: recomputed; checked equal to ``rope_2d_table``
===============================================  ======================================================
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from vfmtok.generators.dit import sincos_2d_pos_embed
from vfmtok.generators.layers import rope_2d_table
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError
from vfmtok.tokenizer.utils.loading import (RenameRules, read_state_dict, read_training_checkpoint, rename_by_rules,
                                     rename_state_dict, strip_wrapper_prefixes)

__all__ = ["CheckpointError", "load_ddt_checkpoint", "convert_ddt_state_dict", "convert_ddt_checkpoint",
           "read_latent_statistics", "check_latent_statistics", "load_converted_state_dict",
           "convert_lightningdit_state_dict", "convert_lightningdit_checkpoint",
           "STATS_CONVENTIONS"]

_BLOCK_INNER = (r"(norm[12]\.weight|attn\.qkv\.(weight|bias)|attn\.[qk]_norm\.(weight|bias)|attn\.proj\.(weight|bias)"
                r"|mlp\.(w12|w3|fc1|fc2)\.(weight|bias)|adaLN_modulation\.1\.(weight|bias))")
_BLOCK = re.compile(r"^blocks\.(\d+)\." + _BLOCK_INNER + r"$")
# (pattern, replacement) for the non-block keys; ``None`` drops the key (checked in _check_tables).
_RULES: RenameRules = [
    (r"^pos_embed$", None),
    (r"^(enc|dec)_feat_rope\.freqs_(cos|sin)$", None),
    (r"^s_embedder\.proj\.(weight|bias)$", r"x_embedder.\1"),
    (r"^x_embedder\.proj\.(weight|bias)$", r"head_embedder.\1"),
    (r"^s_projector\.(weight|bias)$", r"head_projection.\1"),
    (r"^t_embedder\.W$", r"t_embedder.frequencies"),
    (r"^t_embedder\.mlp\.([02])\.(weight|bias)$", r"t_embedder.mlp.\1.\2"),
    (r"^y_embedder\.embedding_table\.weight$", r"class_embedding.weight"),
    (r"^final_layer\.(norm_final\.weight|linear\.(weight|bias)|adaLN_modulation\.1\.(weight|bias))$",
     r"final_layer.\1"),
]


_LIGHTNING_RULES: RenameRules = [
    (r"^pos_embed$", None),
    (r"^feat_rope\.freqs_(cos|sin)$", None),
    (r"^x_embedder\.proj\.(weight|bias)$", r"x_embedder.\1"),
    (r"^blocks\.(\d+)\." + _BLOCK_INNER + r"$", r"blocks.\1.\2"),
    *[rule for rule in _RULES if rule[0].startswith((r"^t_embedder", r"^y_embedder", r"^final_layer"))],
]


def load_ddt_checkpoint(path: str | Path, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read an official DiT^DH checkpoint safely (``torch.load(weights_only=True)``) and return its state dict:
    ``prefer`` (``"ema"`` or ``"model"``), then ``"ema"``, ``"model"``, ``"module"``, ``"state_dict"``, or the file
    itself when it is a flat dict of tensors."""
    return read_training_checkpoint(path, prefer, containers=("ema", "model", "module", "state_dict"),
                                    what="DiT^DH")


def _infer_trunk_depth(state: Mapping[str, torch.Tensor], num_blocks: int) -> int:
    """Trunk blocks have the trunk width (``s_embedder``'s output); head blocks the head width."""
    if "s_projector.weight" not in state:
        raise InvalidValueError("trunk and head have the same width, so the number of trunk blocks cannot be read "
                                "from the "
                         "checkpoint: pass depth= (the model's config.depth)")
    width = state["s_embedder.proj.weight"].shape[0]
    widths = [state[f"blocks.{i}.attn.qkv.weight"].shape[1] for i in range(num_blocks)]
    depth = sum(w == width for w in widths)
    if widths[:depth] != [width] * depth:
        raise InvalidValueError(f"block widths {widths} are not a trunk of width {width} followed by a head")
    return depth


def _check_tables(dropped: Mapping[str, torch.Tensor]) -> None:
    """The dropped fixed tables must equal what DiTModel recomputes, else the converted model would differ."""
    for key, tensor in dropped.items():
        if key == "pos_embed":
            n, dim = tensor.shape[-2:]
            ours = sincos_2d_pos_embed(dim, math.isqrt(n))
            got = tensor.reshape(n, dim).float()
        else:  # (N, head_dim): each of the head_dim / 2 channel pairs repeats one angle's cos (sin)
            n, head_dim = tensor.shape
            table = rope_2d_table(math.isqrt(n), head_dim)[1:]
            ours = table[..., 0 if key.endswith("cos") else 1]
            got = tensor.float()[:, ::2]
            if not torch.equal(tensor.float()[:, ::2], tensor.float()[:, 1::2]):
                raise InvalidValueError(f"{key}: the RoPE table does not repeat each angle over a channel pair")
        if ours.shape != got.shape or not torch.allclose(got, ours, atol=1e-5, rtol=0):
            raise InvalidValueError(f"{key}: the checkpoint's fixed table differs from the one DiTModel recomputes "
                             f"(max |diff| {(got - ours).abs().max().item() if ours.shape == got.shape else 'shape'})")


def convert_ddt_state_dict(state_dict: Mapping[str, torch.Tensor], depth: Optional[int] = None,
                           check_tables: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a ``DiTwDDTHead`` state dict to :class:`DiTModel`'s layout. Returns (converted, dropped keys).

    ``depth``: the number of trunk blocks; read from the block widths when None (possible when trunk and head widths
    differ, as in every released model). The dropped sin-cos / RoPE tables are checked against ours
    (``check_tables``). Raises ValueError listing every key no rule knows (a wrong file is never half-converted).
    """
    state = {strip_wrapper_prefixes(key): tensor for key, tensor in state_dict.items()}
    block_ids = sorted({int(m.group(1)) for key in state if (m := _BLOCK.match(key))})
    if block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"the checkpoint's block indices {block_ids} are not 0..{len(block_ids) - 1}")
    if depth is None and block_ids:
        depth = _infer_trunk_depth(state, len(block_ids))

    def rename(key: str) -> tuple[bool, Optional[str]]:
        if m := _BLOCK.match(key):  # the first ``depth`` blocks are the trunk, the others the head
            i = int(m.group(1))
            return True, f"blocks.{i}.{m.group(2)}" if i < depth else f"head_blocks.{i - depth}.{m.group(2)}"
        return rename_by_rules(key, _RULES)

    converted, dropped = rename_state_dict(state_dict, rename, "DiT^DH (DiTwDDTHead)")
    if check_tables:
        _check_tables({strip_wrapper_prefixes(key): tensor for key, tensor in dropped.items()})
    return converted, list(dropped)


# How a statistics file's ``var`` entry becomes the scale the model divides by (``latent_std``):
#   "vfmtok2": VFMTok2 trains on ``(x - mean) / (var + 1e-5)`` and decodes ``x * (var + 1e-5) + mean`` (its
#              train_c2i.py / test_c2i.py; its compute_stats.py stores a standard deviation under the name ``var``);
#   "rae":     ``var`` is a variance, the scale is ``sqrt(var)``.
STATS_CONVENTIONS = ("vfmtok2", "rae")
VFMTOK2_STATS_EPS = 1e-5


def _as_latent_grid(tensor: torch.Tensor, name: str, path: str | Path) -> torch.Tensor:
    """(C, h*w) (VFMTok2, reshaped row-major to (C, h, w) as its ``rearrange('c (h w) -> c h w')``), (1, C, h, w)
    (RAE) or (C, h, w) -> (C, h, w) float32."""
    tensor = tensor.float()
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        return tensor[0]
    if tensor.ndim == 2:
        side = math.isqrt(tensor.shape[1])
        if side * side != tensor.shape[1]:
            raise CheckpointError(f"latent statistics {str(path)!r}: {name!r} has shape {list(tensor.shape)}; a "
                                  f"(C, h*w) table needs a square number of positions")
        return tensor.reshape(tensor.shape[0], side, side)
    if tensor.ndim != 3:
        raise CheckpointError(f"latent statistics {str(path)!r}: {name!r} has shape {list(tensor.shape)}; expected "
                              f"(C, h*w), (C, h, w) or (1, C, h, w)")
    return tensor


def convert_lightningdit_state_dict(state_dict: Mapping[str, torch.Tensor], check_tables: bool = True
                                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a VFMTok2 ``LightningDiT`` state dict to :class:`DiTModel`'s layout (no head). Returns (converted,
    dropped keys); the dropped sin-cos / RoPE tables are checked against ours. Unknown keys are a CheckpointError
    listing them (a DiT^DH file, with its ``s_embedder``, is refused so)."""
    converted, dropped = rename_state_dict(state_dict, _LIGHTNING_RULES, "LightningDiT")
    if check_tables:
        _check_tables({strip_wrapper_prefixes(key): tensor for key, tensor in dropped.items()})
    return converted, list(dropped)


def convert_lightningdit_checkpoint(path: str | Path, model, prefer: str = "ema",
                                    latent_stats: Optional[str | Path] = None,
                                    stats_convention: str = "vfmtok2") -> list[str]:
    """:func:`convert_ddt_checkpoint` for a LightningDiT checkpoint (VFMTok2's training script saves it the same
    way) and a head-less DiTModel built from a lightningdit config."""
    if model.config.head_depth:
        raise InvalidValueError(f"a LightningDiT checkpoint converts into a DiTModel without a head; this one has "
                                f"head_depth={model.config.head_depth} (a DiT^DH config?)")
    converted, dropped = convert_lightningdit_state_dict(
        read_training_checkpoint(path, prefer, containers=("ema", "model", "module", "state_dict"),
                                 what="LightningDiT"))
    load_converted_state_dict(model, converted,
                              None if latent_stats is None else read_latent_statistics(latent_stats, stats_convention))
    return dropped


def read_latent_statistics(path: str | Path, convention: str = "vfmtok2") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of shape (C, h, w) from a statistics file, read safely: keys ``mean`` and ``std`` (this
    project's ``latent_stats.safetensors``: used as they are) or ``mean`` and ``var`` (a release's file; numpy
    arrays inside a torch file, as VFMTok2's ``stats/stats-500.pt``, are allowed). ``convention`` says what ``var``
    means (see ``STATS_CONVENTIONS``): "vfmtok2" gives ``std = var + 1e-5`` (float32, the release's own arithmetic),
    "rae" ``std = sqrt(var)``."""
    if convention not in STATS_CONVENTIONS:
        raise InvalidValueError(f"statistics convention must be one of {STATS_CONVENTIONS}, got {convention!r}")
    stats = read_state_dict(path, allow_numpy=True)
    if "mean" not in stats or not ({"std", "var"} & set(stats)):
        raise CheckpointError(f"latent statistics {str(path)!r} need 'mean' and 'std' (or 'var'), found "
                              f"{sorted(stats)}")
    mean = _as_latent_grid(stats["mean"], "mean", path)
    if "std" in stats:
        std = _as_latent_grid(stats["std"], "std", path)
    elif convention == "vfmtok2":
        std = _as_latent_grid(stats["var"], "var", path) + VFMTOK2_STATS_EPS
    else:
        std = _as_latent_grid(stats["var"], "var", path).clamp_min(0).sqrt()
    if mean.shape != std.shape:
        raise CheckpointError(f"latent statistics {str(path)!r}: mean {list(mean.shape)} and std {list(std.shape)} "
                              f"differ in shape")
    check_latent_statistics(mean, std, f"latent statistics {str(path)!r}")
    return mean, std


def check_latent_statistics(mean: torch.Tensor, std: torch.Tensor, where: str) -> None:
    """Refuse statistics that would normalise latents into NaN / inf: every element of ``mean`` finite, every element
    of ``std`` finite and > 0. ``where`` names the file in the error, which counts the bad elements."""
    bad_mean = ~torch.isfinite(mean)
    bad_std = ~(torch.isfinite(std) & (std > 0))
    if bad_mean.any() or bad_std.any():
        first = (bad_mean | bad_std).nonzero()[0].tolist() if mean.shape == std.shape else []
        raise InvalidValueError(
            f"{where}: {int(bad_mean.sum())} of the {mean.numel()} elements of 'mean' are not finite and "
            f"{int(bad_std.sum())} of the {std.numel()} elements of 'std' are not finite or not > 0 (first bad "
            f"element at index {first}); expected finite means and positive finite standard deviations")


def convert_ddt_checkpoint(path: str | Path, model, prefer: str = "ema",
                           latent_stats: Optional[str | Path] = None, stats_convention: str = "vfmtok2") -> list[str]:
    """Load an official checkpoint file into ``model`` (a DiTModel built from the matching config), strictly.

    The released checkpoints keep the latent normalisation statistics in a separate file: ``latent_stats`` (see
    :func:`read_latent_statistics`, read with ``stats_convention``) stores them in the model; without it the model
    keeps the identity (mean 0, std 1). Returns the dropped keys. A missing, unexpected or mis-shaped weight raises
    CheckpointError naming it.
    """
    converted, dropped = convert_ddt_state_dict(load_ddt_checkpoint(path, prefer), depth=model.config.depth)
    load_converted_state_dict(model, converted,
                              None if latent_stats is None else read_latent_statistics(latent_stats, stats_convention))
    return dropped


def load_converted_state_dict(model, converted: Mapping[str, torch.Tensor],
                              statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Load a converted state dict (which never holds the latent statistics: the releases keep them in a separate
    file) into ``model`` strictly, then ``statistics`` (mean, std) when given, else the model keeps its own."""
    converted = dict(converted)
    for name in ("latent_mean", "latent_std"):
        converted.setdefault(name, getattr(model, name).detach().clone())
    model.load_state_dict(converted, strict=True)
    if statistics is not None:
        model.set_latent_statistics(*statistics)
