"""Config files: ``model`` (a class name), ``params`` (its constructor arguments) and optional sections that later
stages read (``training``, ...). Construction passes ``params`` to the constructor as they are, so a misspelt
parameter is an error rather than a silently ignored key."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MODEL_CLASSES", "load_config", "build_model", "model_class"]

# Class name in a config file -> "module:attribute". Imported lazily so that `vfmtok describe` on a tokenizer
# config does not import the generators.
MODEL_CLASSES: dict[str, str] = {
    "VFMTokModel": "tokenizer.vfmtok:VFMTokModel",
    "GPTModel": "generators.gpt:GPTModel",
    "DiTModel": "generators.dit:DiTModel",
}


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(config, dict) or "model" not in config or not isinstance(config.get("params", {}), dict):
        raise ValueError(f"config file {str(path)!r} must be a mapping with 'model' (one of {sorted(MODEL_CLASSES)}) "
                         f"and 'params' (a mapping of constructor arguments)")
    config.setdefault("params", {})
    config["_path"] = str(path)
    return config


def model_class(name: str) -> type:
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    module, attribute = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_model(config: dict[str, Any] | str | Path):
    """Build the model a config describes, with random weights (nothing is downloaded)."""
    if not isinstance(config, dict):
        config = load_config(config)
    cls = model_class(config["model"])
    params = config["params"]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"{config.get('_path', 'config')}: unknown parameter(s) {unknown} for {cls.__name__}; "
                         f"accepted: {sorted(accepted)}")
    return cls(**params)
