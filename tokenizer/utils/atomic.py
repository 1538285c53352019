"""Crash-safe writes: everything the project writes to disk (checkpoints, exported models, caches, reports, image
grids) goes through these helpers, so an interrupted run never leaves a half-written file or directory behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError

__all__ = ["atomic_directory", "atomic_file", "write_text_atomically", "save_pretrained_atomically"]


@contextlib.contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to ``target``; on success it is renamed to ``target``.

    ``target`` must not exist or be an empty directory unless ``replace`` is true (then the old one is removed only
    after the new one is complete).
    """
    target = Path(target)
    if target.exists() and not replace and any(target.iterdir()):
        raise OutputExistsError(f"{str(target)!r} already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s directory; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        yield Path(name)
        os.replace(name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def write_text_atomically(target: str | Path, text: str) -> None:
    with atomic_file(target) as path:
        path.write_text(text)


def save_pretrained_atomically(model, output: str | Path) -> None:
    """``model.save_pretrained`` into a staging directory renamed to ``output`` (which must be absent or empty)."""
    with atomic_directory(output) as staging:
        model.save_pretrained(staging)
