"""Config files are validated strictly, in one way, before any work starts; the command line reports user errors in
one line and lets every other exception keep its traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vfmtok.pipelines import config as config_module
from vfmtok.pipelines.cli import main
from vfmtok.pipelines.config import load_config
from vfmtok.tokenizer.utils.errors import ConfigError, VFMTokError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "tokenizer" / "vfmtok-tiny.yaml"
GPT = ROOT / "configs" / "ar" / "gpt-tiny.yaml"


def variant(tmp_path: Path, base: Path, edit) -> Path:
    config = yaml.safe_load(base.read_text())
    edit(config)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_misspelt_section_fails_naming_it_and_the_accepted_ones(tmp_path):
    path = variant(tmp_path, TOKENIZER, lambda c: c.update(trainig=c.pop("training")))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trainig'\].*'training'"):
        load_config(path)


def test_a_misspelt_section_stops_training_before_any_work(tmp_path, capsys):
    path = variant(tmp_path, TOKENIZER, lambda c: c.update(trainig=c.pop("training")))
    code = main(["train", "tokenizer", "--config", str(path), "--data", str(tmp_path / "no-data"),
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2 and "trainig" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section,key,value,needle", [
    ("training", "learning_rat", 1.0e-4, r"training: unknown option\(s\) \['learning_rat'\]"),
    ("loss", "perceptual_wieght", 0.0, r"loss: unknown option\(s\) \['perceptual_wieght'\]"),
    ("params", "decoder_dept", 2, r"params: unknown option\(s\) \['decoder_dept'\]"),
    # YAML reads 4e-4 (no dot) as a string
    ("training", "learning_rate", "4e-4", r"training\.learning_rate: expected a number, got str '4e-4'.*4\.0e-4"),
    ("training", "flip", "no", r"training\.flip: expected true/false, got str 'no'"),
    ("training", "betas", 0.9, r"training\.betas: expected a list of a number, a number, got float"),
    ("training", "max_steps", 10.5, r"training\.max_steps: expected an integer"),
    ("params", "dim", "64", r"params\.dim: expected an integer, got str '64'"),
    ("loss", "gan_weight", [0.5], r"loss\.gan_weight: expected a number, got list"),
])
def test_unknown_keys_and_wrong_types_are_named(tmp_path, section, key, value, needle):
    path = variant(tmp_path, TOKENIZER, lambda c: c.setdefault(section, {}).update({key: value}))
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_sections_a_model_does_not_have_are_refused(tmp_path):
    path = variant(tmp_path, GPT, lambda c: c.update(loss={"l2_weight": 1.0}))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['loss'\] for a GPTModel config"):
        load_config(path)


def test_missing_sections_get_their_defaults(tmp_path):
    path = variant(tmp_path, GPT, lambda c: c.pop("sampling"))
    assert load_config(path)["sampling"] == {"guidance_scale": 2.0, "guidance_schedule": None, "guidance_power": None,
                                             "temperature": None}  # None: the generator family's default
    flow = load_config(ROOT / "configs" / "flow" / "dit-tiny.yaml")
    assert flow["sampling"] == {"guidance_scale": 1.5, "steps": 50}
    assert flow["flow"]["repa_weight"] == 0.0
    tokenizer = load_config(TOKENIZER)
    assert tokenizer["loss"]["discriminator"] in ("dino", "patchgan", "none")


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        load_config(path)


def test_user_errors_are_one_line_other_errors_keep_their_traceback(tmp_path, capsys, monkeypatch):
    code = main(["describe", str(tmp_path / "missing.yaml")])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(VFMTokError):  # --debug: the user error's traceback as well
        main(["--debug", "describe", str(tmp_path / "missing.yaml")])

    def broken(config):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(config_module, "build_model", broken)
    with pytest.raises(RuntimeError, match="out of memory"):  # a bug or an environment failure is never swallowed
        main(["describe", str(TOKENIZER)])
