"""AR training on the shared trainer: codes extracted from the real ImageNet samples, exact resume with dropout,
online tokenization, and a held-out loss well below the uniform baseline ln(vocab)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from vfmtok.generators import GPTModel
from vfmtok.pipelines.train.extract import CodesDataset, extract_tokens
from vfmtok.pipelines.train.ar import ar_validation_loss, train_ar
from test_codes import saved_tokenizer
from test_trainer import ROOT, SAMPLES, Interrupted, interrupt_after_checkpoint, metrics, needs_samples

GPT_TINY = ROOT / "configs" / "ar" / "gpt-tiny.yaml"


def gpt_config(directory, **training):
    config = yaml.safe_load(GPT_TINY.read_text())
    config["training"] = {"batch_size": 16, "num_workers": 0, "log_every": 1, "checkpoint_every": 3,
                          "sample_every": 3, "num_sample_images": 2, "log_with": ["none"], "optimizer": "adamw",
                          "weight_decay": 0.05, "learning_rate": 1e-3, "ema_decay": 0.99, **training}
    path = directory / "gpt.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def split_folders(directory, train_count, val_count):
    rows = (SAMPLES / "labels.csv").read_text().splitlines()[1:]
    folders = {}
    for name, chosen in (("train", rows[:train_count]), ("val", rows[-val_count:])):
        folder = directory / name
        folder.mkdir(parents=True)
        for row in chosen:
            (folder / row.split(",")[0]).symlink_to(SAMPLES / row.split(",")[0])
        (folder / "labels.csv").write_text("file,class_index\n" + "\n".join(
            ",".join(row.split(",")[:2]) for row in chosen) + "\n")
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    if not (SAMPLES / "labels.csv").is_file():
        pytest.skip("shared ImageNet samples missing")
    directory = tmp_path_factory.mktemp("ar")
    model, path, vfm = saved_tokenizer(directory)
    folders = split_folders(directory, 900, 100)
    codes = {name: extract_tokens(model, str(folder), directory / f"codes-{name}", batch_size=50, num_workers=0)
             for name, folder in folders.items()}
    return {"tokenizer": path, "vfm": vfm, "codes": codes, "folders": folders, "directory": directory}


@needs_samples
def test_interrupted_ar_run_resumes_bitwise_with_dropout(extracted, tmp_path, monkeypatch):
    config = gpt_config(tmp_path, max_steps=6)
    codes = str(extracted["codes"]["train"])
    train_ar(config, tmp_path / "full", codes=codes)
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, at_step=3)
        with pytest.raises(Interrupted):
            train_ar(config, tmp_path / "resumed", codes=codes)
    train_ar(config, tmp_path / "resumed", codes=codes, resume=True)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [m["model/loss"] for m in a] == [m["model/loss"] for m in b] and len(a) == 6


@needs_samples
def test_online_tokenization_trains_and_draws_sample_grids(extracted, tmp_path):
    config = gpt_config(tmp_path, max_steps=3)
    exported = train_ar(config, tmp_path / "out", data=str(extracted["folders"]["val"]),
                        tokenizer=str(extracted["tokenizer"]), vfm_weights=str(extracted["vfm"]))
    assert (tmp_path / "out" / "samples" / "step-00000003.png").is_file()
    assert GPTModel.from_pretrained(exported).config.vocab_size == 512


def test_mismatched_codes_are_refused(extracted, tmp_path):
    config = yaml.safe_load(GPT_TINY.read_text())
    config["params"]["vocab_size"] = 1024
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="vocab_size 1024"):
        train_ar(path, tmp_path / "out", codes=str(extracted["codes"]["train"]))


@needs_samples
def test_trained_tiny_ar_beats_the_uniform_baseline_on_held_out_images(extracted, tmp_path):
    config = gpt_config(tmp_path, max_steps=150, batch_size=32, checkpoint_every=150, sample_every=1000,
                        log_every=25, lr_warmup_steps=10)
    exported = train_ar(config, tmp_path / "out", codes=str(extracted["codes"]["train"]))
    model = GPTModel.from_pretrained(exported)
    validation = CodesDataset(extracted["codes"]["val"])
    loss = ar_validation_loss(model, validation)
    uniform = math.log(512)
    codes = np.load(extracted["codes"]["train"] / "codes.npy")
    frequencies = np.bincount(codes.ravel(), minlength=512) / codes.size
    unigram = float(-(frequencies[frequencies > 0] * np.log(frequencies[frequencies > 0])).sum())
    print(json.dumps({"validation_loss": loss, "uniform": uniform, "unigram_entropy": unigram}))
    assert loss < 0.8 * uniform and loss < unigram, (loss, uniform, unigram)


# -- RAR through `vfmtok train ar` ---------------------------------------------------------------------------------
RAR_TINY = ROOT / "configs" / "ar" / "rar-tiny.yaml"


def rar_config(directory, start, end, **training):
    config = yaml.safe_load(RAR_TINY.read_text())
    config["params"].update(randomness_anneal_start=start, randomness_anneal_end=end)
    config["training"] = {**config["training"], "num_workers": 0, "log_every": 1, "checkpoint_every": 3,
                          "sample_every": 3, "num_sample_images": 2, "log_with": ["none"], **training}
    path = directory / "rar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@needs_samples
def test_tiny_rar_anneals_resumes_bitwise_and_samples_through_the_pipeline(extracted, tmp_path, monkeypatch):
    from vfmtok.generators import RARModel, load_generator
    from vfmtok.pipelines.convert import assemble_pipeline
    from vfmtok.tokenizer.interface import load_tokenizer

    config = rar_config(tmp_path, start=2, end=5, max_steps=7)
    codes = str(extracted["codes"]["train"])
    seen = []
    original = RARModel.sample_orders

    def recording(self, batch_size, device):
        seen.append(self.permutation_probability)
        return original(self, batch_size, device)

    monkeypatch.setattr(RARModel, "sample_orders", recording)
    exported = train_ar(config, tmp_path / "full", codes=codes)
    # direct computation of RAR's schedule: 1 before step 2, the line to 0 at step 5, 0 after
    assert seen == pytest.approx([1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0], abs=1e-12)
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, at_step=3)
        with pytest.raises(Interrupted):
            train_ar(config, tmp_path / "resumed", codes=codes)
    train_ar(config, tmp_path / "resumed", codes=codes, resume=True)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [m["model/loss"] for m in a] == [m["model/loss"] for m in b] and len(a) == 7
    assert [m["lr"] for m in a] == [m["lr"] for m in b]
    # the random orders matter: the same run with raster orders only has another trajectory
    (tmp_path / "r").mkdir()
    raster = rar_config(tmp_path / "r", start=0, end=0, max_steps=2)
    train_ar(raster, tmp_path / "raster", codes=codes)
    assert metrics(tmp_path / "raster")[0]["model/loss"] != a[0]["model/loss"]
    pipe = assemble_pipeline(load_tokenizer(str(extracted["tokenizer"])), load_generator(str(exported)))
    images = pipe([0, 5], guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert pipe.sampler_defaults()["guidance_schedule"] == "cosine_power"
