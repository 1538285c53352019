"""The diffusers pipelines with tiny random models: save / load round trips, class labels, argument errors, strict
loading, scheduler equivalence with the project's samplers, Hub-id loading from an offline cache, `vfmtok sample`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from vfmtok.generators.transport import guided_model, sample_ode, sample_sde
from vfmtok.pipelines import VFMTokARPipeline, VFMTokFlowPipeline, load_pipeline
from vfmtok.pipelines.config import build_model
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError, WeightsUnavailableError

ROOT = Path(__file__).resolve().parents[1]


def config(kind: str, name: str) -> Path:
    return ROOT / "configs" / kind / f"{name}.yaml"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ar_pipe():
    torch.manual_seed(0)
    return VFMTokARPipeline(build_model(config("tokenizer", "vfmtok-tiny")).eval(),
                            build_model(config("ar", "gpt-tiny")).eval())


def tiny_flow_pipeline(**pipeline_options) -> VFMTokFlowPipeline:
    """The tiny flow pipeline of these tests (seed 0): a tiny VFMAE and a DiT whose velocity depends on x, t and y."""
    torch.manual_seed(0)
    dit = build_model(config("flow", "dit-tiny")).eval()
    dit.set_latent_statistics(torch.randn(dit.latent_shape), torch.rand(dit.latent_shape) + 0.5)
    with torch.no_grad():  # adaLN-Zero starts at a zero velocity: make the output depend on x, t and y
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return VFMTokFlowPipeline(build_model(config("tokenizer", "vfmae-tiny")).eval(), dit, None, **pipeline_options)


@pytest.fixture(scope="module")
def flow_pipe():
    return tiny_flow_pipeline()


@pytest.fixture(scope="module")
def ar_dir(ar_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("ar") / "pipe"
    ar_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flow_dir(flow_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("flow") / "pipe"
    flow_pipe.save_pretrained(path)
    return path


# -- round trips ---------------------------------------------------------------------------------------------------
def test_ar_round_trip_gives_identical_images(ar_pipe, ar_dir):
    assert {p.name for p in ar_dir.iterdir()} >= {"model_index.json", "README.md", "vqvae", "transformer"}
    loaded = VFMTokARPipeline.from_pretrained(ar_dir)
    kw = dict(guidance_scale=2.0, top_k=50, output_type="pt")
    ours = ar_pipe(["golden retriever", "otter"], generator=seeded(), **kw).images
    theirs = loaded(["golden retriever", "otter"], generator=seeded(), **kw).images
    assert ours.shape == (2, 3, 64, 64) and torch.equal(ours, theirs)
    assert loaded.id2label[207] == "golden retriever"


def test_flow_round_trip_gives_identical_images(flow_pipe, flow_dir):
    assert (flow_dir / "scheduler" / "scheduler_config.json").is_file()
    loaded = VFMTokFlowPipeline.from_pretrained(flow_dir)
    kw = dict(num_inference_steps=3, guidance_scale=1.5, output_type="np", output_size=32)
    ours, theirs = flow_pipe(207, generator=seeded(), **kw).images, loaded(207, generator=seeded(), **kw).images
    assert ours.shape == (1, 32, 32, 3) and (ours == theirs).all()
    assert torch.equal(flow_pipe.transformer.latent_std, loaded.transformer.latent_std)


def test_output_types_chunks_and_callback(ar_pipe):
    pil = ar_pipe(207, generator=seeded()).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    seen = []

    def callback(pipe, i, t, kwargs):  # after every token: the codes so far; replace the newest one by 7
        seen.append((i, tuple(kwargs["codes"].shape)))
        assert not kwargs["codes"][:, i + 1:].any()  # positions not sampled yet
        codes = kwargs["codes"].clone()
        codes[:, i] = 7
        return {"codes": codes}

    codes = ar_pipe([1, 2, 3], num_images_per_class=2, batch_size=4, generator=seeded(), output_type="codes",
                    callback_on_step_end=callback).images
    assert seen == [(i, (4, 16)) for i in range(16)] + [(i, (2, 16)) for i in range(16)]
    assert codes.shape == (6, 16) and (codes == 7).all()
    images, = ar_pipe(5, generator=seeded(), output_type="np", return_dict=False)
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() <= images.max() <= 1


# -- class labels ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,ids", [
    (207, [207]), ([207, 360], [207, 360]), (torch.tensor([1, 2]), [1, 2]), (torch.tensor(3), [3]),
    ("golden retriever", [207]), ("Golden RETRIEVER ", [207]), (["golden retriever", "otter"], [207, 360]),
])
def test_names_and_ids_resolve(ar_pipe, labels, ids):
    assert ar_pipe.resolve_class_labels(labels) == ids


def test_synonyms_of_a_configured_label_resolve(ar_pipe, tmp_path):
    pipe = VFMTokARPipeline(ar_pipe.vqvae, ar_pipe.transformer, id2label={0: "tench, Tinca tinca", 1: "goldfish"})
    assert pipe.resolve_class_labels(["Tinca Tinca", "tench", "goldfish"]) == [0, 0, 1]
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["id2label"]["0"] == "tench, Tinca tinca"


def test_an_unknown_name_lists_the_classes_of_a_pipeline_with_few(ar_pipe):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    digits = VFMTokARPipeline(ar_pipe.vqvae, ar_pipe.transformer, id2label=dict(enumerate(names)))
    with pytest.raises(InvalidValueError) as error:
        digits.get_label_ids("dog")
    message = str(error.value)
    assert message.startswith("unknown class name 'dog'") and "\n" not in message
    assert message.endswith("; the 10 class names: " + ", ".join(repr(n) for n in names))
    with pytest.raises(InvalidValueError, match=r"did you mean 'seven'\? The 10 class names: 'zero', 'one'"):
        digits.get_label_ids("sevn")
    with pytest.raises(InvalidValueError) as error:  # 1000 ImageNet classes: close matches only
        ar_pipe.get_label_ids("golden retreiver")
    assert "class names:" not in str(error.value) and len(str(error.value)) < 200


@pytest.mark.parametrize("call,match", [
    (lambda p: p("golden retreiver"), r"unknown class name 'golden retreiver'; did you mean 'golden retriever'"),
    (lambda p: p(1000), r"outside \[0, 1000\)"),
    (lambda p: p([-1, 3]), r"outside \[0, 1000\)"),
    (lambda p: p([]), "empty"),
    (lambda p: p(2.5), "must be an int"),
    (lambda p: p(True), "ids or names"),
    (lambda p: p([1, "otter"]), "only ints or only names"),
    (lambda p: p(torch.tensor([1.0])), "integers"),
    (lambda p: p(1, guidance_scale=float("nan")), r"guidance_scale must be a finite number >= 0.*nan"),
    (lambda p: p(1, guidance_scale=-1.0), r"guidance_scale must be a finite number >= 0.*-1"),
    (lambda p: p(1, output_type="latent"), r"output_type must be one of .*'latent'"),
    (lambda p: p(1, num_images_per_class=0), "num_images_per_class must be a positive integer"),
    (lambda p: p(1, batch_size=1.5), "batch_size must be a positive integer"),
    (lambda p: p(1, temperature=0.0), "temperature must be > 0"),
    (lambda p: p(1, guidance_schedule="wavy"), "guidance_schedule must be one of"),
    (lambda p: p(1, callback_on_step_end_tensor_inputs=["latents"]), r"\['latents'\] are not among \['codes'\]"),
])
def test_bad_ar_inputs_raise_clear_errors(ar_pipe, call, match):
    with pytest.raises(InvalidValueError, match=match):
        call(ar_pipe)


@pytest.mark.parametrize("kwargs,match", [
    (dict(output_type="codes"), r"output_type must be one of"), (dict(sampler="dpm"), "sampler must be one of"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(guidance_scale=2.0, guidance_interval=(0.8, 0.2)), "interval"),
    (dict(sampler="sde", callback_on_step_end=lambda *a: {}), "sampler='scheduler' only"),
])
def test_bad_flow_inputs_raise_clear_errors(flow_pipe, kwargs, match):
    with pytest.raises(InvalidValueError, match=match):
        flow_pipe("otter", **kwargs)


# -- mismatched components, strict loading ---------------------------------------------------------------------------
def test_mismatched_components_are_refused_at_construction(ar_pipe, flow_pipe):
    small = build_model({"model": "GPTModel", "params": {**ar_pipe.transformer.config, "vocab_size": 256}})
    with pytest.raises(CheckpointError, match=r"vocab_size 512, num_tokens 16\) do not fit the GPTModel \(vocab_size 256"):
        VFMTokARPipeline(ar_pipe.vqvae, small)
    with pytest.raises(CheckpointError, match="discrete tokenizer"):
        VFMTokARPipeline(flow_pipe.vae, ar_pipe.transformer)
    other = build_model({"model": "DiTModel", "params": {**flow_pipe.transformer.config, "in_channels": 4}})
    with pytest.raises(CheckpointError, match=r"\[8, 4, 4\] does not fit the transformer's latent shape \[4, 4, 4\]"):
        VFMTokFlowPipeline(flow_pipe.vae, other, None)
    with pytest.raises(CheckpointError, match=r"weak_transformer's latent shape \[4, 4, 4\]"):
        VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, None, weak_transformer=other)


def test_mismatched_components_are_refused_at_load_time(ar_dir, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(ar_dir, folder)
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_tokens": 9}))
    with pytest.raises(CheckpointError, match=r"num_tokens 16\) do not fit the GPTModel \(vocab_size 512, num_tokens 9\)"):
        VFMTokARPipeline.from_pretrained(folder)


def test_a_missing_weight_fails_loading_naming_it(flow_dir, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(flow_dir, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["final_layer.linear.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"final_layer\.linear\.weight"):
        VFMTokFlowPipeline.from_pretrained(folder)


# -- schedulers and samplers -----------------------------------------------------------------------------------------
def _project_velocity(pipe, scale):
    return guided_model(lambda x, t, y: pipe.transformer(x, t, y), scale, null_class=pipe.transformer.null_class)


def test_diffusers_euler_scheduler_matches_sample_ode_euler(flow_pipe):
    flow_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_pipe.scheduler.config, shift=2.0)
    labels = torch.tensor([3, 207])
    ours = flow_pipe(labels, num_inference_steps=5, guidance_scale=1.5, generator=seeded(), output_type="latent")
    noise = torch.randn(2, *flow_pipe.transformer.latent_shape, generator=seeded())
    reference = sample_ode(_project_velocity(flow_pipe, 1.5), noise, labels, 5, method="euler", shift=2.0)
    torch.testing.assert_close(ours.images, flow_pipe.transformer.denormalize_latents(reference), atol=1e-5, rtol=1e-5)
    flow_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_pipe.scheduler.config, shift=1.0)


def test_diffusers_heun_scheduler_matches_sample_ode_heun(flow_pipe):
    """diffusers' Heun takes no explicit sigmas: its grid is ``linspace(1, 1/1000, N)`` then 0, Heun steps on the
    grid and a final Euler step to 0, i.e. ``sample_ode(heun)`` on that grid plus one ``sample_ode(euler)`` step."""
    euler = flow_pipe.scheduler
    flow_pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(euler.config)
    try:
        labels = torch.tensor([11])
        steps = []
        ours = flow_pipe(labels, num_inference_steps=4, guidance_scale=1.5, generator=seeded(), output_type="latent",
                         callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw).images
        assert steps == list(range(2 * 4 - 1))  # 2N - 1 model calls
        sigmas = torch.unique_consecutive(flow_pipe.scheduler.sigmas.double())
        times = 1.0 - sigmas
        noise = torch.randn(1, *flow_pipe.transformer.latent_shape, generator=seeded())
        velocity = _project_velocity(flow_pipe, 1.5)
        x = sample_ode(velocity, noise, labels, 0, method="heun", times=times[:-1])
        x = sample_ode(velocity, x, labels, 0, method="euler", times=times[-2:])
        torch.testing.assert_close(ours, flow_pipe.transformer.denormalize_latents(x), atol=1e-5, rtol=1e-5)
    finally:
        flow_pipe.scheduler = euler


def test_sde_sampler_is_selectable_and_deterministic(flow_pipe):
    first = flow_pipe(5, sampler="sde", num_inference_steps=4, generator=seeded(), output_type="latent").images
    again = flow_pipe(5, sampler="sde", num_inference_steps=4, generator=seeded(), output_type="latent").images
    g = seeded()
    noise = torch.randn(1, *flow_pipe.transformer.latent_shape, generator=g)
    reference = sample_sde(lambda x, t, y: flow_pipe.transformer(x, t, y), noise, torch.tensor([5]), 4, generator=g)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, flow_pipe.transformer.denormalize_latents(reference))


def test_autoguidance_with_a_weak_transformer(flow_pipe):
    pipe = VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, flow_pipe.scheduler,
                              weak_transformer=flow_pipe.transformer)
    # the weak model is the main one: v_weak + s (v - v_weak) = v, whatever the scale
    guided = pipe(7, num_inference_steps=2, guidance_scale=3.0, generator=seeded(), output_type="latent").images
    plain = pipe(7, num_inference_steps=2, guidance_scale=1.0, generator=seeded(), output_type="latent").images
    torch.testing.assert_close(guided, plain)


# -- model card, Hub, command line -----------------------------------------------------------------------------------
def test_model_card_lists_components_and_evaluation(ar_pipe, ar_dir, tmp_path):
    card = (ar_dir / "README.md").read_text()
    assert "library_name: diffusers" in card and "`vqvae`" in card and "`transformer`" in card
    assert "Not evaluated." in card and "VFMTokARPipeline.from_pretrained" in card
    pipe = VFMTokARPipeline(ar_pipe.vqvae, ar_pipe.transformer,
                            evaluation={"protocol": "ADM, 50k samples, 256 px", "FID": 2.07})
    pipe.save_pretrained(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert "Protocol: ADM, 50k samples, 256 px" in card and "| FID | 2.07 |" in card


def _hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = "a" * 40, ref: str = "main") -> None:
    """Lay ``folder`` out as huggingface_hub's cache does: blobs named by hash, snapshot symlinks, refs/<ref> (a
    branch name holding the commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":  # LFS files: sha256; regular files: the git blob sha1
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_loading_by_hub_id_from_an_offline_cache(ar_pipe, ar_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    _hub_cache(ar_dir, tmp_path / "hub", "vfmtok/tiny-ar")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = VFMTokARPipeline.from_pretrained("vfmtok/tiny-ar", cache_dir=tmp_path / "hub")
    kw = dict(guidance_scale=2.0, output_type="codes")
    assert torch.equal(loaded(207, generator=seeded(), **kw).images, ar_pipe(207, generator=seeded(), **kw).images)
    assert type(load_pipeline("vfmtok/tiny-ar", cache_dir=tmp_path / "hub")) is VFMTokARPipeline
    with pytest.raises(WeightsUnavailableError, match="vfmtok/not-cached"):
        VFMTokARPipeline.from_pretrained("vfmtok/not-cached", cache_dir=tmp_path / "hub")


def test_vfmtok_sample_writes_a_png_grid(flow_dir, tmp_path, capsys):
    from vfmtok.pipelines.cli import main

    output = tmp_path / "grid.png"
    assert main(["sample", "--pipeline", str(flow_dir), "--class-names", "golden retriever", "otter",
                 "--num-images-per-class", "2", "--num-inference-steps", "2", "--guidance-scale", "1.5",
                 "--output", str(output)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class_ids"] == [207, 360]
    grid = Image.open(output)
    assert grid.format == "PNG" and grid.size == (2 * 64, 2 * (64 + 14))
    assert main(["sample", "--pipeline", str(flow_dir), "--class-names", "golden retreiver",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "did you mean 'golden retriever'" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def _grid_cells(grid: Image.Image, count: int, columns: int, cell: int) -> list[np.ndarray]:
    """The images of a captioned grid (cells of ``cell`` pixels with a 14-pixel caption below each)."""
    array = np.asarray(grid)
    return [array[(k // columns) * (cell + 14):(k // columns) * (cell + 14) + cell,
                  (k % columns) * cell:(k % columns + 1) * cell] for k in range(count)]


@pytest.mark.parametrize("kind,argv,kwargs", [
    ("flow", ["--num-inference-steps", "3", "--sampler", "sde", "--guidance-interval", "0.2", "0.9"],
     dict(num_inference_steps=3, sampler="sde", guidance_interval=(0.2, 0.9))),
    ("flow", ["--num-inference-steps", "2", "--sampler", "scheduler"], dict(num_inference_steps=2, sampler="scheduler")),
    ("ar", ["--temperature", "0.7", "--top-k", "50", "--top-p", "0.9", "--guidance-schedule", "cosine_power",
            "--guidance-power", "2"], dict(temperature=0.7, top_k=50, top_p=0.9, guidance_schedule="cosine_power",
                                           guidance_power=2.0)),
    ("ar", ["--guidance-schedule", "interval", "--guidance-interval", "5"], dict(guidance_schedule="interval",
                                                                                guidance_interval=5)),
])
def test_vfmtok_sample_gives_the_images_of_pipe_with_the_same_arguments(ar_dir, flow_dir, tmp_path, capsys, kind,
                                                                         argv, kwargs):
    from vfmtok.pipelines.cli import main

    folder = ar_dir if kind == "ar" else flow_dir
    output = tmp_path / "grid.png"
    assert main(["sample", "--pipeline", str(folder), "--class-ids", "207", "360", "--num-images-per-class", "2",
                 "--seed", "5", "--guidance-scale", "1.5", "--batch-size", "3", "--output-size", "48",
                 "--device", "cpu", "--dtype", "float32", "--cell-size", "96", "--output", str(output), *argv]) == 0
    capsys.readouterr()
    expected = load_pipeline(folder)([207, 360], num_images_per_class=2, guidance_scale=1.5, batch_size=3,
                                     output_size=48, generator=seeded(5), output_type="np", **kwargs).images
    expected = np.round(expected * 255).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)  # 48 -> 96 px cells
    grid = Image.open(output)
    assert grid.size == (2 * 96, 2 * (96 + 14))
    for got, want in zip(_grid_cells(grid, 4, 2, 96), expected):
        assert np.array_equal(got, want)


def test_vfmtok_sample_in_bfloat16_and_options_of_the_other_kind(ar_dir, flow_dir, tmp_path, capsys):
    from vfmtok.pipelines.cli import main

    output = tmp_path / "grid.png"
    assert main(["sample", "--pipeline", str(ar_dir), "--class-ids", "3", "--seed", "1", "--dtype", "bfloat16",
                 "--device", "cpu", "--output", str(output)]) == 0
    capsys.readouterr()
    pipe = load_pipeline(ar_dir, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    expected = np.round(pipe(3, generator=seeded(1), output_type="np").images[0] * 255).astype(np.uint8)
    assert np.array_equal(_grid_cells(Image.open(output), 1, 1, 64)[0], expected)
    assert main(["sample", "--pipeline", str(flow_dir), "--class-ids", "3", "--top-k", "5",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "takes no sampler option(s) ['top_k']" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_convert_pipeline_from_official_layout_checkpoints(tmp_path, capsys):
    from vfmtok.pipelines.cli import main
    from vfmtok.pipelines.config import load_config
    from test_convert import reference_state_dict
    from test_gpt import reference_layout

    tok_config, gpt_config = config("tokenizer", "vfmtok-tiny"), config("ar", "gpt-tiny")
    tok_ref = reference_state_dict(build_model(tok_config), load_config(tok_config)["params"], seed=1)
    gpt_ref = reference_layout(load_config(gpt_config)["params"], seed=2)
    torch.save({"ema": tok_ref}, tmp_path / "tok.pt")
    torch.save({"model": gpt_ref}, tmp_path / "gpt.pt")
    argv = ["convert", "pipeline", "ar", "--tokenizer-checkpoint", str(tmp_path / "tok.pt"), "--tokenizer-config",
            str(tok_config), "--generator-checkpoint", str(tmp_path / "gpt.pt"), "--generator-config",
            str(gpt_config), "--output-dir", str(tmp_path / "pipe")]
    assert main(argv) == 0, capsys.readouterr().err
    pipe = VFMTokARPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(pipe.transformer.state_dict()["head.weight"], gpt_ref["output.weight"])
    assert torch.equal(pipe.vqvae.state_dict()["encoder.queries"], tok_ref["encode_transformer.carrier_tokens"])
    # the release's evaluation protocol: decoded images resized to 256 (plain bicubic); any size on request
    assert pipe(207, generator=seeded(), output_type="pt").images.shape == (1, 3, 256, 256)
    assert pipe(207, generator=seeded(), output_type="pt", output_size=64).images.shape == (1, 3, 64, 64)
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err  # never overwrites


# -- diffusers' own loaders, older folders, the Hub ------------------------------------------------------------------
def _statements(path: Path) -> list:
    import ast

    return [node for node in ast.parse(path.read_text()).body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]  # the docstring


def test_saved_folders_name_vfmtok_modules_and_their_files_only_import_vfmtok(ar_dir, flow_dir):
    import ast

    for folder, module, pipeline in ((ar_dir, "pipeline_vfmtok_ar", "VFMTokARPipeline"),
                                     (flow_dir, "pipeline_vfmtok_flow", "VFMTokFlowPipeline")):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == [module, pipeline]
        components = {k: v for k, v in index.items() if isinstance(v, list) and k != "_class_name"}
        ours = {k: v for k, v in components.items() if k != "scheduler" and v[0] is not None}  # None: no weak model
        assert all(v[0].startswith("vfmtok.") for v in ours.values()), components
        files = [folder / f"{module}.py"] + [folder / name / "modeling_vfmtok.py" for name in ours]
        for file in files:
            statements = _statements(file)
            assert statements and all(isinstance(node, ast.ImportFrom) and node.module.startswith("vfmtok.")
                                      for node in statements), file
        for name, (_, class_name) in ours.items():
            config = json.loads((folder / name / "config.json").read_text())
            assert config["auto_map"] == {"AutoModel": f"modeling_vfmtok.{class_name}"}


def test_diffusers_own_loader_gives_the_same_images_with_trust_remote_code(ar_pipe, ar_dir, flow_pipe, flow_dir):
    from diffusers import DiffusionPipeline

    ar = DiffusionPipeline.from_pretrained(ar_dir, trust_remote_code=True)
    assert type(ar) is VFMTokARPipeline
    kw = dict(guidance_scale=2.0, top_k=50, output_type="pt")
    assert torch.equal(ar(["golden retriever", "otter"], generator=seeded(), **kw).images,
                       ar_pipe(["golden retriever", "otter"], generator=seeded(), **kw).images)
    flow = DiffusionPipeline.from_pretrained(flow_dir, trust_remote_code=True)
    assert type(flow) is VFMTokFlowPipeline
    kw = dict(num_inference_steps=3, guidance_scale=1.5, output_type="pt", sampler="scheduler")
    assert torch.equal(flow(207, generator=seeded(), **kw).images, flow_pipe(207, generator=seeded(), **kw).images)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(ar_dir)


def test_diffusers_auto_model_loads_a_component_with_trust_remote_code(ar_pipe, ar_dir):
    from diffusers import AutoModel

    gpt = AutoModel.from_pretrained(str(ar_dir / "transformer"), trust_remote_code=True)
    assert type(gpt) is type(ar_pipe.transformer)
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), ar_pipe.transformer.state_dict().values()))
    assert type(AutoModel.from_pretrained(str(ar_dir / "vqvae"), trust_remote_code=True)) is type(ar_pipe.vqvae)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModel.from_pretrained(str(ar_dir / "transformer"))


def test_our_loaders_never_run_a_file_of_the_folder(ar_pipe, ar_dir, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(ar_dir, folder)
    marker = tmp_path / "ran"
    for file in [folder / "pipeline_vfmtok_ar.py", *folder.glob("*/modeling_vfmtok.py")]:
        file.write_text(f"open({str(marker)!r}, 'w').write('{file.name}')\n")
    from vfmtok import GPTModel, load_tokenizer

    for load in (VFMTokARPipeline.from_pretrained, load_pipeline, lambda p: GPTModel.from_pretrained(p / "transformer"),
                 lambda p: load_tokenizer(str(p / "vqvae"))):
        assert load(folder) is not None
    assert not marker.exists()


def _as_saved_before_the_rename(folder: Path) -> None:
    """Rewrite a folder saved now into the layout main wrote before the `vfmtok.` package rename (checked against a
    folder saved at commit 494494d): `_class_name` a plain name, component modules `tokenizer.*` / `generators.*`,
    no module files, no auto_map."""
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = index["_class_name"][1]
    for key, value in index.items():
        if isinstance(value, list) and value[0].startswith("vfmtok."):
            index[key] = [value[0][len("vfmtok."):], value[1]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for file in folder.rglob("*.py"):
        file.unlink()
    for config_file in folder.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        config.pop("auto_map", None)
        config_file.write_text(json.dumps(config, indent=2))


def test_a_folder_saved_before_the_rename_loads_with_a_warning_and_resaves_in_the_new_layout(ar_pipe, ar_dir,
                                                                                             tmp_path):
    old = tmp_path / "old"
    shutil.copytree(ar_dir, old)
    _as_saved_before_the_rename(old)
    assert json.loads((old / "model_index.json").read_text())["transformer"] == ["generators.gpt", "GPTModel"]
    kw = dict(guidance_scale=2.0, output_type="codes")
    with pytest.warns(FutureWarning, match=r"generators\.gpt.*re-save it"):
        loaded = load_pipeline(old)
    assert torch.equal(loaded(207, generator=seeded(), **kw).images, ar_pipe(207, generator=seeded(), **kw).images)
    with pytest.warns(FutureWarning):
        assert type(VFMTokARPipeline.from_pretrained(old)) is VFMTokARPipeline
    loaded.save_pretrained(tmp_path / "new")
    from diffusers import DiffusionPipeline

    resaved = DiffusionPipeline.from_pretrained(tmp_path / "new", trust_remote_code=True)
    assert torch.equal(resaved(207, generator=seeded(), **kw).images, ar_pipe(207, generator=seeded(), **kw).images)


def test_every_loader_reads_a_repo_id_and_its_revision_from_an_offline_cache(ar_pipe, ar_dir, tmp_path,
                                                                             monkeypatch):
    import huggingface_hub.constants
    from diffusers import DiffusionPipeline

    gpt = build_model(config("ar", "gpt-tiny")).eval()
    with torch.no_grad():  # other weights than ar_pipe's GPT (whose zero-initialised head samples uniformly)
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = VFMTokARPipeline(ar_pipe.vqvae, gpt)
    other.save_pretrained(tmp_path / "v2")
    cache = tmp_path / "hub"
    _hub_cache(ar_dir, cache, "vfmtok/tiny-ar", commit="a" * 40)
    _hub_cache(tmp_path / "v2", cache, "vfmtok/tiny-ar", commit="b" * 40, ref="v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    kw = dict(guidance_scale=2.0, output_type="codes")
    expected = {None: ar_pipe(207, generator=seeded(), **kw).images, "v2": other(207, generator=seeded(), **kw).images}
    assert not torch.equal(expected[None], expected["v2"])
    loaders = {"class": VFMTokARPipeline.from_pretrained, "load_pipeline": load_pipeline,
               "diffusers": lambda *a, **k: DiffusionPipeline.from_pretrained(*a, trust_remote_code=True, **k)}
    for name, load in loaders.items():
        for revision, images in expected.items():
            pipe = load("vfmtok/tiny-ar", cache_dir=cache, **({"revision": revision} if revision else {}))
            assert type(pipe) is VFMTokARPipeline and torch.equal(pipe(207, generator=seeded(), **kw).images,
                                                                 images), (name, revision)


def test_a_saved_folder_holds_no_local_path_and_a_card_with_hub_metadata(ar_pipe, tmp_path):
    from huggingface_hub import ModelCard

    from vfmtok.evaluation.benchmark import card_results

    deep = tmp_path / "home" / "someone" / "private" / "runs"
    VFMTokARPipeline(ar_pipe.vqvae, ar_pipe.transformer, id2label={"3": "three", "7": "seven"}).save_pretrained(
        deep / "first")
    pipe = load_pipeline(deep / "first")  # components loaded from a path remember it (_name_or_path)
    protocol = {"num_samples": 50000, "labels": "balanced", "seed": 0, "sampler_options": {"top_k": 0},
                "resolution": "256 px", "reference": str(deep / "VIRTUAL_imagenet256_labeled.npz"),
                "reference_sha256": "f" * 64, "extractor_sha256": "e" * 64}
    report = {"settings": [{"setting": "cfg-1.75", "fid": 2.0712, "sfid": 5.1, "precision": 0.8, "recall": 0.6,
                            "inception_score": None, "protocol": protocol}]}
    pipe.record_evaluation(card_results(report))
    out = deep / "second"
    pipe.save_pretrained(out)
    for file in out.rglob("*"):
        if file.is_file():
            assert str(tmp_path).encode() not in file.read_bytes(), file
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert {"vfmtok", "class-conditional", "VFMTokARPipeline"} <= set(data["tags"])
    (result,) = [r for r in card.data.eval_results if r.metric_name == "gFID (cfg-1.75)"]
    assert result.metric_value == 2.0712 and result.metric_type == "gfid"
    assert "pipe('three'" in card.text and "| 7 | seven |" in card.text and "golden retriever" not in card.text
    assert "VIRTUAL_imagenet256_labeled.npz" in card.text  # the reference by name only
    assert 'DiffusionPipeline.from_pretrained("<this folder or repo id>", trust_remote_code=True)' in card.text
    repo_card = pipe.model_card(repo_id="org/digits-ar")
    assert 'VFMTokARPipeline.from_pretrained("org/digits-ar")' in repo_card.text


# -- vfmtok export pipeline ------------------------------------------------------------------------------------------
def _runs(tmp_path: Path, pipe, weak=None) -> tuple[Path, Path]:
    """A tokenizer run and a generator run folder as `vfmtok train` leaves them (their exported models)."""
    tokenizer_run, generator_run = tmp_path / "runs" / "tok", tmp_path / "runs" / "gen"
    tokenizer = pipe.vqvae if hasattr(pipe, "vqvae") else pipe.vae
    tokenizer.save_pretrained(tokenizer_run / "tokenizer")
    pipe.transformer.save_pretrained(generator_run / "generator")
    return tokenizer_run, generator_run


def test_export_pipeline_from_runs_with_class_names_and_the_run_evaluation(ar_pipe, tmp_path, capsys):
    from vfmtok.pipelines.cli import main

    tokenizer_run, generator_run = _runs(tmp_path, ar_pipe)
    protocol = {"num_samples": 5000, "labels": "balanced", "seed": 0, "sampler_options": {}, "resolution": "64 px",
                "reference": "/data/ref.npz", "reference_sha256": "f" * 64, "extractor_sha256": "e" * 64}
    (generator_run / "bench").mkdir()
    (generator_run / "bench" / "report.json").write_text(json.dumps(
        {"pipeline": "x", "settings": [{"setting": "cfg-2", "fid": 12.5, "protocol": protocol}]}))
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["zero", "one", "two"]))
    out = tmp_path / "exported"
    assert main(["export", "pipeline", "--tokenizer", str(tokenizer_run), "--generator", str(generator_run),
                 "--output-dir", str(out), "--id2label", str(names)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["pipeline"] == "VFMTokARPipeline" and line["classes"] == 3 and line["evaluation"]
    loaded = load_pipeline(out)
    kw = dict(guidance_scale=2.0, output_type="codes")
    assert torch.equal(loaded("two", generator=seeded(), **kw).images, ar_pipe(2, generator=seeded(), **kw).images)
    card = (out / "README.md").read_text()
    assert "| gFID (cfg-2) | 12.5 |" in card and "pipe('zero'" in card and "ref.npz" in card
    # the exported folder refuses to be overwritten, a generator folder that is no generator is named
    assert main(["export", "pipeline", "--tokenizer", str(tokenizer_run), "--generator", str(generator_run),
                 "--output-dir", str(out)]) == 2
    assert main(["export", "pipeline", "--tokenizer", str(tokenizer_run), "--generator",
                 str(tokenizer_run / "tokenizer"), "--output-dir", str(tmp_path / "o2")]) == 2
    assert "a generator is one of" in capsys.readouterr().err


def test_export_pipeline_of_a_flow_run_and_push_to_hub(flow_pipe, tmp_path, monkeypatch, capsys):
    import diffusers.utils.hub_utils as hub_utils
    from huggingface_hub import ModelCard

    from vfmtok.pipelines.cli import main

    uploads = {}

    def upload_folder(repo_id, folder_path, **kwargs):
        uploads[repo_id] = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*")
                            if p.is_file()}
        return "commit-1"

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **kw: ModelCard("generic"))
    monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
    tokenizer_run, generator_run = _runs(tmp_path, flow_pipe)
    out = tmp_path / "exported"
    assert main(["export", "pipeline", "--tokenizer", str(tokenizer_run / "tokenizer"), "--generator",
                 str(generator_run), "--output-dir", str(out), "--push-to-hub", "org/tiny-flow"]) == 0
    assert json.loads(capsys.readouterr().out)["hub"]["repo_id"] == "org/tiny-flow"
    files = uploads["org/tiny-flow"]
    assert {"model_index.json", "pipeline_vfmtok_flow.py", "README.md", "transformer/modeling_vfmtok.py"} <= set(files)
    assert b'VFMTokFlowPipeline.from_pretrained("org/tiny-flow")' in files["README.md"]
    assert not [name for name, data in files.items() if str(tmp_path).encode() in data]
    kw = dict(num_inference_steps=3, guidance_scale=1.5, output_type="pt", sampler="scheduler")
    assert torch.equal(load_pipeline(out)(207, generator=seeded(), **kw).images,
                       flow_pipe(207, generator=seeded(), **kw).images)


def test_a_tokenizer_on_a_local_vfm_folder_saves_without_the_path_and_loads_elsewhere(tmp_path):
    """A VFM named by a local path (the quickstart's --vfm DIR) is bundled, and the saved config names no path."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from vfmtok import load_tokenizer

    dino = tmp_path / "private" / "dinov2"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=14,
        image_size=56, num_register_tokens=4)).save_pretrained(dino)
    import yaml

    run = yaml.safe_load(config("tokenizer", "vfmtok-tiny").read_text())
    run["params"]["vfm"] = {**run["params"]["vfm"], "pretrained": str(dino)}
    tokenizer = build_model({"model": run["model"], "params": run["params"]})
    tokenizer.load_vfm_weights()
    tokenizer.save_pretrained(tmp_path / "saved")
    shutil.rmtree(dino)  # gone: another machine
    assert not [p for p in (tmp_path / "saved").rglob("*") if p.is_file() and str(tmp_path).encode() in p.read_bytes()]
    loaded = load_tokenizer(str(tmp_path / "saved"))
    for key, value in tokenizer.vfm.model.state_dict().items():
        assert torch.equal(loaded.vfm.model.state_dict()[key], value), key


def test_default_guidance_scale_is_saved_and_used_when_no_scale_is_given(ar_pipe, tmp_path):
    gpt = build_model(config("ar", "gpt-tiny")).eval()
    with torch.no_grad():  # a head that is not zero: guidance changes the samples
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pipe = VFMTokARPipeline(ar_pipe.vqvae, gpt, default_guidance_scale=3.0)
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.config.default_guidance_scale == 3.0
    kw = dict(output_type="codes", top_k=50)
    guided = pipe(207, guidance_scale=3.0, generator=seeded(), **kw).images
    assert torch.equal(loaded(207, generator=seeded(), **kw).images, guided)
    assert not torch.equal(loaded(207, guidance_scale=1.0, generator=seeded(), **kw).images, guided)
    assert "guidance 3 unless given another" in (tmp_path / "p" / "README.md").read_text()
    assert ar_pipe.config.get("default_guidance_scale") is None  # no default: no guidance, as before
    with pytest.raises(InvalidValueError, match="default_guidance_scale"):
        VFMTokARPipeline(ar_pipe.vqvae, ar_pipe.transformer, default_guidance_scale=float("nan"))


def test_flow_default_guidance_interval_is_saved_and_used(flow_pipe, tmp_path):
    pipe = VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, None, default_guidance_scale=3.0,
                              default_guidance_interval=[0.3, 0.7])
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.config.default_guidance_interval == [0.3, 0.7]
    kw = dict(num_inference_steps=4, output_type="pt", sampler="scheduler")
    limited = flow_pipe(207, guidance_scale=3.0, guidance_interval=(0.3, 0.7), generator=seeded(), **kw).images
    assert torch.equal(loaded(207, generator=seeded(), **kw).images, limited)
    assert not torch.equal(flow_pipe(207, guidance_scale=3.0, generator=seeded(), **kw).images, limited)
    for bad in ([0.8, 0.2], [0.0, 1.5], [float("nan"), 1.0], [0.5]):
        with pytest.raises(InvalidValueError, match="default_guidance_interval"):
            VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, None, default_guidance_interval=bad)
