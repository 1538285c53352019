"""Loads the public RAR code (bytedance/1d-tokenizer or CVMI-Lab/VFMTok-RAR ``modeling/rar.py``) from a checkout for
the opt-in parity tests, without its package's heavy imports: ``modeling.modules`` is given only ``BaseModel``."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


class _Config(dict):
    """OmegaConf-like attribute access (``config.model.generator.hidden_size``, ``.get``)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return _Config(value) if isinstance(value, dict) else value


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_rar_module(repo: str):
    """The reference ``modeling.rar`` module of the checkout ``repo``."""
    root = Path(repo)
    saved = {k: sys.modules.get(k) for k in ("modeling", "modeling.modules", "modeling.modules.base_model",
                                              "modeling.rar")}
    try:
        package = types.ModuleType("modeling")
        package.__path__ = []
        modules = types.ModuleType("modeling.modules")
        modules.__path__ = []
        sys.modules["modeling"], sys.modules["modeling.modules"] = package, modules
        modules.BaseModel = _load("modeling.modules.base_model", root / "modeling/modules/base_model.py").BaseModel
        return _load("modeling.rar", root / "modeling/rar.py")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def reference_rar(repo: str, vocab_size: int, num_tokens: int, num_classes: int, dim: int, depth: int,
                  num_heads: int, intermediate_size: int):
    """A reference ``RAR`` of these sizes (dropout as released; call ``.eval()``)."""
    config = _Config(model={"vq_model": {"codebook_size": vocab_size},
                            "generator": {"hidden_size": dim, "num_hidden_layers": depth,
                                          "num_attention_heads": num_heads, "intermediate_size": intermediate_size,
                                          "image_seq_len": num_tokens, "condition_num_classes": num_classes,
                                          "dropout": 0.1, "attn_drop": 0.1, "use_checkpoint": False}})
    return reference_rar_module(repo).RAR(config)
