"""Issue 28: no code from a checkpoint folder, no stale or silently wrong results, one clear error per bad input."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from test_faults import TinyModel, TinyTask, images, trainer


# ----------------------------------------------------------------------------------------------------------------
# Defect 1: every checkpoint part is read with weights_only=True
# ----------------------------------------------------------------------------------------------------------------
class _Marker:
    """A pickle that, when loaded without weights_only, creates the marker file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class TwoModuleTask(TinyTask):
    """Two trained modules: the checkpoint holds optimizer.bin and optimizer_1.bin."""

    def __init__(self):
        super().__init__()
        self.other = TinyModel()

    def modules(self):
        return {"model": self.model, "other": self.other}

    def losses(self, batch, step):
        features = batch["images"].mean(dim=(2, 3))
        yield "model", (self.model.linear(features) ** 2).mean(), {}
        yield "other", (self.other.linear(features) ** 2).mean(), {}


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "optimizer_1.bin", "scheduler.bin"])
def test_resume_never_unpickles_code_from_a_checkpoint_file(tmp_path, name):
    from vfmtok.tokenizer.utils.errors import CheckpointError

    output = tmp_path / "out"
    trainer(output, images(4), task=TwoModuleTask(), max_steps=2).fit()
    checkpoint = output / "checkpoints" / "step-00000002"
    assert (checkpoint / name).is_file()
    marker = tmp_path / "marker"
    torch.save(_Marker(marker), checkpoint / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        trainer(output, images(4), task=TwoModuleTask(), max_steps=4).fit(resume=True)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Defect 3: non-finite weights and a config.json of another model class
# ----------------------------------------------------------------------------------------------------------------
def _poison(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path))


def _saved_models(tmp_path: Path) -> dict:
    from test_dinotok import tiny as tiny_tokenizer
    from test_dit import TINY as DIT_TINY
    from test_gpt import tiny_model

    from vfmtok.generators.dit import DiTModel
    from vfmtok.generators.gpt import GPTModel
    from vfmtok.tokenizer.dinotok import DINOTokModel

    models = {GPTModel: tiny_model(), DiTModel: DiTModel(**DIT_TINY), DINOTokModel: tiny_tokenizer()}
    folders = {}
    for cls, model in models.items():
        folders[cls] = tmp_path / cls.__name__
        model.save_pretrained(folders[cls])
    return folders


def test_nonfinite_weights_are_refused_at_load_naming_the_tensor_unless_allowed(tmp_path):
    from vfmtok.tokenizer.interface import load_tokenizer
    from vfmtok.tokenizer.utils.errors import CheckpointError

    for cls, folder in _saved_models(tmp_path).items():
        kwargs = {"load_vfm_weights": False} if hasattr(cls, "load_vfm_weights") else {}
        name = sorted(k for k in cls.from_pretrained(folder, **kwargs).state_dict() if "weight" in k)[0]
        _poison(folder, name)
        with pytest.raises(CheckpointError, match=re.escape(name) + ".*allow_nonfinite"):
            cls.from_pretrained(folder, **kwargs)
        if kwargs:  # the tokenizer loader too
            with pytest.raises(CheckpointError, match=re.escape(name)):
                load_tokenizer(str(folder), **kwargs)
        model = cls.from_pretrained(folder, allow_nonfinite=True, **kwargs)
        assert torch.isnan(model.state_dict()[name]).all()


def test_config_of_another_model_class_is_refused(tmp_path):
    from vfmtok.generators.dit import DiTModel
    from vfmtok.generators.gpt import GPTModel
    from vfmtok.tokenizer.utils.errors import CheckpointError

    folders = _saved_models(tmp_path)
    for cls, folder in folders.items():
        other = next(c for c in folders if c is not cls)
        config = json.loads((folder / "config.json").read_text())
        config["_class_name"] = other.__name__
        (folder / "config.json").write_text(json.dumps(config))
        kwargs = {"load_vfm_weights": False} if hasattr(cls, "load_vfm_weights") else {}
        with pytest.raises(CheckpointError, match=f"holds a '{other.__name__}'.*not a {cls.__name__}"):
            cls.from_pretrained(folder, **kwargs)
    # a subclass of the class asked for is accepted
    class MyGPT(GPTModel):
        pass

    from test_gpt import tiny_model

    gpt = tmp_path / "gpt"
    tiny_model().save_pretrained(gpt)
    config = json.loads((gpt / "config.json").read_text())
    config["_class_name"] = "MyGPT"
    (gpt / "config.json").write_text(json.dumps(config))
    assert isinstance(GPTModel.from_pretrained(gpt), GPTModel)


# ----------------------------------------------------------------------------------------------------------------
# Defect 7: written files get the permissions a plain open() would give
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def umask():
    def set_umask(value: int) -> None:
        os.umask(value)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_atomically_written_files_and_folders_get_the_mode_of_a_plain_open(tmp_path, umask, mask):
    from test_gpt import tiny_model

    from vfmtok.tokenizer.utils.atomic import atomic_file, save_pretrained_atomically, write_text_atomically

    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain-dir").mkdir()
    file_mode, dir_mode = plain.stat().st_mode & 0o777, (tmp_path / "plain-dir").stat().st_mode & 0o777
    assert (file_mode, dir_mode) == (0o666 & ~mask, 0o777 & ~mask)
    write_text_atomically(tmp_path / "report.json", "{}")
    with atomic_file(tmp_path / "image.png") as path:
        path.write_bytes(b"png")
    save_pretrained_atomically(tiny_model(), tmp_path / "model")
    for path in [tmp_path / "report.json", tmp_path / "image.png", *(tmp_path / "model").iterdir()]:
        assert path.stat().st_mode & 0o777 == file_mode, path
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode


def test_training_checkpoints_get_the_mode_of_a_plain_open(tmp_path, umask):
    umask(0o022)
    output = tmp_path / "out"
    trainer(output, images(4), max_steps=2).fit()
    # (TinyTask exports with save_file itself; the suite's tasks use save_pretrained_atomically, tested above)
    written = [p for p in (output / "checkpoints").rglob("*")]
    private = [str(p.relative_to(output)) for p in written
               if p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)]
    assert not private


# ----------------------------------------------------------------------------------------------------------------
# Defect 5: flow sampling settings that would give garbage
# ----------------------------------------------------------------------------------------------------------------
from test_pipelines import flow_pipe  # noqa: E402,F401  (fixture)


@pytest.fixture
def swapped_scheduler(flow_pipe):  # noqa: F811
    original = flow_pipe.scheduler
    yield flow_pipe
    flow_pipe.scheduler = original


def test_flow_pipeline_refuses_a_scheduler_that_is_not_flow_matching(swapped_scheduler):
    from diffusers import DDPMScheduler

    from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    pipe = swapped_scheduler
    pipe.scheduler = DDPMScheduler()
    with pytest.raises(InvalidValueError, match="DDPMScheduler is not a flow-matching scheduler"):
        pipe([1], num_inference_steps=2, output_type="latent")
    with pytest.raises(InvalidValueError, match="DDPMScheduler is not a flow-matching scheduler"):
        VFMTokFlowPipeline(pipe.vae, pipe.transformer, DDPMScheduler())


@pytest.mark.parametrize("settings, needle", [({"shift": 0.0}, "shift must be a finite number > 0"),
                                              ({"shift": float("nan")}, "shift must be a finite number > 0"),
                                              ({"shift": -1.0}, "shift must be a finite number > 0"),
                                              ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
                                              ({"invert_sigmas": True}, "invert_sigmas"),
                                              ({"shift_terminal": 1.5}, "not a schedule decreasing")])
@pytest.mark.parametrize("sampler", ["scheduler", "sde"])
def test_flow_pipeline_refuses_bad_scheduler_settings_naming_them(swapped_scheduler, settings, needle, sampler):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vfmtok.tokenizer.utils.errors import InvalidValueError

    pipe = swapped_scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**settings)
    if sampler == "sde" and "decreasing" in needle:
        pytest.skip("the SDE sampler uses only the shift")
    with pytest.raises(InvalidValueError, match=needle):
        pipe([1], num_inference_steps=2, output_type="latent", sampler=sampler)


def test_flow_pipeline_never_returns_nonfinite_images(flow_pipe):  # noqa: F811
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    for output_type in ("latent", "pt"):
        with pytest.raises(InvalidValueError, match=r"non-finite|NaN or infinite.*guidance_scale=1e\+30"):
            flow_pipe([1], num_inference_steps=2, guidance_scale=1e30, output_type=output_type)
    assert torch.isfinite(flow_pipe([1], num_inference_steps=2, guidance_scale=4.0, output_type="pt").images).all()
