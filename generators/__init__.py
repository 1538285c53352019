"""Stage two: generators over tokenizer outputs (LlamaGen-style GPT and RAR over codes, DiT/SiT flow denoiser over
latents). :func:`load_generator` loads a saved generator folder as the class its ``config.json`` names."""
from __future__ import annotations

from typing import Any

from vfmtok.generators.dit import DiTModel
from vfmtok.generators.gpt import GPTModel
from vfmtok.generators.interface import AutoregressiveGeneratorMixin
from vfmtok.generators.rar import RARModel
from vfmtok.tokenizer.utils.errors import CheckpointError
from vfmtok.tokenizer.utils.loading import read_saved_config

__all__ = ["GPTModel", "RARModel", "DiTModel", "AutoregressiveGeneratorMixin", "GENERATOR_CLASSES", "load_generator"]

GENERATOR_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (GPTModel, RARModel, DiTModel)}


def load_generator(path: str, **kwargs: Any):
    """A saved generator (``save_pretrained`` folder or Hub id) as the class its ``config.json`` names."""
    hub = {k: kwargs[k] for k in ("subfolder", "cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    name = read_saved_config(GPTModel, path, **hub).get("_class_name")  # any ConfigMixin reads config.json
    if name not in GENERATOR_CLASSES:
        raise CheckpointError(f"{path}: config.json names {name!r}; a generator is one of {sorted(GENERATOR_CLASSES)}")
    return GENERATOR_CLASSES[name].from_pretrained(path, **kwargs)
