"""vfmtok: two-stage image generation with tokenizers on a frozen vision foundation model.

The subpackages are ``vfmtok.tokenizer`` (stage one), ``vfmtok.generators`` (stage two), ``vfmtok.pipelines``
(diffusers pipelines, data, configs, training, the command line) and ``vfmtok.evaluation``. The names users need most
are importable from here; they are imported on first use, so ``import vfmtok`` itself loads nothing heavy (no torch).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "VFMTokARPipeline": "vfmtok.pipelines.pipeline_vfmtok_ar",
    "VFMTokFlowPipeline": "vfmtok.pipelines.pipeline_vfmtok_flow",
    "load_pipeline": "vfmtok.pipelines.pipeline_common",
    "load_tokenizer": "vfmtok.tokenizer.interface",
    "ImageTokenizerMixin": "vfmtok.tokenizer.interface",
    "VFMTokModel": "vfmtok.tokenizer.vfmtok",
    "DINOTokModel": "vfmtok.tokenizer.dinotok",
    "GloTokModel": "vfmtok.tokenizer.glotok",
    "FrozenVFM": "vfmtok.tokenizer.vfm",
    "GPTModel": "vfmtok.generators.gpt",
    "RARModel": "vfmtok.generators.rar",
    "AutoregressiveGeneratorMixin": "vfmtok.generators.interface",
    "DiTModel": "vfmtok.generators.dit",
    "build_model": "vfmtok.pipelines.config",
    "load_config": "vfmtok.pipelines.config",
    "config_path": "vfmtok.pipelines.config",
    "VFMTokError": "vfmtok.tokenizer.utils.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'vfmtok' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
