"""Issue 28: no code from a checkpoint folder, no stale or silently wrong results, one clear error per bad input."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
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


# ----------------------------------------------------------------------------------------------------------------
# Defect 2: cached evaluation results follow the content, not the names
# ----------------------------------------------------------------------------------------------------------------
def _class_folder(root: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


class _MeanFeatures:
    """A stand-in extractor: per-image channel means as features (counts its calls)."""

    sha256 = "0" * 64
    has_fc = False

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        mean = batch.float().mean(dim=(2, 3)).numpy()
        return {"pool": mean, "spatial": mean}


@pytest.mark.parametrize("layout", ["class-folders", "labels.csv"])
def test_reference_with_replaced_images_of_the_same_names_is_measured_again(tmp_path, monkeypatch, layout):
    from vfmtok.evaluation.fid import _cached_features, load_source

    monkeypatch.setenv("VFMTOK_CACHE", str(tmp_path / "cache"))
    folder = _class_folder(tmp_path / "ref", seed=0)
    if layout == "labels.csv":
        files = sorted(folder.rglob("*.png"))
        (folder / "labels.csv").write_text("file,class_index\n" + "".join(
            f"{p.relative_to(folder)},{int(p.parent.name == 'dog')}\n" for p in files))
    extractor = _MeanFeatures()
    first = _cached_features(load_source(folder), extractor, batch_size=4)
    assert np.array_equal(_cached_features(load_source(folder), extractor, batch_size=4)["pool"], first["pool"])
    calls = extractor.calls
    assert calls and _cached_features(load_source(folder), extractor, batch_size=4) and extractor.calls == calls
    _class_folder(folder, seed=1)  # the same names, other images
    second = _cached_features(load_source(folder), extractor, batch_size=4)
    assert extractor.calls > calls and not np.array_equal(second["pool"], first["pool"])


def test_a_truncated_feature_cache_file_is_measured_again(tmp_path, monkeypatch):
    from vfmtok.evaluation.fid import _cached_features, load_source

    monkeypatch.setenv("VFMTOK_CACHE", str(tmp_path / "cache"))
    folder = _class_folder(tmp_path / "ref", seed=0)
    first = _cached_features(load_source(folder), _MeanFeatures(), batch_size=4)
    (cached,) = (tmp_path / "cache").rglob("*.npz")
    cached.write_bytes(cached.read_bytes()[:50])
    again = _cached_features(load_source(folder), _MeanFeatures(), batch_size=4)
    assert np.array_equal(again["pool"], first["pool"])


def test_pipeline_weights_fingerprint_follows_the_weights_not_the_path(tmp_path):
    from vfmtok.pipelines import load_pipeline
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline
    from vfmtok.pipelines.config import build_model

    root = Path(__file__).resolve().parents[1] / "configs"
    torch.manual_seed(0)
    pipe = VFMTokARPipeline(build_model(root / "tokenizer" / "vfmtok-tiny.yaml").eval(),
                            build_model(root / "ar" / "gpt-tiny.yaml").eval())
    pipe.save_pretrained(tmp_path / "a")
    pipe.save_pretrained(tmp_path / "b")
    one = load_pipeline(str(tmp_path / "a")).weights_fingerprint()
    assert one == pipe.weights_fingerprint() == load_pipeline(str(tmp_path / "b")).weights_fingerprint()
    with torch.no_grad():
        pipe.transformer.head.weight.add_(1e-3)
    pipe.save_pretrained(tmp_path / "a")  # other weights at the same path
    assert load_pipeline(str(tmp_path / "a")).weights_fingerprint() != one
    with torch.no_grad():  # the frozen VFM, held outside the tokenizer's state dict, counts too
        next(pipe.vqvae.frozen("vfm").parameters()).add_(1.0)
    assert pipe.weights_fingerprint() != load_pipeline(str(tmp_path / "a")).weights_fingerprint()


from test_evaluation import WEIGHTS, extractor, halves, needs_shared  # noqa: E402,F401  (fixtures)


@needs_shared
def test_benchmark_rerun_after_the_weights_changed_at_the_same_path_regenerates_every_shard(
        extractor, halves, tmp_path):  # noqa: F811
    from vfmtok.evaluation.benchmark import run_benchmark
    from vfmtok.pipelines import load_pipeline
    from vfmtok.pipelines.config import build_model
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline

    root = Path(__file__).resolve().parents[1] / "configs"
    torch.manual_seed(0)
    gpt = build_model(root / "ar" / "gpt-tiny.yaml").eval()
    with torch.no_grad():
        gpt.head.weight.normal_(0, 0.5)
    folder = tmp_path / "pipe"
    VFMTokARPipeline(build_model(root / "tokenizer" / "vfmtok-tiny.yaml").eval(), gpt).save_pretrained(folder)
    out = tmp_path / "bench"
    kwargs = dict(num_samples=4, guidance_scales=[1.0], reference=str(halves[1]), seed=1, batch_size=4, shard_size=2,
                  output_size=64, inception_weights=str(WEIGHTS))
    first = run_benchmark(str(folder), out, **kwargs)
    shards = sorted((out / "samples" / "cfg-1").glob("shard-*.npz"))
    kept = {p: p.stat().st_mtime_ns for p in shards}
    same = run_benchmark(str(folder), out, **kwargs)  # nothing changed: every shard is kept
    assert all(p.stat().st_mtime_ns == kept[p] for p in shards) and same["settings"][0]["fid"] == first["settings"][0]["fid"]
    pipe = load_pipeline(str(folder))
    with torch.no_grad():
        pipe.transformer.head.weight.normal_(0, 0.5)
    pipe.save_pretrained(folder)  # other weights at the same path
    second = run_benchmark(str(folder), out, **kwargs)
    assert all(p.stat().st_mtime_ns != kept[p] for p in shards)
    assert second["settings"][0]["fid"] != first["settings"][0]["fid"]
    assert second["settings"][0]["protocol"]["weights_sha256"] != first["settings"][0]["protocol"]["weights_sha256"]


@needs_shared
def test_benchmark_with_too_few_samples_fails_before_generating(halves, tmp_path, monkeypatch):  # noqa: F811
    from vfmtok.evaluation import benchmark
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    def never(*args, **kwargs):
        raise AssertionError("generated before checking the sample count")

    monkeypatch.setattr(benchmark, "_generate_shard", never)
    with pytest.raises(InvalidValueError, match=r"2 sample\(s\) are too few.*at least 4"):
        benchmark.run_benchmark("unused", tmp_path / "bench", num_samples=2, guidance_scales=[1.0],
                                reference=str(halves[1]), inception_weights=str(WEIGHTS))


# ----------------------------------------------------------------------------------------------------------------
# Defect 4: silently wrong results (bool class ids, a covariance that is not one)
# ----------------------------------------------------------------------------------------------------------------
def test_pipelines_refuse_a_bool_tensor_as_class_ids(flow_pipe):  # noqa: F811
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="torch.bool"):
        flow_pipe.resolve_class_labels(torch.tensor([True, False]))
    assert flow_pipe.resolve_class_labels(torch.tensor([1, 0])) == [1, 0]


def test_ambiguous_class_name_is_an_error_listing_the_ids(flow_pipe):  # noqa: F811
    from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    pipe = VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, None,
                              id2label={i: ("maillot" if i in (3, 7) else f"class {i}")
                                        for i in range(flow_pipe.transformer.config.num_classes)})
    with pytest.raises(InvalidValueError, match=r"'maillot' is ambiguous: classes \[3, 7\]"):
        pipe.resolve_class_labels("maillot")


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s - 10 * np.eye(len(s)), "not positive semi-definite"),
    (lambda s: s + np.triu(np.ones_like(s), 1), "not symmetric"),
    (lambda s: s * np.nan, r"sigma\).*non-finite"),
])
def test_reference_statistics_that_are_no_covariance_are_refused_naming_the_file(tmp_path, edit, needle):
    from vfmtok.evaluation.fid import load_source
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    features = np.random.default_rng(0).normal(size=(50, 8))
    sigma = np.cov(features, rowvar=False)
    path = tmp_path / "ref.npz"
    np.savez(path, mu=features.mean(0), sigma=edit(sigma), num_samples=50)
    with pytest.raises(InvalidValueError, match="ref.npz.*" + needle):
        load_source(path)
    np.savez(path, mu=features.mean(0), sigma=sigma, num_samples=50)
    assert load_source(path).kind == "statistics"


# ----------------------------------------------------------------------------------------------------------------
# Defect 10: two extractions into one folder
# ----------------------------------------------------------------------------------------------------------------
def test_second_extraction_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    from test_dinotok import tiny as tiny_tokenizer

    from vfmtok.pipelines.train.extract import extract_tokens
    from vfmtok.tokenizer.utils.errors import OutputExistsError

    data, output = _class_folder(tmp_path / "data", seed=0), tmp_path / "codes"
    tokenizer, outcome = tiny_tokenizer(), {}
    encode = tokenizer.encode

    def intruding(images):
        if not outcome:
            outcome["second"] = "started"
            try:
                extract_tokens(tiny_tokenizer(), str(data), output, batch_size=8, num_workers=0)
                outcome["second"] = "ran"
            except OutputExistsError as error:
                outcome["second"] = str(error)
        return encode(images)

    tokenizer.encode = intruding
    extract_tokens(tokenizer, str(data), output, batch_size=8, num_workers=0)
    assert "being written by another process" in outcome["second"] and f"pid {os.getpid()}" in outcome["second"]
    assert (output / "meta.json").is_file() and not list(tmp_path.glob(".codes.*"))
    with pytest.raises(OutputExistsError, match="already exists"):  # and after it: the folder is taken
        extract_tokens(tiny_tokenizer(), str(data), output, batch_size=8, num_workers=0)
