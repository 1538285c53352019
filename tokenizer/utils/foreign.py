"""Importing the public reference code, whose top-level package is also called ``vfmtok``.

CVMI-Lab's VFMTok checkouts (the code this project is compared with) import their own ``vfmtok.modules``,
``vfmtok.tokenizer``, ... Inside :func:`reference_vfmtok_package` those names mean the checkout's; after it, this
project's again. The reference objects created inside keep working (they hold their own module globals); only a
reference function that imports ``vfmtok.*`` when called, after the block, would see ours.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["reference_vfmtok_package"]


def _own_modules() -> dict[str, object]:
    return {name: module for name, module in sys.modules.items() if name == "vfmtok" or name.startswith("vfmtok.")}


@contextlib.contextmanager
def reference_vfmtok_package(checkout: str | Path, modules: Optional[dict] = None) -> Iterator[dict]:
    """Within the block, ``import vfmtok...`` imports from ``checkout`` (put first on ``sys.path``; an editable
    install's finder comes after the path finder, a regular install's site-packages after the checkout).

    Yields a dict that holds, after the block, the checkout's modules it imported; pass it as ``modules`` to a later
    block to go on with those same module objects (the reference imports some of its modules lazily, and shims
    patched into them must stay)."""
    ours = _own_modules()
    # The checkout's ``vfmtok`` has no __init__.py (a namespace package): a regular ``vfmtok`` package anywhere on
    # sys.path (this project's, e.g. through PYTHONPATH) would win over it wherever it stands, so the folders that
    # hold this project's package leave sys.path for the block.
    own_file = getattr(ours.get("vfmtok"), "__file__", None)
    own_roots = {str(Path(own_file).parent.parent)} if own_file else set()
    saved_path = list(sys.path)
    for name in ours:
        del sys.modules[name]
    root = str(Path(checkout))
    sys.path[:] = [root] + [entry for entry in sys.path if entry not in own_roots]
    reference = dict(modules or {})
    sys.modules.update(reference)
    try:
        yield reference
    finally:
        reference.update(_own_modules())  # the checkout's modules, now
        sys.path[:] = saved_path
        for name in _own_modules():
            del sys.modules[name]
        sys.modules.update(ours)
