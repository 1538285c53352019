"""Stage one: image tokenizers (VFMTok / VFMAE, DINO-Tok, GloTok), most of them on a frozen vision foundation model.

Every family implements :class:`ImageTokenizerMixin` (``tokenizer/interface.py``); :func:`load_tokenizer` loads a
saved tokenizer of any family. The names below are imported on first use, so importing a light submodule (e.g.
``vfmtok.tokenizer.utils.errors``, which the command line needs before it parses its arguments) loads no torch."""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "MultiScaleDeformableAttention": "vfmtok.tokenizer.deformable_attention",
    "multi_scale_deformable_attention": "vfmtok.tokenizer.deformable_attention",
    "CodeLayout": "vfmtok.tokenizer.interface",
    "ImageTokenizerMixin": "vfmtok.tokenizer.interface",
    "load_tokenizer": "vfmtok.tokenizer.interface",
    "VFM_PRESETS": "vfmtok.tokenizer.vfm",
    "FrozenVFM": "vfmtok.tokenizer.vfm",
    "VFMFeatures": "vfmtok.tokenizer.vfm",
    "VectorQuantizer": "vfmtok.tokenizer.vfmtok",
    "VFMTokModel": "vfmtok.tokenizer.vfmtok",
    "VFMTokOutput": "vfmtok.tokenizer.vfmtok",
    "DINOTokModel": "vfmtok.tokenizer.dinotok",
    "DINOTokOutput": "vfmtok.tokenizer.dinotok",
    "GloTokModel": "vfmtok.tokenizer.glotok",
    "GloTokOutput": "vfmtok.tokenizer.glotok",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'vfmtok.tokenizer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
