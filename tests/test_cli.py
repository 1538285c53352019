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


@pytest.mark.parametrize("sampler, calls", [("euler", 4), ("ab2", 4), ("heun", 7), ("dpm++2m", 4), ("unipc3", 4),
                                             ("sde", 5)])
def test_speed_flow_times_every_sampler_of_the_pipeline_with_its_model_calls(capsys, sampler, calls):
    """4 steps: one model call a step (Heun: two, one on its last step; the SDE: a last deterministic step more); CFG
    doubles the evaluations per image."""
    config = CONFIGS.parent / "flow" / "dit-tiny.yaml"
    code, (row,), _ = run_cli(capsys, "speed", "flow", "--config", config, "--sampler", sampler, "--steps", 4,
                              "--batch-size", 2, "--warmup", 0, "--windows", 1)
    assert code == 0 and row["sampler"] == sampler and row["images_per_s"] > 0
    assert row["nfe"] == 2 * calls
    code, (row,), _ = run_cli(capsys, "speed", "flow", "--config", config, "--sampler", sampler, "--steps", 4,
                              "--batch-size", 2, "--warmup", 0, "--windows", 1, "--no-cfg")
    assert code == 0 and row["nfe"] == calls


@pytest.mark.parametrize("config, model", [("gpt-tiny", "GPTModel"), ("rar-tiny", "RARModel")])
def test_speed_ar_times_both_families_and_the_sjd_block_step(capsys, config, model):
    config = CONFIGS.parent / "ar" / f"{config}.yaml"
    code, (row,), _ = run_cli(capsys, "speed", "ar", "--config", config, "--batch-size", 2, "--warmup", 0,
                              "--windows", 1, "--sjd-window", 3)
    assert code == 0 and row["model"] == model and row["tokens_per_s"] > 0 and row["sjd_window"] == 3
    # 16 tokens: the 15 after the first take at most 15 block steps and at least 15 / (1 + 3)
    assert 4 <= row["sjd_steps"] <= 15 and 1.0 <= row["sjd_tokens_per_step"] <= 4.0
    assert row["sjd_step_cost"] > 0 and row["sjd_seconds_per_batch"] > 0


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


# -- the command line itself: help, defaults, light start-up ------------------------------------------------------
def _parsers(parser, path=("vfmtok",)):
    """Every (sub-)command's parser, with its command path."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_of_every_command_has_help_that_shows_its_default():
    import argparse

    from vfmtok.pipelines.cli import build_parser

    checked, missing = 0, []
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        one_of = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            shown = formatter._expand_help(action) if action.help else ""  # what --help prints for it
            needs_default = action.option_strings and not action.required and action not in one_of
            if not shown.strip() or (needs_default and "default" not in shown.lower()):
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
            checked += 1
        parser.format_help()  # renders (a stray % in a help text would fail here)
    assert checked > 150 and not missing, missing


def test_help_shows_the_values_the_code_uses():
    from vfmtok.pipelines.cli import build_parser

    parser = build_parser()
    bench = parser.parse_args(["benchmark", "--pipeline", "p", "--num-samples", "10", "--guidance-scales", "1",
                               "--reference", "r", "--output-dir", "o"])
    text = " ".join(dict(_parsers(parser))[("vfmtok", "benchmark")].format_help().split())
    assert f"(default: {bench.labels})" in text and f"(default: {bench.output_size})" in text
    assert f"(default: {bench.batch_size})" in text and f"(default: {bench.seed})" in text


def test_the_cli_spells_the_samplers_and_schedules_the_pipelines_take():
    from vfmtok.generators.gpt import GUIDANCE_SCHEDULES
    from vfmtok.pipelines import cli
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline
    from vfmtok.pipelines.pipeline_vfmtok_flow import SAMPLERS, VFMTokFlowPipeline

    assert cli.FLOW_SAMPLERS == SAMPLERS and cli.GUIDANCE_SCHEDULES == GUIDANCE_SCHEDULES
    import inspect

    taken = set(inspect.signature(VFMTokARPipeline.__call__).parameters) | set(
        inspect.signature(VFMTokFlowPipeline.__call__).parameters)
    assert set(cli.SAMPLER_OPTIONS) <= taken


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["sample", "--help"], 0), (["sample"], 2),
                                       (["sample", "--pipeline", "p", "--class-ids", "1", "--output", "g.png",
                                         "--sampler", "nope"], 2), (["demo", "--help"], 0)])
def test_help_and_argument_errors_import_neither_torch_nor_diffusers(argv, code):
    import subprocess
    import sys

    script = ("import sys\nfrom vfmtok.pipelines.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit as e:\n    code = e.code\nheavy = sorted(m for m in ('torch', 'diffusers', 'gradio')"
              " if m in sys.modules)\nprint('EXIT', code, 'HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == f"EXIT {code} HEAVY []", out.stdout[-500:] + out.stderr[-500:]
