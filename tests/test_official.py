"""Converted releases sample as the release's own evaluation does, and ``convert pipeline --official`` works offline
from a huggingface_hub cache holding random weights in the official file layouts (pipelines/official.py)."""
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmtok.pipelines.config import build_model, load_config
from vfmtok.pipelines.convert import convert_official_pipeline
from vfmtok.pipelines.official import RELEASES, convert_release, release_table_markdown
from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline
from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError, MissingFileError

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "b" * 40


def config(kind: str, name: str) -> Path:
    return ROOT / "configs" / kind / f"{name}.yaml"


def _ddt_release_layout(seed: int) -> dict:
    """A tiny DiT^DH with random weights everywhere (no zero-initialised layer), under DiTwDDTHead's key names."""
    from test_dit import _randomise_all, _reference_layout

    model = build_model(config("flow", "ditdh-tiny"))
    _randomise_all(model, seed)
    with torch.no_grad():  # a velocity of order 1, so that every step of the grid shows in the result
        model.final_layer.linear.weight.mul_(30)
    return _reference_layout(model)


def _vfmtok2_stats(path: Path) -> None:
    from test_dit import _vfmtok2_stats_file

    _vfmtok2_stats_file(path, channels=8, side=4, seed=3)


@pytest.fixture(scope="module")
def release_files(tmp_path_factory) -> Path:
    """Random weights saved as the releases save them, at the releases' paths (tiny configs)."""
    from test_convert import reference_state_dict
    from test_gpt import reference_layout

    root = tmp_path_factory.mktemp("release")
    for name, tok in (("DINOv2/tokenizer/vfmtok-tokenizer.pt", "vfmtok-tiny"), ("tokenizer/vfmae-tokenizer.pt",
                                                                               "vfmae-tiny")):
        tok_config = config("tokenizer", tok)
        state = reference_state_dict(build_model(tok_config), load_config(tok_config)["params"], seed=1)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "ema": state, "steps": 10}, root / name)
    (root / "DINOv2/GPT-B").mkdir(parents=True)
    torch.save({"model": reference_layout(load_config(config("ar", "gpt-tiny"))["params"], seed=2)},
               root / "DINOv2/GPT-B/GPT-B-300e.pt")
    (root / "DiTDH-XL").mkdir()
    for epochs, seed in ((800, 4), (20, 5)):
        torch.save({"ema": _ddt_release_layout(seed), "model": {}, "opt": {}}, root / f"DiTDH-XL/DiTDH-XL_{epochs}e.pt")
    _vfmtok2_stats(root / "stats-500.pt")
    from safetensors.torch import save_file
    from test_rar import reference_layout as rar_reference_layout

    rar = build_model(config("ar", "rar-tiny"))
    with torch.no_grad():
        for parameter in rar.parameters():
            parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(6))
    (root / "VFMTok-RAR/RAR-L-ultra").mkdir(parents=True)
    save_file(rar_reference_layout(rar), str(root / "VFMTok-RAR/RAR-L-ultra/model.safetensors"))
    return root


def _hub_cache(files: Path, cache: Path, repo_id: str, commit: str = COMMIT) -> None:
    """huggingface_hub's cache layout: blobs named by their sha256 (LFS files), snapshots/<commit>/<path> symlinks,
    refs/main holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1.0").write_text(commit)  # a tag: --revision v1.0 resolves offline through refs/
    for file in sorted(p for p in files.rglob("*") if p.suffix in (".pt", ".safetensors") and p.name != "stats-500.pt"):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _tiny(name: str, **changes):
    """The release ``name`` of the real table with tiny configs (same files, repo and protocol)."""
    release = RELEASES[name]
    tokenizer = "vfmae-tiny" if release.kind.startswith("vfmae") else "vfmtok-tiny"
    generator = {"vfmtok-gpt": ("ar", "gpt-tiny"), "vfmtok-rar": ("ar", "rar-tiny")}.get(release.kind,
                                                                                        ("flow", "ditdh-tiny"))
    return dataclasses.replace(release, configs={"tokenizer": str(config("tokenizer", tokenizer)),
                                                 "generator": str(config(*generator))}, **changes)


@pytest.fixture()
def offline_cache(release_files, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from vfmtok.pipelines.official import VFMTOK2_STATS_URL

    cache = tmp_path / "hub"
    _hub_cache(release_files, cache, "yexiguafu/VFMTok")
    stats = release_files / "stats-500.pt"
    digest = hashlib.sha256(stats.read_bytes()).hexdigest()
    target = cache / "vfmtok-url-files" / digest / "stats-500.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(stats.read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, {VFMTOK2_STATS_URL: digest}


# -- the sampling protocol of converted releases ----------------------------------------------------------------------
def _convert_flow(release_files, tmp_path) -> VFMTokFlowPipeline:
    out = convert_official_pipeline("flow", str(release_files / "tokenizer/vfmae-tokenizer.pt"),
                                    str(config("tokenizer", "vfmae-tiny")),
                                    str(release_files / "DiTDH-XL/DiTDH-XL_800e.pt"), str(config("flow", "ditdh-tiny")),
                                    tmp_path / "flow", latent_stats=str(release_files / "stats-500.pt"))
    return VFMTokFlowPipeline.from_pretrained(out)


def test_a_converted_vfmtok2_pipeline_samples_with_the_release_grid_by_default(release_files, tmp_path):
    """VFMTok2's test_c2i.py: Euler over t = 1 - linspace(0, 0.999, 100), shifted by 4 (t = 1 noise), 99 steps
    ending at t = 0.004, then x * (var + 1e-5) + mean. Written out here from the reference, not from our sampler."""
    pipe = _convert_flow(release_files, tmp_path)
    labels = [3, 207]
    got = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="latent").images

    noise = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    t = 1 - torch.linspace(0, 1 - 1 / 1000, 100)
    t = 4.0 * t / (1 + 3.0 * t)
    x, y = noise.clone(), torch.tensor(labels)
    with torch.no_grad():
        for i in range(99):  # reference velocity at reference time t = -(ours at SiT time 1 - t)
            velocity = -pipe.transformer(x, torch.full((2,), 1 - float(t[i])), y)
            x = x + (t[i + 1] - t[i]) * velocity
    from test_dit import _vfmtok2_stats_file

    mean_np, var_np = _vfmtok2_stats_file(tmp_path / "again.pt", channels=8, side=4, seed=3)  # the fixture's arrays
    mean = torch.tensor(mean_np).reshape(8, 4, 4)[None]
    var = torch.tensor(var_np).reshape(8, 4, 4)[None]
    expected = x * (var + 1e-5) + mean
    assert float(t[-1]) == pytest.approx(0.003988, abs=1e-6)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert pipe.sampling_protocol["num_inference_steps"] == 99 and pipe.sampling_protocol["shift"] == 4.0
    # configurable: the same grid integrated on to t = 0 is another result (the last step of the release is skipped)
    pipe.set_sampling_protocol(99, 0.0)
    to_zero = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert (to_zero - got).abs().max() > 1e-3, (to_zero - got).abs().max()
    pipe.set_sampling_protocol(None, 0.0)
    assert pipe.sampling_protocol["num_inference_steps"] == 50 and pipe.config.final_sigma == 0.0


def test_a_converted_vfmtok_pipeline_resizes_to_256_with_plain_bicubic(release_files, tmp_path):
    """VFMTok's test_net.py decodes at the tokenizer's size and resizes with F.interpolate(mode="bicubic")."""
    out = convert_official_pipeline("ar", str(release_files / "DINOv2/tokenizer/vfmtok-tokenizer.pt"),
                                    str(config("tokenizer", "vfmtok-tiny")),
                                    str(release_files / "DINOv2/GPT-B/GPT-B-300e.pt"), str(config("ar", "gpt-tiny")),
                                    tmp_path / "ar")
    pipe = VFMTokARPipeline.from_pretrained(out)
    assert pipe.config.resize_antialias is False and pipe.config.default_output_size == 256
    codes = pipe(7, generator=torch.Generator().manual_seed(0), output_type="codes").images
    images = pipe(7, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 256, 256)
    native = pipe.vqvae.decode(codes)  # the tokenizer's own 64 px
    assert native.shape[-1] == 64
    antialiased = pipe.vqvae.decode(codes, output_size=256)
    plain = pipe.vqvae.decode(codes, output_size=256, antialias=False)
    assert (plain - antialiased).abs().max() > 1e-3  # the two resizes differ
    torch.testing.assert_close(images, (plain / 2 + 0.5).clamp(0, 1))
    pipe.set_resize_protocol(True, None)  # configurable: this project's antialiased resize, the tokenizer's size
    assert pipe(7, generator=torch.Generator().manual_seed(0), output_type="pt").images.shape == (1, 3, 64, 64)


def test_plain_bicubic_resize_is_f_interpolate_of_the_unclamped_decoder_output():
    from vfmtok.tokenizer.vfm import resize_images

    x = torch.randn(2, 3, 21, 21) * 2
    assert torch.equal(resize_images(x, 16, antialias=False),
                       F.interpolate(x, size=(16, 16), mode="bicubic"))


def test_benchmark_protocol_records_the_pipelines_sampling_defaults(release_files, tmp_path):
    from types import SimpleNamespace

    from vfmtok.evaluation.benchmark import _protocol

    settings = {"weights": "w", "num_samples": 10, "labels": "random", "seed": 0, "guidance_scale": 1.0,
                "options": {}, "output_size": 256}
    reference, extractor = SimpleNamespace(path="ref.npz", content_hash="h", statistics={}), SimpleNamespace(sha256="e")
    flow = _convert_flow(release_files, tmp_path)
    options = _protocol(flow, settings, reference, extractor)["sampler_options"]
    assert (options["num_inference_steps"], options["shift"], options["final_sigma"]) == (99, 4.0, 0.001)
    assert options["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert _protocol(flow, {**settings, "options": {"num_inference_steps": 20}}, reference,
                     extractor)["sampler_options"]["num_inference_steps"] == 20  # what the run asked for wins
    ar_out = convert_official_pipeline("ar", str(release_files / "DINOv2/tokenizer/vfmtok-tokenizer.pt"),
                                       str(config("tokenizer", "vfmtok-tiny")),
                                       str(release_files / "DINOv2/GPT-B/GPT-B-300e.pt"),
                                       str(config("ar", "gpt-tiny")), tmp_path / "ar")
    ar = VFMTokARPipeline.from_pretrained(ar_out)
    assert "without antialiasing" in _protocol(ar, settings, reference, extractor)["resolution"]
    ar.set_resize_protocol(True, None)
    assert "(bicubic, antialiased)" in _protocol(ar, settings, reference, extractor)["resolution"]


# -- --official ---------------------------------------------------------------------------------------------------
def test_official_gpt_release_converts_offline_from_the_hub_cache(offline_cache, release_files, tmp_path, capsys):
    cache, _ = offline_cache
    table = {"vfmtok-gpt-b": _tiny("vfmtok-gpt-b")}
    out = convert_release("vfmtok-gpt-b", tmp_path / "pipe", cache_dir=cache, revision="v1.0", releases=table)
    pipe = VFMTokARPipeline.from_pretrained(out)
    assert pipe.config.source["revision"] == "v1.0"
    gpt = torch.load(release_files / "DINOv2/GPT-B/GPT-B-300e.pt", weights_only=True)["model"]
    assert torch.equal(pipe.transformer.state_dict()["head.weight"], gpt["output.weight"])
    card = (out / "README.md").read_text()
    for name in ("DINOv2/tokenizer/vfmtok-tokenizer.pt", "DINOv2/GPT-B/GPT-B-300e.pt"):
        assert name in card and hashlib.sha256((release_files / name).read_bytes()).hexdigest() in card
    assert "3.43" in card and "3.09" in card and "no antialiasing" in card
    assert pipe.config.source["files"]["generator"]["file"] == "DINOv2/GPT-B/GPT-B-300e.pt"


def test_official_rar_release_converts_offline_with_its_published_sampling(offline_cache, release_files, tmp_path):
    from safetensors.torch import load_file

    cache, _ = offline_cache
    out = convert_release("vfmtok-rar-l-ultra", tmp_path / "pipe", cache_dir=cache,
                          releases={"vfmtok-rar-l-ultra": _tiny("vfmtok-rar-l-ultra")})
    pipe = VFMTokARPipeline.from_pretrained(out)
    reference = load_file(str(release_files / "VFMTok-RAR/RAR-L-ultra/model.safetensors"))
    assert torch.equal(pipe.transformer.state_dict()["head.weight"], reference["lm_head.weight"])
    # RAR's released sampling (configs/training/generator/rar.yaml) and test_net.py's plain bicubic 336 -> 256
    assert pipe.config.default_guidance_scale == 16.0 and pipe.config.resize_antialias is False
    assert pipe.sampler_defaults()["guidance_schedule"] == "cosine_power"
    assert pipe.sampler_defaults()["guidance_power"] == 2.75
    card = (out / "README.md").read_text()
    digest = hashlib.sha256((release_files / "VFMTok-RAR/RAR-L-ultra/model.safetensors").read_bytes()).hexdigest()
    assert "VFMTok-RAR/RAR-L-ultra/model.safetensors" in card and digest in card and "1.33" in card and "2.01" in card


def test_official_autoguidance_release_carries_its_weak_model(offline_cache, release_files, tmp_path):
    cache, sha = offline_cache
    table = {"ag": _tiny("vfmae-ditdh-xl-800ep-ag", sha256=sha)}
    out = convert_release("ag", tmp_path / "pipe", cache_dir=cache, releases=table)
    pipe = VFMTokFlowPipeline.from_pretrained(out)
    assert pipe.weak_transformer is not None and pipe.config.default_guidance_scale == 1.37
    weak = torch.load(release_files / "DiTDH-XL/DiTDH-XL_20e.pt", weights_only=True)["ema"]
    strong = torch.load(release_files / "DiTDH-XL/DiTDH-XL_800e.pt", weights_only=True)["ema"]
    assert torch.equal(pipe.weak_transformer.state_dict()["blocks.0.attn.qkv.weight"], weak["blocks.0.attn.qkv.weight"])
    assert torch.equal(pipe.transformer.state_dict()["blocks.0.attn.qkv.weight"], strong["blocks.0.attn.qkv.weight"])
    assert torch.equal(pipe.weak_transformer.latent_std, pipe.transformer.latent_std)
    assert pipe.sampling_protocol["num_inference_steps"] == 99
    card = (out / "README.md").read_text()
    assert "1.25" in card and "DiTDH-XL/DiTDH-XL_20e.pt" in card and "stats-500.pt" in card


def test_official_errors_name_the_missing_file_the_wrong_digest_and_the_unknown_release(offline_cache, tmp_path):
    cache, sha = offline_cache
    release = _tiny("vfmtok-gpt-b")
    with pytest.raises(InvalidValueError, match="'vfmtok-gpt-q'"):
        convert_release("vfmtok-gpt-q", tmp_path / "a", cache_dir=cache, releases={"vfmtok-gpt-b": release})
    wrong = _tiny("vfmtok-gpt-b", sha256={"DINOv2/GPT-B/GPT-B-300e.pt": "0" * 64})
    with pytest.raises(CheckpointError, match="GPT-B-300e.pt has sha256 [0-9a-f]{64}, expected 0{64}"):
        convert_release("x", tmp_path / "b", cache_dir=cache, releases={"x": wrong})
    missing = _tiny("vfmtok-gpt-l")  # GPT-L-300e.pt is not in the cache
    with pytest.raises(MissingFileError, match="DINOv2/GPT-L/GPT-L-300e.pt"):
        convert_release("x", tmp_path / "c", cache_dir=cache, releases={"x": missing})
    no_stats = _tiny("vfmae-ditdh-xl-800ep")  # the table's real digest: the URL file is not in this cache
    with pytest.raises(MissingFileError, match="stats-500.pt"):
        convert_release("x", tmp_path / "d", cache_dir=cache, releases={"x": no_stats})
    with pytest.raises(MissingFileError, match="revision v9"):
        convert_release("x", tmp_path / "e", cache_dir=cache, revision="v9", releases={"x": release})
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_official_on_the_command_line(offline_cache, tmp_path, capsys, monkeypatch):
    from vfmtok.pipelines import official
    from vfmtok.pipelines.cli import main

    cache, _ = offline_cache
    monkeypatch.setitem(official.RELEASES, "vfmtok-gpt-b", _tiny("vfmtok-gpt-b"))
    argv = ["convert", "pipeline", "--official", "vfmtok-gpt-b", "--output-dir", str(tmp_path / "p"),
            "--cache-dir", str(cache)]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["release"] == "vfmtok-gpt-b"
    assert main(["convert", "pipeline", "--official", "nope", "--output-dir", str(tmp_path / "q")]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["convert", "pipeline", "ar", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--official NAME or all of" in capsys.readouterr().err


def test_release_table_is_plain_data_with_a_converter_per_kind_and_the_readme_lists_it():
    from vfmtok.pipelines.config import config_path
    from vfmtok.pipelines.official import CONVERTERS, PROTOCOLS

    readme = (ROOT / "README.md").read_text()
    for name, release in RELEASES.items():
        assert release.kind in CONVERTERS and release.protocol in PROTOCOLS
        assert all(config_path(c).is_file() for c in release.configs.values())
        assert all(not f.startswith("https://") or f in release.sha256 for f in release.files.values())
        assert f"`{name}`" in readme, name
    assert release_table_markdown().count("\n") == len(RELEASES) + 1
