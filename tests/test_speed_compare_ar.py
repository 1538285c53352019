"""`vfmtok speed ar --compare-reference`: argument errors (fast) and, opt-in, a side-by-side run with a LlamaGen
checkout (``VFMTOK_LLAMAGEN_REPO``) on the tiny GPT (token parity with the reference code is tests/test_gpt.py's)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import torch

from vfmtok.evaluation.speed import compare_reference_ar, operator_seconds
from vfmtok.tokenizer.utils.errors import InvalidValueError

ROOT = Path(__file__).resolve().parents[1]


def test_compare_reference_ar_refuses_a_folder_that_is_not_llamagen(tmp_path):
    with pytest.raises(InvalidValueError, match="not a checkout of FoundationVision/LlamaGen"):
        compare_reference_ar(str(ROOT / "configs" / "ar" / "gpt-tiny.yaml"), str(tmp_path))
    with pytest.raises(InvalidValueError, match="needs a GPTModel config"):
        compare_reference_ar(str(ROOT / "configs" / "flow" / "dit-tiny.yaml"), str(tmp_path))


@pytest.mark.reference
def test_compare_reference_ar_runs_the_same_weights_side_by_side():
    repo = os.environ.get("VFMTOK_LLAMAGEN_REPO")
    if not repo or not (Path(repo) / "autoregressive" / "models" / "generate.py").is_file():
        pytest.skip("set VFMTOK_LLAMAGEN_REPO to a FoundationVision/LlamaGen checkout")
    report = compare_reference_ar(str(ROOT / "configs" / "ar" / "gpt-tiny.yaml"), repo, batch_size=2, rounds=1,
                                  sjd_window=4, profile=True)
    assert report["ratio"] > 0 and len(report["rounds"]) == 1 and "vfmtok_sjd_seconds" in report["rounds"][0]
    assert set(report["profile"]) == {"vfmtok", "reference"}
    assert all(row["total"] > 0 for row in report["profile"].values())


def test_operator_seconds_names_the_costliest_operators_and_adds_up():
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def work():
        for _ in range(20):
            (a @ b).relu_()

    seconds = operator_seconds(work, top=2)
    assert len(seconds) == 4 and "aten::mm" in seconds  # the matmuls dominate this work
    assert seconds["other"] >= 0 and seconds["total"] == pytest.approx(
        sum(value for key, value in seconds.items() if key != "total"))
