"""The ``vfmtok`` command line: describe, speed, convert."""
import json
from pathlib import Path

import pytest
import torch

from vfmtok.pipelines.cli import main
from vfmtok.tokenizer import VFMTokModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


@pytest.mark.parametrize("config,key", [("vfmtok-tiny", "codebook_size"), ("vfmae-tiny", "latent_shape")])
def test_describe_tiny(capsys, config, key):
    code, rows, _ = run_cli(capsys, "describe", CONFIGS / f"{config}.yaml")
    assert code == 0 and len(rows) == 1
    info = rows[0]
    assert info["model"] == "VFMTokModel" and key in info
    assert isinstance(info["trainable_params"], int) and isinstance(info["frozen_params"], int)
    assert 1e5 < info["trainable_params"] < 5e6  # "a few million parameters" at most
    assert info["num_tokens"] == 16


def test_describe_paper_config_matches_the_reference_parameter_counts(capsys):
    """The reference code, built by ../shared/tools/vfmtok_ref.py, has 73.3M trainable + 304.4M frozen parameters."""
    code, (info,), _ = run_cli(capsys, "describe", CONFIGS / "vfmtok-l.yaml")
    assert code == 0
    assert info["trainable_params"] == pytest.approx(73.3e6, abs=0.05e6)
    assert info["frozen_params"] == pytest.approx(304.4e6, abs=0.05e6)
    assert (info["num_tokens"], info["codebook_size"], info["code_dim"]) == (256, 16384, 12)
    assert info["vfm"]["grid"] == [24, 24]


def test_describe_vfmae_config(capsys):
    code, (info,), _ = run_cli(capsys, "describe", CONFIGS / "vfmae-l.yaml")
    assert code == 0 and info["latent_shape"] == [32, 16, 16] and info["vfm"]["grid"] == [16, 16]


def test_speed_tokenizer_prints_one_json_line_per_mode(capsys):
    code, rows, _ = run_cli(capsys, "speed", "tokenizer", "--config", CONFIGS / "vfmtok-tiny.yaml",
                            "--batch-size", 2, "--steps", 1, "--warmup", 0)
    assert code == 0
    assert [r["mode"] for r in rows] == ["train", "encode", "decode"]
    for row in rows:
        assert row["device"] == "cpu" and row["batch_size"] == 2 and row["images_per_s"] > 0
        assert row["config"].endswith("vfmtok-tiny.yaml") and row["precision"] == "fp32"
    assert 0 < rows[0]["deformable_attention_share"] < 1


def test_speed_compare_reference_needs_a_reference_checkout(capsys, tmp_path):
    """--compare-reference is opt-in (the reference code is no dependency): a missing checkout is a clear error."""
    code, rows, err = run_cli(capsys, "speed", "tokenizer", "--config", CONFIGS / "vfmtok-l.yaml",
                              "--compare-reference", tmp_path / "no-such-checkout", "--steps", 1)
    assert code == 2 and not rows
    assert "no-such-checkout" in err and "CVMI-Lab/VFMTok" in err
    code, _, err = run_cli(capsys, "speed", "tokenizer", "--config", CONFIGS / "vfmtok-l.yaml", "--device", "cuda",
                           "--compare-reference", tmp_path)
    assert code == 2 and "CPU fp32" in err


def test_errors_name_the_bad_value(capsys, tmp_path):
    code, _, err = run_cli(capsys, "describe", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err and "does not exist" in err
    (tmp_path / "bad.yaml").write_text("model: NoSuchModel\nparams: {}\n")
    code, _, err = run_cli(capsys, "describe", tmp_path / "bad.yaml")
    assert code == 2 and "NoSuchModel" in err
    code, _, err = run_cli(capsys, "speed", "tokenizer", "--config", CONFIGS / "vfmtok-tiny.yaml", "--batch-size", 0)
    assert code == 2 and "batch size" in err


def test_convert_writes_a_loadable_directory(capsys, tmp_path):
    from test_convert import reference_state_dict
    from vfmtok.pipelines.config import build_model, load_config

    params = load_config(CONFIGS / "vfmtok-tiny.yaml")["params"]
    ref = reference_state_dict(build_model(CONFIGS / "vfmtok-tiny.yaml"), params, seed=3)
    torch.save({"ema": ref}, tmp_path / "ref.pt")
    code, (row,), err = run_cli(capsys, "convert", "tokenizer", "--checkpoint", tmp_path / "ref.pt",
                                "--config", CONFIGS / "vfmtok-tiny.yaml", "--output-dir", tmp_path / "out")
    assert code == 0, err
    loaded = VFMTokModel.from_pretrained(tmp_path / "out", load_vfm_weights=False)
    assert torch.equal(loaded.state_dict()["encoder.queries"], ref["encode_transformer.carrier_tokens"])
    assert row["dropped"] == 3  # two frozen-VFM keys and the usage statistic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref.pt"]  # no staging directory left behind
    code, _, err = run_cli(capsys, "convert", "tokenizer", "--checkpoint", tmp_path / "ref.pt",
                           "--config", CONFIGS / "vfmtok-tiny.yaml", "--output-dir", tmp_path / "out")
    assert code == 2 and "not empty" in err
