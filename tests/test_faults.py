"""Faults and bad inputs (issue 14): training that never hangs, never trains silently on garbage, never shares its
output directory; image modes decoded with their real range; labels checked once at load; bounded decoding work.

Most trainer tests run a tiny linear task on a handful of in-memory images (well under a second of training)."""
from __future__ import annotations

import io
import json
import logging
import os
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

from pipelines import data as data_module
from pipelines.config import TrainingConfig
from pipelines.data import ImageDataset, decode_image, load_image_dataset
from pipelines.train import trainer as trainer_module
from pipelines.train.extract import CodesDataset, extract_tokens
from pipelines.train.trainer import Trainer, TrainingDiverged, TrainingTask
from tokenizer.utils.errors import InvalidValueError, OutputExistsError

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
    with caplog.at_level(logging.WARNING, logger="pipelines.train.trainer"):
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
    from generators.gpt import GPTModel
    from tokenizer.utils.errors import CheckpointError

    folder = _saved_gpt(tmp_path, num_head=4)  # misspelt num_heads: diffusers only warns
    with pytest.raises(CheckpointError, match=r"unknown parameter\(s\) \['num_head'\]"):
        GPTModel.from_pretrained(folder)


def test_saved_config_with_a_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path):
    from generators.gpt import GPTModel
    from tokenizer.utils.errors import CheckpointError

    folder = _saved_gpt(tmp_path, depth="2")
    with pytest.raises(CheckpointError, match=r"config.json: depth: expected an integer, got str '2'"):
        GPTModel.from_pretrained(folder)
    folder = _saved_gpt(tmp_path, norm_eps=[1e-5])
    with pytest.raises(CheckpointError, match=r"norm_eps: expected a number, got list"):
        GPTModel.from_pretrained(folder)


def test_saved_models_with_a_correct_config_still_load(tmp_path):
    from generators.dit import DiTModel
    from generators.gpt import GPTModel
    from test_dit import TINY as DIT_TINY

    assert isinstance(GPTModel.from_pretrained(_saved_gpt(tmp_path)), GPTModel)
    DiTModel(**DIT_TINY).save_pretrained(tmp_path / "dit")
    assert isinstance(DiTModel.from_pretrained(tmp_path / "dit"), DiTModel)


def test_type_checking_lives_below_the_models_and_config_files_use_the_same_function():
    from pipelines import config as config_module
    from tokenizer.utils import types as types_module

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
    from generators import transport

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
    from generators import transport

    noise = torch.randn(2, 3)
    for sampler in (transport.sample_ode, transport.sample_sde):
        with pytest.raises(InvalidValueError, match="steps must be a positive integer"):
            sampler(_velocity, noise, None, steps)


def test_guided_denoiser_errors_name_the_callers_batch_size_and_refuse_bool_labels():
    from generators import transport
    from generators.dit import DiTModel
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
    from pipelines.cli import build_parser

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
    from tokenizer.utils.errors import CheckpointError

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
    from tokenizer.utils.errors import CheckpointError

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
