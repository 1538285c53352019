"""The small files that let diffusers' own loaders read this project's saved folders.

diffusers resolves a class it does not ship from a Python file inside the folder, and only with
``trust_remote_code=True``: ``DiffusionPipeline.from_pretrained`` reads the pipeline class from the file that
``model_index.json``'s ``_class_name`` (``[module, class]``) names, ``AutoModel.from_pretrained`` the model class from
the file that ``config.json``'s ``auto_map`` names. The files written here contain nothing but imports from the
installed ``vfmtok`` package, so the code that runs is the package's own. This project's loaders
(``load_pipeline``, ``VFMTokARPipeline.from_pretrained``, ``load_tokenizer``, ``GPTModel.from_pretrained``, ...) never
run a file of a folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from vfmtok.tokenizer.utils.atomic import atomic_file

__all__ = ["AUTO_MODEL_MODULE", "AUTO_MAP_KEY", "importing_module_text", "write_auto_model_files",
           "write_remote_code_module"]

AUTO_MODEL_MODULE = "modeling_vfmtok"  # the file config.json's auto_map names (modeling_vfmtok.py)
AUTO_MAP_KEY = "auto_map"


def importing_module_text(imports: Iterable[tuple[str, str]], purpose: str) -> str:
    """A module whose only statements are ``from <module> import <name>`` lines of the vfmtok package."""
    lines = []
    for module, name in imports:
        if module.split(".")[0] != "vfmtok":
            raise ValueError(f"only vfmtok modules may be imported by a saved folder's file, got {module!r}")
        lines.append(f"from {module} import {name}  # noqa: F401")
    return (f'"""{purpose}\n\nWritten by vfmtok. It only imports the installed vfmtok package: the code that runs is '
            f'that package\'s. vfmtok\'s own loaders never run this file."""\n'
            + "\n".join(lines) + "\n")


def write_remote_code_module(directory: str | Path, module: str, imports: Iterable[tuple[str, str]],
                             purpose: str) -> None:
    """``<directory>/<module>.py`` holding only the given imports (written atomically)."""
    with atomic_file(Path(directory) / f"{module}.py") as temporary:
        temporary.write_text(importing_module_text(imports, purpose))


def write_auto_model_files(directory: str | Path, cls: type) -> None:
    """Let ``diffusers.AutoModel.from_pretrained(directory, trust_remote_code=True)`` load a saved model of ``cls``:
    ``config.json`` gains ``auto_map: {"AutoModel": "modeling_vfmtok.<class>"}`` and ``modeling_vfmtok.py`` imports
    the class from the installed package. The ``_name_or_path`` diffusers records is dropped."""
    directory = Path(directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config[AUTO_MAP_KEY] = {"AutoModel": f"{AUTO_MODEL_MODULE}.{cls.__name__}"}
    config.pop("_name_or_path", None)  # where it was loaded from: a local path means nothing once published
    write_remote_code_module(directory, AUTO_MODEL_MODULE, [(cls.__module__, cls.__name__)],
                             f"Lets diffusers load this {cls.__name__}: "
                             f"AutoModel.from_pretrained(<folder or repo id>, trust_remote_code=True).")
    with atomic_file(config_file) as temporary:
        temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
