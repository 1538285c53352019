"""Imports go one way. Each module of the project belongs to a layer; a module may import its own layer and the layers
below it, never one above (module-level, function-level and ``TYPE_CHECKING`` imports alike):

    0  vfmtok.tokenizer.utils                           errors, strict loading, atomic writes, shared layers
    1  vfmtok.tokenizer                                 tokenizer families, their losses and converters
    2  vfmtok.generators                                GPT, flow denoiser, samplers, converters
    3  vfmtok.pipelines (root modules)                  inference pipelines, data, config files
    4  vfmtok.evaluation                                metrics and benchmarks
    5  vfmtok.pipelines.train, .cli, .quickstart,       training, extraction, exporting runs, the command line
       .export, .demo

The repository's folders are the subpackages of ``vfmtok`` (pyproject's package-dir). Internal imports are absolute
(``from vfmtok.tokenizer... import``): no relative import, and no import of the bare folder names, which would be
another package on a user's path.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizer", "generators", "pipelines", "evaluation")

# Most specific prefix first.
LAYERS: list[tuple[str, int]] = [
    ("vfmtok.tokenizer.utils", 0),
    ("vfmtok.tokenizer", 1),
    ("vfmtok.generators", 2),
    ("vfmtok.pipelines.train", 5),
    ("vfmtok.pipelines.cli", 5),
    ("vfmtok.pipelines.quickstart", 5),
    ("vfmtok.pipelines.export", 5),
    ("vfmtok.pipelines.demo", 5),
    ("vfmtok.pipelines", 3),
    ("vfmtok.evaluation", 4),
]


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None  # not the project's (torch, diffusers, ...)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["vfmtok", *parts])


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``source``; relative imports are resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from package import submodule`` imports the submodule
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names] or [(node.lineno, target)]
    return found


def upward_imports(root: Path, packages=PACKAGES) -> list[str]:
    problems = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            own = layer_of(module)
            for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
                # ``from tokenizer import VFMTokModel`` names an attribute, not a module: use the longest prefix that
                # is a module of the project
                target_layer = layer_of(target)
                if target_layer is not None and own is not None and target_layer > own:
                    problems.append(f"{path.relative_to(root)}:{line}: {module} (layer {own}) imports {target} "
                                    f"(layer {target_layer})")
    return problems


def test_no_module_imports_a_higher_layer():
    assert upward_imports(ROOT) == []


def convention_breaks(root: Path, packages=PACKAGES) -> list[str]:
    """Imports that are relative or name a bare folder (``tokenizer``, ...) instead of ``vfmtok.<folder>``."""
    problems = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        problems.append(f"{path.relative_to(root)}:{node.lineno}: relative import")
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                problems += [f"{path.relative_to(root)}:{node.lineno}: imports {name}" for name in names
                             if name.split(".")[0] in PACKAGES]
    return problems


def test_internal_imports_are_absolute_vfmtok_imports():
    assert convention_breaks(ROOT) == []
    assert convention_breaks(ROOT, ("tests",)) == []


def test_a_relative_or_bare_import_breaks_the_convention(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "a.py").write_text("from .b import c\nimport generators.gpt\nfrom vfmtok.tokenizer import x\n")
    problems = convention_breaks(tmp_path, ("tokenizer",))
    assert len(problems) == 2 and "relative" in problems[0] and "generators.gpt" in problems[1], problems


def test_every_project_module_has_a_layer():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert layer_of(module_name(path, ROOT)) is not None, path


@pytest.mark.parametrize("module_path,source", [
    # the bottom layer reaching into a tokenizer family
    ("tokenizer/utils/synthetic.py", "from vfmtok.tokenizer.vfmtok import VFMTokModel\n"),
    # a tokenizer module using a generator, inside a function
    ("tokenizer/synthetic.py", "def f():\n    import vfmtok.generators.gpt\n"),
    # a model importing the training code (a relative import)
    ("generators/synthetic.py", "from vfmtok.pipelines.train import trainer\n"),
    ("pipelines/synthetic.py", "from .train.trainer import Trainer\n"),
    ("evaluation/synthetic.py", "from vfmtok.pipelines.cli import main\n"),
])
def test_an_upward_import_is_reported(tmp_path, module_path, source):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tokenizer" / "utils").mkdir()
    (tmp_path / "tokenizer" / "utils" / "__init__.py").write_text("")
    (tmp_path / module_path).write_text(source)
    problems = upward_imports(tmp_path)
    assert len(problems) == 1 and module_path in problems[0], problems


def test_a_downward_import_is_allowed(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "evaluation" / "ok.py").write_text("from vfmtok.pipelines.config import load_config\n"
                                                   "from vfmtok.tokenizer.utils.errors import VFMTokError\n")
    (tmp_path / "pipelines" / "train").mkdir()
    (tmp_path / "pipelines" / "train" / "ok.py").write_text("from vfmtok.evaluation import speed\n"
                                                            "from ..config import x\n")
    assert upward_imports(tmp_path) == []
