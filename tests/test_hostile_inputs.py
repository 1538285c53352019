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


# ----------------------------------------------------------------------------------------------------------------
# Defect 6: every user error through the command line is one line and exit 2, naming the value or file
# ----------------------------------------------------------------------------------------------------------------
def _cli(capsys, *argv) -> str:
    """Run the command line; assert exit 2 with one error line; return that line."""
    from vfmtok.pipelines.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vfmtok ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def ar_folder(tmp_path_factory):
    from vfmtok.pipelines.config import build_model
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline

    root = Path(__file__).resolve().parents[1] / "configs"
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ar-cli") / "pipe"
    VFMTokARPipeline(build_model(root / "tokenizer" / "vfmtok-tiny.yaml").eval(),
                     build_model(root / "ar" / "gpt-tiny.yaml").eval()).save_pretrained(folder)
    return folder


def _bad_npz(path: Path, kind: str) -> Path:
    import pickle

    features = np.random.default_rng(0).normal(size=(50, 8))
    sigma = np.cov(features, rowvar=False)
    if kind == "plain-npy":
        np.save(path.with_suffix(".npy"), np.zeros((4, 8, 8, 3), np.uint8))
        path.with_suffix(".npy").rename(path)
    elif kind == "object":
        np.savez(path, arr_0=np.array([{"a": 1}], dtype=object))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"arr_0": 1}))
    elif kind in ("truncated", "empty"):
        np.savez(path, arr_0=np.zeros((6, 8, 8, 3), np.uint8))
        path.write_bytes(path.read_bytes()[:100] if kind == "truncated" else b"")
    elif kind == "zero-images":
        np.savez(path, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    elif kind == "string-mu":
        np.savez(path, mu=np.array(["a"] * 8), sigma=sigma, num_samples=50)
    elif kind == "array-count":
        np.savez(path, mu=features.mean(0), sigma=sigma, num_samples=np.array([50, 3]))
    elif kind == "string-count":
        np.savez(path, mu=features.mean(0), sigma=sigma, num_samples=np.array("x"))
    return path


NPZ_KINDS = ["plain-npy", "object", "pickle", "truncated", "empty", "zero-images", "string-mu", "array-count",
             "string-count"]


@pytest.mark.parametrize("kind", NPZ_KINDS)
def test_eval_fid_reference_that_is_no_readable_npz_is_one_line_naming_it(tmp_path, capsys, kind):
    samples = _class_folder(tmp_path / "samples", seed=0)
    reference = _bad_npz(tmp_path / "ref.npz", kind)
    line = _cli(capsys, "eval", "fid", "--samples", samples, "--reference", reference, "--device", "cpu",
                "--inception-weights", tmp_path / "unused.pth")
    assert str(reference) in line


@pytest.mark.parametrize("kind", ["truncated", "object", "zero-images"])
def test_benchmark_reference_that_is_no_readable_npz_is_one_line_naming_it(tmp_path, capsys, ar_folder, kind):
    reference = _bad_npz(tmp_path / "ref.npz", kind)
    line = _cli(capsys, "benchmark", "--pipeline", ar_folder, "--num-samples", 4, "--guidance-scales", 1,
                "--reference", reference, "--output-dir", tmp_path / "bench")
    assert str(reference) in line


@pytest.mark.parametrize("argv, needle", [
    (["benchmark", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["benchmark", "--seed", str(2 ** 70)], f"--seed must be in [0, 4294967295], got {2 ** 70}"),
    (["benchmark", "--num-samples", str(10 ** 12)], f"--num-samples must be in [2, 10000000], got {10 ** 12}"),
    (["sample", "--seed", "-1"], "--seed must be"),
    (["sample", "--seed", str(2 ** 70)], "--seed must be"),
    (["sample", "--num-images-per-class", str(10 ** 12)], "--num-images-per-class must be in [1, 1024]"),
    (["glotok-teacher", "--bins", "0"], "--bins must be in [1, "),
    (["glotok-teacher", "--seed", "-1"], "--seed must be"),
], ids=["bench-seed-neg", "bench-seed-2**70", "bench-num-samples-10**12", "sample-seed-neg", "sample-seed-2**70",
        "sample-per-class-10**12", "teacher-bins-0", "teacher-seed-neg"])
def test_out_of_range_whole_number_options_are_one_line_before_any_work(tmp_path, capsys, ar_folder, argv, needle):
    command, extra = argv[0], argv[1:]
    base = {"benchmark": ["--pipeline", ar_folder, "--num-samples", 4, "--guidance-scales", 1, "--reference",
                          tmp_path / "none.npz", "--output-dir", tmp_path / "bench"],
            "sample": ["--pipeline", ar_folder, "--class-ids", 1, "--output", tmp_path / "s.png"],
            "glotok-teacher": ["--config", Path(__file__).resolve().parents[1] / "configs" / "tokenizer" /
                               "glotok-tiny.yaml", "--data", _class_folder(tmp_path / "data", 0), "--output",
                               tmp_path / "t.safetensors", "--clusters", 4, "--device", "cpu"]}[command]
    options = dict(zip(base[::2], base[1::2]))
    options.update(zip(extra[::2], extra[1::2]))  # the bad value replaces the good one
    flags = ["--random-vfm"] if command == "glotok-teacher" else []
    assert needle in _cli(capsys, command, *[x for pair in options.items() for x in pair], *flags)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "s.png").exists()


@needs_shared
@pytest.mark.parametrize("option, pipeline", [(("--temperature", "0.5"), "flow"),
                                              (("--num-inference-steps", "2"), "ar")])
def test_benchmark_option_of_the_other_kind_of_pipeline_is_one_line_naming_it(
        tmp_path, capsys, ar_folder, flow_pipe, option, pipeline):  # noqa: F811
    folder = ar_folder if pipeline == "ar" else tmp_path / "flow"
    if pipeline == "flow":
        flow_pipe.save_pretrained(folder)
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    line = _cli(capsys, "benchmark", "--pipeline", folder, "--num-samples", 4, "--guidance-scales", 1, "--reference",
                reference, "--output-dir", tmp_path / "bench", "--inception-weights", WEIGHTS, *option)
    name = option[0][2:].replace("-", "_")
    assert f"takes no sampler option(s) ['{name}']" in line
    assert not list((tmp_path / "bench").rglob("shard-*"))


@pytest.mark.parametrize("edit, needle", [
    (lambda f: (f / "model_index.json").write_text("{not json"), "model_index.json: not valid JSON"),
    (lambda f: (f / "model_index.json").write_text("[1, 2]"), "model_index.json: expected a JSON object"),
    (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
     "transformer: cannot load the GPTModel weights"),
    (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"12345678"),
     "transformer: cannot load the GPTModel weights"),
    (lambda f: (f / "transformer" / "config.json").write_text("{not json"), "transformer/config.json: cannot read"),
], ids=["index-invalid-json", "index-a-list", "no-safetensors", "truncated-weights", "config-invalid-json"])
def test_broken_pipeline_folder_is_one_line_naming_the_folder(tmp_path, capsys, ar_folder, edit, needle):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(ar_folder, folder)
    edit(folder)
    line = _cli(capsys, "sample", "--pipeline", folder, "--class-ids", 1, "--output", tmp_path / "s.png")
    assert f"{folder}/{needle}" in line or (str(folder) in line and needle in line), line


@pytest.mark.parametrize("edit, needle", [
    ("truncated", "cannot load the GPTModel weights"), ("missing", "no file named diffusion_pytorch_model.safetensors"),
    ("wrong-shape", "expected shape"), ("invalid-config", "config.json: cannot read"),
    ("list-config", "config.json: expected a JSON object"), ("absent-folder", "does not exist"),
])
def test_broken_model_folder_is_a_checkpoint_error_naming_it(tmp_path, edit, needle):
    from safetensors.torch import load_file, save_file
    from test_gpt import tiny_model

    from vfmtok.generators.gpt import GPTModel
    from vfmtok.tokenizer.utils.errors import CheckpointError, MissingFileError

    folder = tmp_path / "gpt"
    tiny_model().save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if edit == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif edit == "missing":
        weights.unlink()
    elif edit == "wrong-shape":
        state = load_file(str(weights))
        state[sorted(state)[0]] = torch.zeros(3, 3)
        save_file(state, str(weights))
    elif edit == "invalid-config":
        (folder / "config.json").write_text("{not json")
    elif edit == "list-config":
        (folder / "config.json").write_text("[1]")
    else:
        folder = tmp_path / "absent"
    error = MissingFileError if edit == "absent-folder" else CheckpointError
    with pytest.raises(error, match=re.escape(str(folder)) + ".*" + re.escape(needle)):
        GPTModel.from_pretrained(folder)


@pytest.mark.parametrize("command", ["eval-recon", "pca-stats"])
def test_tokenizer_commands_on_an_absent_tokenizer_or_empty_data_are_one_line(tmp_path, capsys, command):
    from test_dinotok import tiny as tiny_tokenizer

    tokenizer = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tokenizer)
    (tmp_path / "empty").mkdir()
    argv = (["eval", "recon", "--device", "cpu", "--inception-weights", tmp_path / "unused.pth"]
            if command == "eval-recon" else ["pca-stats"])
    line = _cli(capsys, *argv, "--tokenizer", tmp_path / "absent", "--data", _class_folder(tmp_path / "d", 0),
                "--output-dir", tmp_path / "out", "--random-vfm")
    assert f"'{tmp_path / 'absent'}' does not exist" in line
    line = _cli(capsys, *argv, "--tokenizer", tokenizer, "--data", tmp_path / "empty", "--output-dir",
                tmp_path / "out", "--random-vfm")
    assert f"'{tmp_path / 'empty'}' holds no images" in line


def test_a_degenerate_latent_has_no_principal_directions_one_clear_error():
    from vfmtok.tokenizer.dinotok import LatentMoments
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    moments = LatentMoments(4)
    moments.update(torch.tensor([[1.0, 2.0, 3.0, 4.0], [float("inf"), 0.0, 1.0, 2.0], [0.0, 1.0, 0.0, 1.0]],
                                dtype=torch.float64))
    with pytest.raises(InvalidValueError, match="covariance over 3 vectors holds NaN or infinite"):
        moments.principal_directions()


def test_glotok_teacher_on_all_unreadable_data_is_one_line(tmp_path, capsys):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"not a png")
    config = Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / "glotok-tiny.yaml"
    line = _cli(capsys, "glotok-teacher", "--config", config, "--data", data.parent, "--output",
                tmp_path / "t.safetensors", "--clusters", 4, "--random-vfm", "--device", "cpu")
    assert "got no feature vectors" in line


def test_image_bomb_in_a_samples_folder_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from vfmtok.evaluation.fid import load_source
    from vfmtok.pipelines.data import decode_image
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    folder = _class_folder(tmp_path / "samples", seed=0) / "cat"  # a flat folder of generated images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32 x 32 image is then more than twice the limit
    source = load_source(folder)
    with pytest.raises(InvalidValueError, match=re.escape(str(source.files[0])) + ".*decompression bomb"):
        next(source.batches(4))
    with pytest.raises(InvalidValueError, match="decompression bomb"):
        decode_image({"bytes": None, "path": str(source.files[0])})


@pytest.mark.parametrize("kind", ["output-is-a-directory", "output-dir-is-a-file", "under-proc"])
def test_output_of_the_wrong_kind_or_unwritable_is_one_line_naming_it(tmp_path, capsys, ar_folder, kind):
    if kind == "output-is-a-directory":
        (tmp_path / "grid.png").mkdir()
        line = _cli(capsys, "sample", "--pipeline", ar_folder, "--class-ids", 1, "--output", tmp_path / "grid.png")
        assert f"'{tmp_path / 'grid.png'}' is a directory" in line
    elif kind == "output-dir-is-a-file":
        (tmp_path / "out").write_text("mine")
        reference = tmp_path / "ref.npz"
        np.savez(reference, arr_0=np.zeros((6, 8, 8, 3), np.uint8))
        line = _cli(capsys, "benchmark", "--pipeline", ar_folder, "--num-samples", 4, "--guidance-scales", 1,
                    "--reference", reference, "--output-dir", tmp_path / "out", "--inception-weights",
                    WEIGHTS if WEIGHTS.is_file() else tmp_path / "x.pth")
        assert str(tmp_path / "out") in line and (tmp_path / "out").read_text() == "mine"
    else:
        line = _cli(capsys, "sample", "--pipeline", ar_folder, "--class-ids", 1, "--output", "/proc/vfmtok-x.png")
        assert "cannot write '/proc/vfmtok-x.png'" in line and "disk is full" not in line


def test_a_write_refused_by_the_system_is_not_reported_as_a_full_disk(tmp_path):
    from vfmtok.tokenizer.utils.atomic import write_text_atomically
    from vfmtok.tokenizer.utils.errors import DiskFullError, OutputWriteError

    with pytest.raises(OutputWriteError, match="cannot write '/proc/vfmtok-report.json'") as caught:
        write_text_atomically("/proc/vfmtok-report.json", "{}")
    assert not isinstance(caught.value, DiskFullError)


@needs_shared
def test_benchmark_resume_regenerates_a_truncated_shard_and_one_whose_record_was_altered(tmp_path, ar_folder):
    from vfmtok.evaluation.benchmark import run_benchmark

    out = tmp_path / "bench"
    np.savez(tmp_path / "r.npz", arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    kwargs = dict(num_samples=6, guidance_scales=[1.0], reference=str(tmp_path / "r.npz"), seed=1, batch_size=2,
                  shard_size=2, output_size=32, inception_weights=str(WEIGHTS))
    first = run_benchmark(str(ar_folder), out, **kwargs)
    folder = out / "samples" / "cfg-1"
    shard = folder / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:200])
    (folder / "shard-00001.json").write_text("[1, 2]")
    record = json.loads((folder / "shard-00002.json").read_text())
    (folder / "shard-00002.json").write_text(json.dumps({**record, "count": "two"}))
    again = run_benchmark(str(ar_folder), out, **kwargs)
    assert again["settings"][0]["generation"]["generated_by_main_process_now"] == 6
    assert again["settings"][0]["fid"] == first["settings"][0]["fid"]


# ----------------------------------------------------------------------------------------------------------------
# Defect 8: `eval recon` and LPIPS: local weight files, an off switch, stdout for the JSON only, the reason
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def recon_inputs(tmp_path):
    from test_dinotok import tiny as tiny_tokenizer

    tokenizer = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tokenizer)
    return ["eval", "recon", "--tokenizer", str(tokenizer), "--data", str(_class_folder(tmp_path / "data", 0)),
            "--output-dir", str(tmp_path / "out"), "--random-vfm", "--device", "cpu", "--inception-weights",
            str(WEIGHTS)]


@pytest.fixture
def noisy_offline(monkeypatch):
    """No network and no lpips package; a download prints its progress on stdout, as torch.hub's did, then fails."""
    import urllib.error

    import vfmtok.tokenizer.lpips

    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        print(f"Downloading: {url!r}")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(vfmtok.tokenizer.lpips, "_lpips_package_lin_file", lambda: None)
    return calls


@needs_shared
@pytest.mark.parametrize("mode", ["offline", "local-files", "no-lpips"])
def test_eval_recon_lpips_offline_gives_the_reason_local_files_or_off_and_stdout_is_json(
        tmp_path, capsys, recon_inputs, noisy_offline, mode):
    from test_losses import random_vgg_and_lin_files

    from vfmtok.pipelines.cli import main

    extra = {"offline": [], "no-lpips": ["--no-lpips"],
             "local-files": ["--lpips-vgg-weights", str(tmp_path / "vgg16.pth"),
                             "--lpips-lin-weights", str(tmp_path / "vgg.pth")]}[mode]
    random_vgg_and_lin_files(tmp_path)
    capsys.readouterr()
    assert main(recon_inputs + extra) == 0
    out = capsys.readouterr().out
    (line,) = out.splitlines()  # the JSON only: no "Downloading:" line
    row = json.loads(line)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    if mode == "offline":
        assert noisy_offline and row["lpips"] is None
        assert "no network" in report["lpips_unavailable"] and "VGG16" in report["lpips_unavailable"]
        assert "lpips_vgg_weights" in report["lpips_unavailable"]
    elif mode == "local-files":
        assert not noisy_offline and isinstance(row["lpips"], float) and "lpips_unavailable" not in report
    else:
        assert not noisy_offline and row["lpips"] is None and "not asked for" in report["lpips_unavailable"]


# ----------------------------------------------------------------------------------------------------------------
# Defect 10: a rerun right after a killed extraction removes the staging folder the kill left
# ----------------------------------------------------------------------------------------------------------------
def test_rerun_of_a_killed_extraction_removes_its_fresh_staging_folder_and_nothing_else(tmp_path):
    from test_dinotok import tiny as tiny_tokenizer

    from vfmtok.pipelines.train.extract import extract_tokens

    data, output = _class_folder(tmp_path / "data", seed=0), tmp_path / "latents"
    # what kill -9 leaves an instant ago: a staging folder of the target with a partial array, no lock held
    left = tmp_path / ".latents.staging-k1ll3d_0"
    left.mkdir()
    (left / "latents.npy").write_bytes(b"\x93NUMPY partial")
    others = [tmp_path / ".codes.staging-abc12345", tmp_path / ".latents-notes.staging-abc12345",
              tmp_path / ".latents.staging-notes.txt"]
    others[0].mkdir()
    others[1].mkdir()
    others[2].write_text("not a staging folder of the extraction")
    extract_tokens(tiny_tokenizer(), str(data), output, batch_size=8, num_workers=0)
    assert (output / "meta.json").is_file()
    assert not left.exists()
    assert all(p.exists() for p in others)  # other targets' staging folders are not this writer's to remove


# ----------------------------------------------------------------------------------------------------------------
# Defect 4 (rest): the same data or output folder spelled another way is the same run on resume
# ----------------------------------------------------------------------------------------------------------------
def test_resume_accepts_other_spellings_of_the_same_folders_and_refuses_another_folder(tmp_path, monkeypatch):
    from test_faults import training

    from vfmtok.pipelines.train.trainer import Trainer
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    monkeypatch.chdir(tmp_path)
    for name in ("good", "other"):
        _class_folder(tmp_path / "data" / name, seed=0)  # the same images: only the folder differs

    def run(data: str, output: str | Path, max_steps: int, resume: bool = False) -> Path:
        return Trainer(TinyTask(), training(max_steps=max_steps), output, images(4),
                       run_config={"data": data}).fit(resume=resume)

    run("data/good", "out", 2)
    run("./data/good", "out", 3, resume=True)
    run(str(tmp_path / "data" / "good"), tmp_path / "out", 4, resume=True)  # absolute data and output folder
    with pytest.raises(InvalidValueError, match=r"different run.*data: '[^']*data/good' in the checkpoint, "
                                                r"'data/other' now"):
        run("data/other", "./out", 5, resume=True)


def test_a_random_vfm_is_randomly_initialised_not_uninitialised_memory(tmp_path):
    """diffusers builds models with torch's init functions switched off: a VFM that loads no weights must still be a
    real random initialisation (finite, of the architecture's init scale, the same on every load)."""
    import torch.nn as tnn

    from vfmtok.pipelines.config import build_model
    from vfmtok.pipelines.train.extract import load_tokenizer

    model = build_model(Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / "vfmtok-tiny.yaml")
    model.save_pretrained(tmp_path / "tok")
    garbage = tnn.Linear.reset_parameters
    tnn.Linear.reset_parameters = lambda self: self.weight.data.fill_(float("nan"))  # stands in for empty memory
    try:
        loaded = [load_tokenizer(str(tmp_path / "tok"), random_vfm=True) for _ in range(2)]
    finally:
        tnn.Linear.reset_parameters = garbage
    for name, value in loaded[0].vfm.model.state_dict().items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, loaded[1].vfm.model.state_dict()[name]), name
    weights = [v for k, v in loaded[0].vfm.model.state_dict().items() if k.endswith("q_proj.weight")]
    assert weights and all(0.005 < float(w.std()) < 0.1 for w in weights)  # DINOv2's init: std 0.02
