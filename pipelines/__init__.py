"""vfmtok.pipelines: inference pipelines (``VFMTokARPipeline``, ``VFMTokFlowPipeline``, imported on first use), data
and config files; ``vfmtok.pipelines.train``, ``.export``, ``.quickstart`` and ``.cli`` sit on top."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["VFMTokARPipeline", "VFMTokFlowPipeline", "load_pipeline"]

_LAZY = {"VFMTokARPipeline": "vfmtok.pipelines.pipeline_vfmtok_ar",
         "VFMTokFlowPipeline": "vfmtok.pipelines.pipeline_vfmtok_flow",
         "load_pipeline": "vfmtok.pipelines.pipeline_common"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vfmtok.pipelines' has no attribute {name!r}")
