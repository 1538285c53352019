"""Faults and bad inputs (issue 14): training that never hangs, never trains silently on garbage, never shares its
output directory; image modes decoded with their real range; labels checked once at load; bounded decoding work.

Most trainer tests run a tiny linear task on a handful of in-memory images (well under a second of training)."""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vfmtok.pipelines import data as data_module
from vfmtok.pipelines.config import TrainingConfig
from vfmtok.pipelines.data import ImageDataset, decode_image, load_image_dataset
from vfmtok.pipelines.train import trainer as trainer_module
from vfmtok.pipelines.train.extract import CodesDataset, extract_tokens
from vfmtok.pipelines.train.trainer import Trainer, TrainingDiverged, TrainingTask
from vfmtok.tokenizer.utils.errors import InvalidValueError, OutputExistsError

from test_data import image_bytes, random_image, tiny_dataset



# ----------------------------------------------------------------------------------------------------------------
# A tiny task for the trainer
# ----------------------------------------------------------------------------------------------------------------
class InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); backward multiplies the gradient by inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class TinyModel(nn.Module):
    def __init__(self, num_classes=None):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        if num_classes is not None:
            self.config = SimpleNamespace(num_classes=num_classes)


class TinyTask(TrainingTask):
    export_name = "model"

    def __init__(self, num_classes=None, poisoned_steps=()):
        self.model = TinyModel(num_classes)
        self.poisoned_steps = set(poisoned_steps)  # 0-based steps whose gradients become inf

    def modules(self):
        return {"model": self.model}

    def losses(self, batch, step):
        features = batch["images"].mean(dim=(2, 3))
        loss = (self.model.linear(features) ** 2).mean()
        if step in self.poisoned_steps:
            loss = InfiniteGradient.apply(loss)
        yield "model", loss, {"model/loss": float(loss.detach())}

    def sample_images(self, model, batch, count):
        return None

    def export(self, model, directory):
        directory.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def training(**values) -> TrainingConfig:
    return TrainingConfig.from_dict({"max_steps": 4, "batch_size": 2, "num_workers": 0, "log_every": 1,
                                     "checkpoint_every": 2, "sample_every": 1000, "num_sample_images": 0,
                                     "log_with": ["none"], "keep_last_checkpoints": 5, **values})


def images(good: int, broken: int = 0, labels=None) -> ImageDataset:
    """``good`` decodable images followed by ``broken`` unreadable ones (labels 0.. unless given)."""
    table = tiny_dataset(good).to_dict()
    table["image"] += [{"bytes": b"not an image %d" % i, "path": None} for i in range(broken)]
    table["label"] = list(labels) if labels is not None else list(range(good + broken))
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return ImageDataset(datasets.Dataset.from_dict(table, features=features), image_size=16, augment="center",
                        flip=False)


def trainer(output: Path, dataset, task=None, accelerator=None, **values) -> Trainer:
    return Trainer(task or TinyTask(), training(**values), output, dataset, run_config={"data": "tiny-images"},
                   accelerator=accelerator)


def bounded_batches(monkeypatch, limit: int = 200) -> None:
    """Make a training loop that draws batches without ever making a step fail instead of hanging."""
    original = Trainer._batches

    def bounded(self):
        for count, batch in enumerate(original(self)):
            if count > limit:
                raise AssertionError(f"{count} batches drawn: the training loop makes no progress")
            yield batch

    monkeypatch.setattr(Trainer, "_batches", bounded)


def trainer_state(output: Path, step: int) -> dict:
    return json.loads((output / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# Defect 1: unreadable datasets
# ----------------------------------------------------------------------------------------------------------------
def test_dataset_without_a_readable_image_stops_instead_of_hanging(tmp_path, monkeypatch):
    bounded_batches(monkeypatch)
    with pytest.raises(InvalidValueError, match=r"6 of the 6 images drawn from dataset 'tiny-images'.*0\.5"):
        trainer(tmp_path / "out", images(0, broken=6)).fit()
    # Even with the fraction check off (1.0), a whole epoch without one readable image is an error.
    with pytest.raises(InvalidValueError, match=r"no image of dataset 'tiny-images' could be read.*all 6 drawn"):
        trainer(tmp_path / "out2", images(0, broken=6), max_unreadable_fraction=1.0).fit()


def test_mostly_unreadable_dataset_stops_above_the_configured_fraction(tmp_path, monkeypatch, caplog):
    bounded_batches(monkeypatch)
    with pytest.raises(InvalidValueError, match=r"5 of the 8 images .*max_unreadable_fraction = 0\.5.*index"):
        trainer(tmp_path / "out", images(3, broken=5)).fit()
    # Allowed by the user: it trains, and says loudly at each epoch's end that most images are unreadable.
    with caplog.at_level(logging.WARNING, logger="vfmtok.pipelines.train.trainer"):
        trainer(tmp_path / "allowed", images(3, broken=5), max_unreadable_fraction=0.9).fit()
    assert any("MOST IMAGES ARE UNREADABLE: 5 of 8" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match="max_unreadable_fraction"):
        TrainingConfig.from_dict({"max_unreadable_fraction": 1.5})


# ----------------------------------------------------------------------------------------------------------------
# Defect 2: non-finite gradients
# ----------------------------------------------------------------------------------------------------------------
def test_infinite_gradient_norm_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    output = tmp_path / "out"
    task = TinyTask(poisoned_steps={2})
    with pytest.raises(TrainingDiverged, match=r"gradient norm became (inf|nan) at step 3.*step-00000002"):
        trainer(output, images(8), task=task, max_steps=6).fit()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002"]
    # Without clipping the norm is still computed and checked.
    with pytest.raises(TrainingDiverged, match="at step 3"):
        trainer(tmp_path / "noclip", images(8), task=TinyTask(poisoned_steps={2}), max_grad_norm=None).fit()


def test_nonfinite_gradients_are_skipped_and_counted_when_asked(tmp_path):
    output = tmp_path / "out"
    task = TinyTask(poisoned_steps={1, 2})
    trainer(output, images(8), task=task, skip_nonfinite_gradients=True).fit()
    state = trainer_state(output, 4)
    assert state["step"] == 4 and state["skipped_updates"] == 2
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [0, 1, 2, 2]


def test_fp16_loss_scaler_overflow_is_not_divergence(tmp_path):
    from accelerate import Accelerator

    # CPU runs have no fp16 GradScaler (and accelerate's state is one per process): a CPU GradScaler stands in for
    # the one accelerate creates with mixed_precision fp16 on a GPU (used by its backward and optimizer step).
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu")
    task = TinyTask(poisoned_steps={1})
    trainer(tmp_path / "out", images(8), task=task, accelerator=accelerator).fit()
    assert trainer_state(tmp_path / "out", 4).get("skipped_updates", 0) == 0
    assert accelerator.scaler.get_scale() < 65536.0  # the scaler saw the overflow and lowered its scale


# ----------------------------------------------------------------------------------------------------------------
# Defect 3: one run per output directory
# ----------------------------------------------------------------------------------------------------------------
def test_second_run_on_the_same_output_directory_is_refused(tmp_path):
    output = tmp_path / "out"
    outcome = {}

    class Intruding(TinyTask):
        def losses(self, batch, step):
            if step == 1 and not outcome:
                try:
                    trainer(output, images(8)).fit()
                    outcome["second"] = "ran"
                except OutputExistsError as error:
                    outcome["second"] = str(error)
            yield from super().losses(batch, step)

    trainer(output, images(8), task=Intruding()).fit()
    assert f"pid {os.getpid()}" in outcome["second"] and "in use by another training run" in outcome["second"]
    trainer(output, images(8), max_steps=6).fit(resume=True)  # the lock went with the first run


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    output = tmp_path / "out"
    ready, report = os.pipe()
    pid = os.fork()  # a child holding the lock (forked: no second interpreter start-up), then killed with SIGKILL
    if pid == 0:
        try:
            with trainer_module.output_lock(output):
                os.write(report, b"locked")
                time.sleep(60)
        finally:
            os._exit(1)
    try:
        assert os.read(ready, 6) == b"locked"
        with pytest.raises(OutputExistsError, match=f"pid {pid} on host"):
            trainer(output, images(8)).fit()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(report)
    trainer(output, images(8)).fit()  # the killed holder's lock file is still there, but not held
    assert (output / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Defect 6: image modes with their real value range
# ----------------------------------------------------------------------------------------------------------------
def _encoded(image: Image.Image, format: str) -> dict:
    return {"bytes": image_bytes(image, format), "path": None}


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("mode,format", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF"),
                                         ("F", "TIFF"), ("L", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("P", "PNG"),
                                         ("PA", "TIFF"), ("RGBA", "PNG")])
def test_every_mode_decodes_with_its_real_value_range(mode, format):
    rng = np.random.default_rng(0)
    height, width = 6, 7
    if mode in ("I;16", "I;16B", "I"):
        values = rng.integers(0, 65536, (height, width)).astype(np.uint16)
        values[0, :3] = (0, 65535, 32896)  # black, white, the 8-bit middle grey 128 * 257
        if mode == "I;16B":
            source = Image.frombytes("I;16B", (width, height), values.astype(">u2").tobytes())
        else:  # uint16 -> I;16, int32 -> I
            source = Image.fromarray(values if mode == "I;16" else values.astype(np.int32))
        # Integer reference: round(v * 255 / 65535) (v / 257 is never exactly a half).
        expected = _gray((values.astype(np.int64) * 255 + 32767) // 65535)
    elif mode == "F":
        levels = rng.integers(0, 256, (height, width))
        source = Image.fromarray((levels / 255.0).astype(np.float32), mode="F")
        expected = _gray(levels)
    elif mode in ("L", "1"):
        levels = rng.integers(0, 256, (height, width)).astype(np.uint8)
        source = Image.fromarray(levels).convert(mode)
        expected = _gray(np.asarray(source.convert("L")) if mode == "1" else levels)
    elif mode == "LA":
        levels = rng.integers(0, 256, (height, width, 2)).astype(np.uint8)
        source = Image.fromarray(levels, mode="LA")
        expected = _gray(levels[..., 0])
    elif mode in ("P", "PA"):
        index = rng.integers(0, 16, (height, width)).astype(np.uint8)
        palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
        source = Image.fromarray(index, mode="P")
        source.putpalette(palette.reshape(-1).tolist())
        if mode == "PA":
            source = source.convert("PA")
        expected = palette[index]
    else:
        pixels = rng.integers(0, 256, (height, width, 4)).astype(np.uint8)
        source = Image.fromarray(pixels, mode="RGBA")
        expected = pixels[..., :3]
    encoded = _encoded(source, format)
    with Image.open(io.BytesIO(encoded["bytes"])) as reopened:  # the mode the decoder really meets
        assert reopened.mode == ("I;16" if mode == "I;16B" and format == "PNG" else mode), reopened.mode
    decoded = decode_image(encoded)
    assert decoded.mode == "RGB" and decoded.size == (width, height)
    np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_images_outside_the_understood_range_are_refused_as_unreadable():
    beyond = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))
    with pytest.raises(InvalidValueError, match=r"\[0, 65535\]"):
        decode_image(_encoded(beyond, "TIFF"))
    with pytest.raises(InvalidValueError, match=r"expected \[0, 1\]"):
        decode_image(_encoded(Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32), mode="F"), "TIFF"))


# ----------------------------------------------------------------------------------------------------------------
# Defect 7: labels checked once, at load
# ----------------------------------------------------------------------------------------------------------------
def test_labels_csv_with_a_negative_id_other_than_unlabeled_is_refused_at_load(tmp_path):
    for i in range(3):
        random_image(8, 8, i).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("file,class_index\n0.png,0\n1.png,-1\n2.png,-5\n")
    with pytest.raises(InvalidValueError, match=r"labels\.csv.*line 4 \(2\.png\): -5.*other than -1"):
        load_image_dataset(str(tmp_path))


def test_integer_label_column_is_checked_at_load(tmp_path):
    dataset = tiny_dataset(4)
    dataset = dataset.map(lambda example, i: {"label": -5 if i == 2 else example["label"]}, with_indices=True)
    dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(InvalidValueError, match=r"row 2: -5"):
        load_image_dataset(str(tmp_path / "saved"))


def test_label_equal_to_num_classes_is_refused_before_training(tmp_path):
    # 4 classes: label 4 is the generators' null class and label 5 does not exist; found before any step.
    dataset = images(8, labels=[0, 1, 2, 3, 4, 0, 5, 1])
    with pytest.raises(InvalidValueError, match=r"'tiny-images'.*2 label\(s\) outside \[0, 4\): row 4: 4, row 6: 5"
                                                r".*null \(unconditional\) class"):
        trainer(tmp_path / "out", dataset, task=TinyTask(num_classes=4)).fit()
    assert not (tmp_path / "out" / "checkpoints").exists()
    with pytest.raises(InvalidValueError, match=r"-1 marks an unlabeled image"):
        images(4, labels=[0, -1, 1, 2]).check_labels(4)
    with pytest.raises(InvalidValueError, match=r"row 1: 4"):
        ImageDataset(images(4, labels=[0, 4, 1, 2]).dataset, 16, "center", False, num_classes=4)


def fake_extraction(directory: Path, labels: list[int], valid: list[bool]) -> Path:
    directory.mkdir(parents=True)
    count = len(labels)
    np.save(directory / "codes.npy", np.zeros((count, 2, 4), dtype=np.int32))
    np.save(directory / "labels.npy", np.asarray(labels, dtype=np.int64))
    np.save(directory / "valid.npy", np.asarray(valid, dtype=bool))
    (directory / "meta.json").write_text(json.dumps({"format": 1, "kind": "codes", "num_images": count,
                                                     "num_views": 2, "shape": [4], "vocab_size": 16}))
    return directory


def test_codes_labels_are_checked_at_load_naming_the_file_and_row(tmp_path):
    with pytest.raises(InvalidValueError, match=r"labels\.npy.*row 2: -5"):
        CodesDataset(fake_extraction(tmp_path / "a", [0, 1, -5, 2], [True] * 4))
    # an unreadable image's placeholder label is not checked; num_classes bounds the rest
    codes = CodesDataset(fake_extraction(tmp_path / "b", [0, -1, 3, 2], [True, False, True, True]))
    with pytest.raises(InvalidValueError, match=r"labels\.npy.*row 2: 3.*null"):
        codes.check_labels(3)
    with pytest.raises(InvalidValueError, match=r"row 2: 3"):
        CodesDataset(tmp_path / "b", num_classes=3)


# ----------------------------------------------------------------------------------------------------------------
# Defect 11: bounded decoding work, extract --limit, leftovers of killed runs
# ----------------------------------------------------------------------------------------------------------------
def test_absurd_aspect_ratio_and_pixel_count_are_unreadable_with_a_reason(monkeypatch):
    strip = {"bytes": image_bytes(Image.new("L", (100000, 1)), "PNG"), "path": "strip.png"}
    started = time.perf_counter()
    with pytest.raises(InvalidValueError, match=r"100000x1 .*aspect ratio of 100000:1"):
        decode_image(strip)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    dataset = ImageDataset(datasets.Dataset.from_dict({"image": [strip], "label": [0]}, features=features), 256)
    sample = dataset[0]
    assert "aspect ratio" in sample["error"] and sample["error"].startswith("strip.png")
    assert time.perf_counter() - started < 2.0
    monkeypatch.setattr(data_module, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InvalidValueError, match=r"20x20 pixels exceeds the limit of 100 pixels"):
        decode_image(_encoded(random_image(20, 20, 0), "PNG"))


@pytest.mark.parametrize("limit", [-1, 0])
def test_extract_refuses_a_limit_below_one(tmp_path, limit):
    with pytest.raises(InvalidValueError, match="limit must be a positive"):
        extract_tokens(object(), str(tmp_path), tmp_path / "out", limit=limit)


def test_leftovers_of_a_killed_run_are_removed_on_the_next_start(tmp_path):
    output = tmp_path / "out"
    leftovers = [output / "checkpoints" / ".staging-step-00000002", output / ".model.staging-k3j4h5",
                 output / ".run_config.json.abcd1234.json", output / "samples" / ".step-00000003.png.x1y2z3.png"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.write_text("partial")
        else:
            path.mkdir()
            (path / "model.safetensors").write_text("partial")
    kept = [output / "notes.txt", output / ".my-hidden-file", output / ".model.old-abc"]  # old-: no model yet
    for path in kept:
        path.write_text("mine")
    trainer(output, images(8)).fit()
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in kept)


# ----------------------------------------------------------------------------------------------------------------
# Defect 9: config.json of a saved model
# ----------------------------------------------------------------------------------------------------------------
def _saved_gpt(tmp_path: Path, **edits) -> Path:
    from test_gpt import tiny_model

    folder = tmp_path / "gpt"
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edits.items():
        if value is _DELETE:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


_DELETE = object()


def test_saved_config_with_a_misspelt_parameter_is_refused_naming_it(tmp_path):
    from vfmtok.generators.gpt import GPTModel
    from vfmtok.tokenizer.utils.errors import CheckpointError

    folder = _saved_gpt(tmp_path, num_head=4)  # misspelt num_heads: diffusers only warns
    with pytest.raises(CheckpointError, match=r"unknown parameter\(s\) \['num_head'\]"):
        GPTModel.from_pretrained(folder)


def test_saved_config_with_a_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path):
    from vfmtok.generators.gpt import GPTModel
    from vfmtok.tokenizer.utils.errors import CheckpointError

    folder = _saved_gpt(tmp_path, depth="2")
    with pytest.raises(CheckpointError, match=r"config.json: depth: expected an integer, got str '2'"):
        GPTModel.from_pretrained(folder)
    folder = _saved_gpt(tmp_path, norm_eps=[1e-5])
    with pytest.raises(CheckpointError, match=r"norm_eps: expected a number, got list"):
        GPTModel.from_pretrained(folder)


def test_saved_models_with_a_correct_config_still_load(tmp_path):
    from vfmtok.generators.dit import DiTModel
    from vfmtok.generators.gpt import GPTModel
    from test_dit import TINY as DIT_TINY

    assert isinstance(GPTModel.from_pretrained(_saved_gpt(tmp_path)), GPTModel)
    DiTModel(**DIT_TINY).save_pretrained(tmp_path / "dit")
    assert isinstance(DiTModel.from_pretrained(tmp_path / "dit"), DiTModel)


def test_type_checking_lives_below_the_models_and_config_files_use_the_same_function():
    from vfmtok.pipelines import config as config_module
    from vfmtok.tokenizer.utils import types as types_module

    assert config_module.check_value is types_module.check_value


# ----------------------------------------------------------------------------------------------------------------
# Defect 10: non-finite and mistyped sampling arguments
# ----------------------------------------------------------------------------------------------------------------
NONFINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("argument", ["guidance_scale", "temperature", "guidance_power"])
def test_gpt_generate_refuses_nonfinite_arguments(argument, value):
    from test_gpt import tiny_model

    model = tiny_model()
    extra = {"guidance_schedule": "cosine_power", "guidance_scale": 2.0} if argument == "guidance_power" else {}
    with pytest.raises(InvalidValueError, match=f"{argument} must be a finite number"):
        model.generate(torch.tensor([1, 2]), **{**extra, argument: value})
    if argument != "temperature":
        with pytest.raises(InvalidValueError, match=f"{argument} must be a finite number"):
            model.guidance_scales(**{"guidance_scale": 2.0, "guidance_schedule": "cosine_power", argument: value})


@pytest.mark.parametrize("labels, needle", [([1.5], r"must be integers, got \[1.5\]"), ([1.0], "must be integers"),
                                            ([True], "must be integers"),
                                            (torch.tensor([True, False]), "dtype torch.bool")])
def test_gpt_generate_refuses_float_and_bool_labels_instead_of_truncating(labels, needle):
    from test_gpt import tiny_model

    with pytest.raises(InvalidValueError, match=needle):
        tiny_model().generate(labels)


def _velocity(x, t, y):
    return -x


@pytest.mark.parametrize("value", NONFINITE)
def test_transport_samplers_refuse_a_nonfinite_shift_and_guidance(value):
    from vfmtok.generators import transport

    noise = torch.randn(2, 3)
    for sampler in (transport.sample_ode, transport.sample_sde):
        with pytest.raises(InvalidValueError, match="shift must be a finite number"):
            sampler(_velocity, noise, None, 4, shift=value)
    with pytest.raises(InvalidValueError, match="shift must be a finite number"):
        transport.shift_time(torch.linspace(0, 1, 3), value)
    with pytest.raises(InvalidValueError, match="guidance_scale must be a finite number"):
        transport.guided_model(_velocity, value, null_class=10)


@pytest.mark.parametrize("steps", [2.5, 2.0, True, "4"])
def test_transport_samplers_refuse_a_non_integer_step_count(steps):
    from vfmtok.generators import transport

    noise = torch.randn(2, 3)
    for sampler in (transport.sample_ode, transport.sample_sde):
        with pytest.raises(InvalidValueError, match="steps must be a positive integer"):
            sampler(_velocity, noise, None, steps)


def test_guided_denoiser_errors_name_the_callers_batch_size_and_refuse_bool_labels():
    from vfmtok.generators import transport
    from vfmtok.generators.dit import DiTModel
    from test_dit import TINY as DIT_TINY

    model = DiTModel(**DIT_TINY).eval()
    guided = transport.guided_model(model, 1.5, null_class=model.null_class)
    noise = torch.randn(2, *model.latent_shape)
    with pytest.raises(InvalidValueError, match=r"class_labels must be a \(2,\) integer tensor, got torch.Size\(\[3\]\)"):
        transport.sample_ode(guided, noise, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(InvalidValueError, match="dtype torch.bool"):
        transport.sample_ode(guided, noise, torch.tensor([True, False]), 2)
    with pytest.raises(InvalidValueError, match="dtype torch.bool"):
        model(noise, torch.zeros(2), torch.tensor([True, False]))


# ----------------------------------------------------------------------------------------------------------------
# Defect 4: resume only into the same run
# ----------------------------------------------------------------------------------------------------------------
def run_trainer(output: Path, dataset=None, run_config=None, **values) -> Trainer:
    return Trainer(TinyTask(), training(**values), output, dataset if dataset is not None else images(8),
                   run_config=run_config if run_config is not None else {"data": "tiny-images", "loss": {"w": 1.0}})


def test_resume_refuses_a_different_run_naming_every_difference(tmp_path):
    output = tmp_path / "out"
    run_trainer(output, max_steps=2).fit()
    with pytest.raises(InvalidValueError) as error:
        run_trainer(output, run_config={"data": "other-images", "loss": {"w": 2.0}}, max_steps=4, learning_rate=2e-4,
                    seed=3).fit(resume=True)
    message = str(error.value)
    for needle in ("data: 'tiny-images' in the checkpoint, 'other-images' now", "loss.w: 1.0", "training.seed: 0",
                   "training.learning_rate: 0.0001", "--resume-allow-change"):
        assert needle in message
    assert "max_steps" not in message  # options that never change the trajectory may differ
    with pytest.raises(InvalidValueError, match="dataset_size: 8 in the checkpoint, 10 now"):
        run_trainer(output, dataset=images(10), max_steps=4).fit(resume=True)


def test_resume_with_a_larger_batch_size_is_a_clear_error(tmp_path):
    output = tmp_path / "out"
    run_trainer(output, max_steps=3, checkpoint_every=3).fit()
    with pytest.raises(InvalidValueError, match=r"training.batch_size: 2 in the checkpoint, 4 now"):
        run_trainer(output, max_steps=4, batch_size=4).fit(resume=True)
    # allowed deliberately: the data position carries over in images (no start-batch error)
    run_trainer(output, max_steps=4, batch_size=4).fit(resume=True, allow_changes=("batch_size",))
    assert trainer_state(output, 4)["training"]["batch_size"] == 4


def test_resume_with_an_allowed_change_uses_the_new_value_and_free_options_may_differ(tmp_path):
    output = tmp_path / "out"
    run_trainer(output, max_steps=2).fit()
    run_trainer(output, max_steps=4, learning_rate=3e-3, log_every=2, num_workers=0, keep_last_checkpoints=4,
                sample_every=7).fit(resume=True, allow_changes=("learning_rate",))
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [round(line["lr"], 6) for line in lines if line["step"] > 2] == [3e-3]
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["training"]["learning_rate"] == 3e-3
    assert any("learning_rate" in change for change in run_config["resumed_with_changes"])
    with pytest.raises(InvalidValueError, match="not an option of the run"):
        run_trainer(output, max_steps=6).fit(resume=True, allow_changes=("learning_rat",))


def test_cli_train_commands_take_resume_allow_change():
    from vfmtok.pipelines.cli import build_parser

    for kind in (["tokenizer", "--data", "d"], ["ar"], ["flow"]):
        args = build_parser().parse_args(["train", *kind, "--config", "c.yaml", "--output-dir", "o", "--resume",
                                          "--resume-allow-change", "learning_rate", "data"])
        assert args.resume_allow_change == ["learning_rate", "data"]


# ----------------------------------------------------------------------------------------------------------------
# Defect 5: every part of a checkpoint is restored, or resuming is an error naming the file
# ----------------------------------------------------------------------------------------------------------------
def _two_checkpoints(tmp_path: Path) -> Path:
    output = tmp_path / "out"
    run_trainer(output, max_steps=4, checkpoint_every=2).fit()
    return output


@pytest.mark.parametrize("name, content", [("random_states_0.pkl", b"garbage, not a pickle"),
                                           ("random_states_0.pkl", None),  # a pickle without the RNG states
                                           ("random_states_0.pkl", b""),
                                           ("optimizer.bin", b"truncated"),
                                           ("scheduler.bin", b"truncated"),
                                           ("model.safetensors", b"truncated"),
                                           ("ema.safetensors", b"truncated"),
                                           ("buffers.safetensors", b"truncated"),
                                           ("trainer_state.json", b"{\"step\": ")])
def test_unrestorable_checkpoint_file_is_an_error_naming_it_and_the_older_checkpoint(tmp_path, name, content):
    from vfmtok.tokenizer.utils.errors import CheckpointError

    output = _two_checkpoints(tmp_path)
    newest = output / "checkpoints" / "step-00000004"
    if content is None:
        torch.save({"step": 4}, newest / name)
    else:
        (newest / name).write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        run_trainer(output, max_steps=6, checkpoint_every=2).fit(resume=True)
    message = str(error.value)
    assert name in message and "step-00000004" in message
    assert "older checkpoint" in message and "step-00000002" in message and "delete or move" in message
    # following the advice resumes from the older checkpoint
    newest.rename(output / "checkpoints" / "corrupt-step-00000004")
    run_trainer(output, max_steps=6, checkpoint_every=2).fit(resume=True)
    assert trainer_state(output, 6)["step"] == 6


def test_unrestorable_only_checkpoint_says_there_is_no_older_one(tmp_path):
    from vfmtok.tokenizer.utils.errors import CheckpointError

    output = tmp_path / "out"
    run_trainer(output, max_steps=2, checkpoint_every=2).fit()
    (output / "checkpoints" / "step-00000002" / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"random_states_0.pkl cannot be read .*No older checkpoint"):
        run_trainer(output, max_steps=4).fit(resume=True)


def test_resume_restores_the_rng_states_of_the_checkpoint(tmp_path):
    output = tmp_path / "out"
    run_trainer(output, max_steps=2, checkpoint_every=2).fit()
    saved = torch.load(output / "checkpoints" / "step-00000002" / "random_states_0.pkl", weights_only=False)
    resumed = run_trainer(output, max_steps=2)
    torch.manual_seed(12345)  # whatever the state before resuming
    resumed._check_output_dir(True)
    resumed._prepare()
    resumed.load_checkpoint(output / "checkpoints" / "step-00000002")
    assert torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])


# ----------------------------------------------------------------------------------------------------------------
# Defect 8: a full disk, a missing --vfm-weights file, latent statistics
# ----------------------------------------------------------------------------------------------------------------
NO_SPACE = "No space left on device"


def test_disk_full_during_a_checkpoint_write_says_so_and_leaves_no_staging(tmp_path, monkeypatch):
    from vfmtok.tokenizer.utils.errors import DiskFullError, VFMTokError

    output = tmp_path / "out"
    original = trainer_module.save_file

    def failing(tensors, filename, *args, **kwargs):
        if "step-00000004" in str(filename):
            raise OSError(errno.ENOSPC, NO_SPACE)
        return original(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "save_file", failing)
        with pytest.raises(DiskFullError) as error:
            run_trainer(output, max_steps=4, checkpoint_every=2).fit()
    message = str(error.value)
    assert isinstance(error.value, VFMTokError) and isinstance(error.value, OSError)
    assert message.startswith("the disk is full") and "step-00000004" in message
    assert "last complete checkpoint" in message and "step-00000002" in message and "--resume" in message
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002"]  # no staging left
    run_trainer(output, max_steps=4, checkpoint_every=2).fit(resume=True)  # space freed: the run continues
    assert trainer_state(output, 4)["step"] == 4


@pytest.mark.parametrize("free_bytes", [0, 10 ** 12])
def test_a_write_error_without_errno_is_disk_full_only_when_the_disk_has_no_space(tmp_path, monkeypatch, free_bytes):
    from accelerate import Accelerator

    from vfmtok.tokenizer.utils import atomic as atomic_module
    from vfmtok.tokenizer.utils.errors import DiskFullError

    # torch.save drops the errno: "PytorchStreamWriter failed writing file data/0: file write failed"
    def failing(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(Accelerator, "save_state", failing)
    monkeypatch.setattr(atomic_module, "_free_bytes", lambda path: free_bytes)
    output = tmp_path / "out"
    with pytest.raises((DiskFullError, RuntimeError)) as error:
        run_trainer(output, max_steps=2, checkpoint_every=2).fit()
    if free_bytes == 0:
        assert isinstance(error.value, DiskFullError), repr(error.value)
        assert str(error.value).startswith("the disk is full") and "step-00000002" in str(error.value)
        assert "no checkpoint was completed yet" in str(error.value)
    else:  # another failure: its own error, not a misleading disk-full one
        assert type(error.value) is RuntimeError and "file write failed" in str(error.value)
    assert list((output / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, NO_SPACE), OSError(errno.EDQUOT, "Disk quota exceeded"),
                                     # safetensors wraps the OS error in its own exception
                                     Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                               'message: "No space left on device" })')])
def test_disk_full_during_an_export_or_a_report_names_the_path_and_removes_the_partial(tmp_path, monkeypatch,
                                                                                       failure):
    from vfmtok.tokenizer.utils.atomic import save_pretrained_atomically, write_text_atomically
    from vfmtok.tokenizer.utils.errors import DiskFullError

    class Exporting:
        def save_pretrained(self, directory):
            (Path(directory) / "config.json").write_text("{}")
            raise failure

    target = tmp_path / "exported"
    with pytest.raises(DiskFullError, match=f"^the disk is full: .*{target}"):
        save_pretrained_atomically(Exporting(), target)
    assert list(tmp_path.iterdir()) == []

    def failing_write(self, *args, **kwargs):
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", failing_write)
        with pytest.raises(DiskFullError, match=r"disk is full: .*report\.json"):
            write_text_atomically(tmp_path / "report.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_other_write_failures_keep_their_own_error_and_remove_the_partial(tmp_path):
    from vfmtok.tokenizer.utils.atomic import save_pretrained_atomically

    class Broken:
        def save_pretrained(self, directory):
            (Path(directory) / "config.json").write_text("{}")
            raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="^not serialisable$"):
        save_pretrained_atomically(Broken(), tmp_path / "exported")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["/nonexistent/dinov2_vitl14_reg4_pretrain.pth", "weights/dinov2.pth",
                                    "./dinov2-folder", "~/no/such/vfm", "dinov2.safetensors", "models/vfm/dinov2"])
def test_missing_vfm_weights_file_is_a_missing_file_error_naming_it(source):
    from test_vfm import make_vfm

    from vfmtok.tokenizer.utils.errors import MissingFileError

    with pytest.raises(MissingFileError) as error:
        make_vfm("dinov2").load_pretrained(source)
    message = str(error.value)
    assert f"file not found: {str(Path(source).expanduser())!r}" in message
    assert "hub repo" not in message.lower() and "huggingface.co" not in message


def test_hub_ids_and_timm_names_still_go_to_the_hub(monkeypatch):
    from test_vfm import make_vfm

    from vfmtok.tokenizer.vfm import FrozenVFM

    asked = []
    monkeypatch.setattr(FrozenVFM, "_load_hf_pretrained", lambda self, source: asked.append(("hf", source)))
    monkeypatch.setattr(FrozenVFM, "_load_timm_pretrained", lambda self, source: asked.append(("timm", source)))
    make_vfm("dinov2").load_pretrained("facebook/dinov2-with-registers-large")
    make_vfm("timm").load_pretrained("vit_large_patch14_reg4_dinov2.lvd142m")
    assert asked == [("hf", "facebook/dinov2-with-registers-large"), ("timm", "vit_large_patch14_reg4_dinov2.lvd142m")]


def fake_latents(directory: Path, values: np.ndarray, valid=None) -> Path:
    """An extraction directory of continuous latents (N, V, C, h, w) as `vfmtok extract` writes it."""
    directory.mkdir(parents=True)
    count = len(values)
    np.save(directory / "latents.npy", values.astype(np.float16))
    np.save(directory / "labels.npy", np.arange(count, dtype=np.int64) % 10)
    np.save(directory / "valid.npy", np.asarray(valid if valid is not None else [True] * count, dtype=bool))
    (directory / "meta.json").write_text(json.dumps({"format": 1, "kind": "latents", "num_images": count,
                                                     "num_views": values.shape[1], "shape": list(values.shape[2:]),
                                                     "vocab_size": None}))
    return directory


def test_nonfinite_latents_give_no_latent_statistics_file(tmp_path):
    from vfmtok.pipelines.cli import main
    from vfmtok.pipelines.train.flow import LATENT_STATS_NAME, write_latent_statistics

    values = np.random.default_rng(0).standard_normal((6, 2, 8, 4, 4))
    values[1, 0, 0, 0, 0] = np.nan
    values[4, 1, 3, 2, 1] = np.inf
    values[4, 0, 0, 0, 0] = -np.inf
    values[5, 0, 0, 0, 0] = np.nan  # row 5 is an unreadable image: its placeholder is never used
    directory = fake_latents(tmp_path / "latents", values, valid=[True] * 5 + [False])
    with pytest.raises(InvalidValueError, match=r"latents\.npy' holds 3 non-finite .* in 2 image\(s\) \(rows \[1, 4\]\)"):
        write_latent_statistics(directory)
    assert main(["latent-stats", "--latents", str(directory)]) != 0
    assert sorted(p.name for p in directory.iterdir()) == ["labels.npy", "latents.npy", "meta.json", "valid.npy"]
    assert not (directory / LATENT_STATS_NAME).exists()


def test_nonfinite_or_zero_statistics_are_not_written(tmp_path, monkeypatch):
    from vfmtok.pipelines.train import flow as flow_module

    directory = fake_latents(tmp_path / "latents", np.zeros((2, 1, 2, 2, 2)))
    mean, std = torch.zeros(2, 2, 2), torch.ones(2, 2, 2)
    mean[0, 0, 0] = mean[1, 1, 1] = float("nan")
    std[0, 1, 0] = 0.0
    monkeypatch.setattr(flow_module, "latent_statistics", lambda dataset: {"mean": mean, "std": std})
    with pytest.raises(InvalidValueError, match=r"latent_stats\.safetensors' \(not written\): 2 of the 8 elements of "
                                                r"'mean' are not finite and 1 of the 8 elements of 'std'"):
        flow_module.write_latent_statistics(directory)
    assert not (directory / flow_module.LATENT_STATS_NAME).exists()


@pytest.mark.parametrize("stats, error, needle", [
    ({"mean": torch.zeros(8, 4, 4)}, "CheckpointError", r"need 'mean' and 'std' \(or 'var'\), found \['mean'\]"),
    ({"mean": torch.zeros(8, 4, 4), "std": torch.full((8, 4, 4), float("nan"))}, "InvalidValueError",
     r"0 of the 128 elements of 'mean' are not finite and 128 of the 128 elements of 'std'"),
    ({"mean": torch.zeros(8, 4, 4), "std": torch.zeros(8, 4, 4)}, "InvalidValueError",
     r"128 of the 128 elements of 'std' are not finite or not > 0")])
def test_train_flow_refuses_bad_latent_statistics_naming_the_file(tmp_path, stats, error, needle):
    from test_train_flow import flow_config

    from vfmtok.pipelines.train.flow import train_flow

    latents = fake_latents(tmp_path / "latents", np.random.default_rng(0).standard_normal((4, 2, 8, 4, 4)))
    stats_file = tmp_path / "stats.safetensors"
    save_file(stats, str(stats_file))
    with pytest.raises(InvalidValueError) as raised:
        train_flow(flow_config(tmp_path, max_steps=1), tmp_path / "out", latents=str(latents),
                   latent_stats=str(stats_file))
    assert type(raised.value).__name__ == error
    assert str(stats_file) in str(raised.value)
    assert re.search(needle, str(raised.value)), str(raised.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------------
# Defect 11: partial outputs of killed `vfmtok extract` and benchmark runs
# ----------------------------------------------------------------------------------------------------------------
def _left_by_a_killed_writer(path: Path, directory: bool, age_s: float = 3600) -> Path:
    if directory:
        path.mkdir()
        (path / "codes.npy").write_text("partial")
    else:
        path.write_text("partial")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


class FakeTokenizer:
    """What extract_tokens asks of a discrete tokenizer (4 codes per image, all zero)."""
    input_size, is_discrete, config = 16, True, {}
    code_layout = SimpleNamespace(vocab_size=16)

    def to(self, device):
        return self

    def eval(self):
        return self

    def token_shape(self):
        return (4,)

    def encode(self, images):
        return torch.zeros(len(images), 4, dtype=torch.long)

    def tokenizer_summary(self):
        return {}


def test_extract_removes_the_staging_of_a_killed_extraction_but_not_a_live_one(tmp_path):
    import fcntl

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        random_image(16, 16, i).save(data / f"{i}.png")
    (data / "labels.csv").write_text("file,class_index\n0.png,0\n1.png,1\n2.png,2\n")
    stale = _left_by_a_killed_writer(tmp_path / ".codes.staging-k3j4h5q1", directory=True)
    live = _left_by_a_killed_writer(tmp_path / ".codes.staging-live0001", directory=True)
    young = _left_by_a_killed_writer(tmp_path / ".codes.staging-young001", directory=True, age_s=0)
    other = _left_by_a_killed_writer(tmp_path / ".other.staging-abcd1234", directory=True)  # another target's
    holder = os.open(live, os.O_RDONLY)  # an extraction still running (its writer holds the lock)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        extract_tokens(FakeTokenizer(), str(data), tmp_path / "codes", num_workers=0)
    finally:
        os.close(holder)
    # the young unlocked one too (issue 28, 10): every writer of a staging folder of "codes" holds the target's
    # exclusive lock before creating it, so under that lock an unlocked one is a killed writer's at any age
    assert not stale.exists() and live.exists() and not young.exists() and other.exists()
    assert json.loads((tmp_path / "codes" / "meta.json").read_text())["num_images"] == 3


def test_benchmark_shard_removes_the_temporary_files_of_a_killed_write(tmp_path):
    from vfmtok.evaluation.benchmark import _checked_shard, _write_shard

    folder = tmp_path / "samples" / "cfg-1.5"
    folder.mkdir(parents=True)
    leftovers = [_left_by_a_killed_writer(folder / ".shard-00000.npz.a1b2c3d4.npz", directory=False),
                 _left_by_a_killed_writer(folder / ".shard-00000.json.e5f6g7h8.json", directory=False)]
    images, labels = np.zeros((2, 4, 4, 3), dtype=np.uint8), np.array([1, 2])
    _write_shard(folder / "shard-00000.npz", images, labels, "settings")
    assert [p for p in leftovers if p.exists()] == []
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.json", "shard-00000.npz"]
    assert _checked_shard(folder / "shard-00000.npz", "settings", 2) is not None


# ----------------------------------------------------------------------------------------------------------------
# Unreadable images under DDP: counted over all processes
# ----------------------------------------------------------------------------------------------------------------
def another_process(monkeypatch, unreadable_per_batch: int = 0, empty_at=()) -> list:
    """Stand in for a second process in the trainer's sum over processes: each of its micro-batches draws 2 images,
    ``unreadable_per_batch`` of them unreadable (both at the micro-batch numbers in ``empty_at``)."""
    calls = []

    def summed(self, values):
        examples, skipped, empty = values
        calls.append(list(values))
        if len(calls) - 1 in empty_at:
            return [examples, skipped + 2, empty + 1]
        return [examples + 2 - unreadable_per_batch, skipped + unreadable_per_batch, empty]

    monkeypatch.setattr(Trainer, "_sum_over_processes", summed)
    return calls


def test_unreadable_fraction_is_checked_over_all_processes(tmp_path, monkeypatch):
    bounded_batches(monkeypatch)
    another_process(monkeypatch, unreadable_per_batch=1)
    # this process reads every image; with the other's, 2 of the first 8 drawn are unreadable (25% > 20%)
    with pytest.raises(InvalidValueError, match=r"2 of the 8 images drawn .*max_unreadable_fraction = 0\.2"):
        trainer(tmp_path / "out", images(8), max_unreadable_fraction=0.2).fit()


def test_most_images_unreadable_on_one_process_only_is_not_the_whole_run(tmp_path, monkeypatch):
    # 5 of this process's 8 images are unreadable, but the other process reads all of its 8
    calls = another_process(monkeypatch)
    trainer(tmp_path / "out", images(3, broken=5), max_steps=1, checkpoint_every=1).fit()
    assert calls  # the counts went through the sum over processes


def test_skipped_images_and_images_seen_are_counted_over_all_processes(tmp_path, monkeypatch):
    calls = another_process(monkeypatch, unreadable_per_batch=1, empty_at={1})
    output = tmp_path / "out"
    trainer(output, images(8)).fit()
    state = trainer_state(output, 4)
    # 5 micro-batches for 4 steps: the other process's second one had no readable image, so both skipped it
    assert len(calls) == 5 and (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    assert state["skipped_images"] == 4 * 1 + 2
    assert state["images_seen"] == 4 * (2 + 1)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_images"] == 6


def test_two_processes_skip_empty_micro_batches_alike_and_count_unreadable_images_together(tmp_path):
    """Under DDP (2 CPU processes): a micro-batch without a readable image on either process is skipped by both (no
    unpaired gradient synchronisation, no hang), and skipped_images counts both processes' unreadable images."""
    import subprocess
    import sys

    from vfmtok.pipelines.data import ResumableBatchSampler

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom test_faults import images, trainer\n"
                      "trainer(Path(sys.argv[1]), images(8, broken=8), max_unreadable_fraction=0.9, max_steps=3,\n"
                      "        checkpoint_every=3).fit()\n")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29519", str(script), str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "tests"),
           "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The expected counts, from the two ranks' batches of indices (indices >= 8 are the unreadable images).
    seed = training().seed
    samplers = [ResumableBatchSampler(16, 2, seed=seed, num_replicas=2, rank=rank) for rank in (0, 1)]
    steps = skipped = seen = 0
    epoch = 0
    while steps < 3:
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for pair in zip(*(list(sampler) for sampler in samplers)):
            broken = [sum(index >= 8 for index, _ in batch) for batch in pair]
            skipped += sum(broken)
            if all(b < len(batch) for b, batch in zip(broken, pair)):
                steps += 1
                seen += sum(len(batch) - b for b, batch in zip(broken, pair))
            if steps == 3:
                break
        epoch += 1
    state = trainer_state(output, 3)
    assert (state["skipped_images"], state["images_seen"]) == (skipped, seen)
