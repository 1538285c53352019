"""One import package, `vfmtok`: what `import vfmtok` gives and costs, the command line from a folder that has its own
`tokenizer/` / `pipelines/` / `evaluation/` packages, the shipped configs, importing the reference code (whose package
is also called `vfmtok`), and a built wheel installed on its own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import vfmtok
from vfmtok.pipelines.config import config_path, load_config, shipped_configs
from vfmtok.tokenizer.utils.errors import MissingFileError
from vfmtok.tokenizer.utils.foreign import reference_vfmtok_package

ROOT = Path(__file__).resolve().parents[1]
SHADOWING_PACKAGES = ("tokenizer", "generators", "pipelines", "evaluation")


def run(command: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update({"OMP_NUM_THREADS": "1", **env})
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def shadowing_folder(directory: Path) -> Path:
    """A working directory like an ML repository's: its own packages under the generic names, which fail loudly
    when imported."""
    for name in SHADOWING_PACKAGES:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(f"raise ImportError('the wrong {name} package was imported')\n")
    return directory


# -- the import package --------------------------------------------------------------------------------------------
def test_public_names_are_importable_from_vfmtok_and_unknown_ones_are_errors():
    from vfmtok.generators.gpt import GPTModel
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline

    assert vfmtok.GPTModel is GPTModel and vfmtok.VFMTokARPipeline is VFMTokARPipeline
    for name in ("VFMTokFlowPipeline", "load_pipeline", "load_tokenizer", "DiTModel", "VFMTokModel", "DINOTokModel",
                 "GloTokModel", "build_model", "VFMTokError"):
        assert callable(getattr(vfmtok, name)) and name in dir(vfmtok)
    with pytest.raises(AttributeError, match="no attribute 'GPTModle'"):
        vfmtok.GPTModle  # noqa: B018


def test_import_vfmtok_imports_no_torch():
    result = run([sys.executable, "-c", "import sys, vfmtok; print(sorted(m for m in ('torch', 'diffusers') "
                                        "if m in sys.modules))"], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_the_package_is_the_repository_folders():
    assert Path(vfmtok.__file__).resolve() == ROOT / "__init__.py"
    import vfmtok.tokenizer.utils.errors as errors

    assert Path(errors.__file__).resolve() == ROOT / "tokenizer" / "utils" / "errors.py"


def test_cli_runs_from_a_folder_with_its_own_tokenizer_pipelines_and_evaluation_packages(tmp_path):
    cwd = shadowing_folder(tmp_path / "some-ml-repo")
    # the folder's packages are what a plain import there finds: the check below would notice them
    assert run([sys.executable, "-c", "import tokenizer"], cwd=cwd).returncode != 0
    help_text = run([sys.executable, "-m", "vfmtok", "--help"], cwd=cwd)
    assert help_text.returncode == 0 and "quickstart" in help_text.stdout, help_text.stderr
    data = cwd / "data"
    data.mkdir()
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 30, 240 - 30 * i)).save(data / f"{i}.png")
    (data / "labels.csv").write_text("file,class_index\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(8)))
    config = cwd / "tiny.yaml"
    config.write_text((shipped_configs() / "tokenizer" / "vfmtok-tiny.yaml").read_text().replace(
        "log_with: [tensorboard]", "log_with: [none]"))
    trained = run([sys.executable, "-m", "vfmtok", "train", "tokenizer", "--config", "tiny.yaml", "--data", "data",
                   "--output-dir", "run", "--max-steps", "1"], cwd=cwd)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (cwd / "run" / "tokenizer" / "config.json").is_file()
    described = run([sys.executable, "-m", "vfmtok", "describe", "configs/ar/gpt-tiny.yaml"], cwd=cwd)
    assert described.returncode == 0 and json.loads(described.stdout)["model"] == "GPTModel", described.stderr


# -- shipped configs -----------------------------------------------------------------------------------------------
def test_shipped_configs_are_found_by_their_readme_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = shipped_configs() / "ar" / "gpt-b.yaml"
    assert expected.is_file()
    for spelling in ("configs/ar/gpt-b.yaml", "ar/gpt-b.yaml", "ar/gpt-b", "configs/ar/gpt-b"):
        assert config_path(spelling) == expected
    assert load_config("configs/ar/gpt-tiny.yaml")["model"] == "GPTModel"
    local = tmp_path / "configs" / "ar" / "gpt-b.yaml"  # a file of the user's own wins over the shipped one
    local.parent.mkdir(parents=True)
    local.write_text("model: GPTModel\n")
    assert config_path("configs/ar/gpt-b.yaml") == Path("configs/ar/gpt-b.yaml")
    with pytest.raises(MissingFileError, match=r"'configs/ar/gpt-q\.yaml' does not exist.*ar/gpt-b"):
        config_path("configs/ar/gpt-q.yaml")


# -- the reference code's own `vfmtok` package ---------------------------------------------------------------------
def test_reference_package_is_imported_beside_ours_and_ours_comes_back(tmp_path):
    checkout = tmp_path / "VFMTok"
    (checkout / "vfmtok" / "modules").mkdir(parents=True)
    (checkout / "vfmtok" / "__init__.py").write_text("WHOSE = 'reference'\n")
    (checkout / "vfmtok" / "modules" / "__init__.py").write_text("")
    (checkout / "vfmtok" / "modules" / "layer.py").write_text("from vfmtok import WHOSE\ndef who():\n    return WHOSE\n")
    ours = sys.modules["vfmtok"]
    with reference_vfmtok_package(checkout):
        import vfmtok.modules.layer as layer
    assert layer.who() == "reference" and Path(layer.__file__).is_relative_to(checkout)
    assert sys.modules["vfmtok"] is ours and "vfmtok.modules.layer" not in sys.modules
    assert str(checkout) not in sys.path
    from vfmtok import GPTModel  # ours again

    assert GPTModel.__module__ == "vfmtok.generators.gpt"


def test_a_reference_checkout_without_init_file_wins_over_ours_on_sys_path(tmp_path, monkeypatch):
    """CVMI-Lab/VFMTok's ``vfmtok`` has no __init__.py (a namespace package): it must be found even when this
    project's regular package stands on sys.path (PYTHONPATH), which a namespace portion never beats."""
    checkout = tmp_path / "VFMTok"
    (checkout / "vfmtok" / "modules").mkdir(parents=True)
    (checkout / "vfmtok" / "modules" / "layer.py").write_text("def who():\n    return 'reference'\n")
    ours = sys.modules["vfmtok"]
    monkeypatch.syspath_prepend(str(Path(ours.__file__).parent.parent))  # as PYTHONPATH=<folder holding vfmtok>
    before = list(sys.path)
    with reference_vfmtok_package(checkout):
        import vfmtok.modules.layer as layer
    assert layer.who() == "reference" and sys.modules["vfmtok"] is ours and sys.path == before


# -- a built wheel, installed on its own ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the source tree (a build in the checkout would leave build/ there, whose stale files a
    later wheel would pack)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                 str(out), str(source)], cwd=out)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (path,) = out.glob("vfmtok-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package_with_every_subpackage_and_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"vfmtok", next(t for t in top_level if t.endswith(".dist-info"))}, top_level
    for module in ("vfmtok/__init__.py", "vfmtok/__main__.py", "vfmtok/tokenizer/utils/errors.py",
                   "vfmtok/pipelines/train/trainer.py", "vfmtok/evaluation/benchmark.py",
                   "vfmtok/generators/gpt.py", "vfmtok/pipelines/cli.py"):
        assert module in names, module
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")}
    assert {f"vfmtok/{p}" for p in shipped} <= set(names) and len(shipped) > 20
    assert not [n for n in names if n.startswith("vfmtok/tests/") or n.startswith("vfmtok/docs/")]


def test_the_installed_wheel_works_without_the_checkout(wheel, tmp_path):
    """The wheel in a fresh virtual environment whose only other packages are this environment's dependencies (a
    path entry, so the editable install's finder is not active), run from a folder away from the checkout: the
    command line, a shipped config and the quickstart's shipped configs (`--fast`; about a minute)."""
    env_dir = tmp_path / "fresh"
    created = run([sys.executable, "-m", "venv", str(env_dir)], cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    python = env_dir / "bin" / "python"
    installed = run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    (Path(site.stdout.strip()) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cwd = shadowing_folder(tmp_path / "elsewhere")
    vfmtok_command = str(env_dir / "bin" / "vfmtok")
    where = run([str(python), "-c", "import vfmtok.pipelines.cli, vfmtok.evaluation.benchmark, sys; "
                                    "print(sorted({m.__file__.rsplit('/vfmtok/', 1)[0] for n, m in sys.modules.items()"
                                    " if n.startswith('vfmtok')}))"], cwd=cwd)
    assert where.returncode == 0, where.stderr[-2000:]
    assert json.loads(where.stdout.replace("'", '"')) == [site.stdout.strip()]
    assert run([vfmtok_command, "--help"], cwd=cwd).returncode == 0
    described = run([vfmtok_command, "describe", "configs/tokenizer/vfmtok-tiny.yaml"], cwd=cwd)
    assert described.returncode == 0 and json.loads(described.stdout)["model"] == "VFMTokModel", described.stderr
    quickstart = run([vfmtok_command, "quickstart", "--fast", "--output-dir", "qs"], cwd=cwd, timeout=1500)
    assert quickstart.returncode == 0, quickstart.stderr[-4000:]
    report = json.loads((cwd / "qs" / "report.json").read_text())
    assert {"tokenizers", "ar", "flow"} <= set(report)
