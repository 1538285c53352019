"""Flow training on the shared trainer: latents of the real ImageNet samples, latent statistics, exact resume, and
a tiny denoiser whose flow loss falls clearly below its value at initialisation."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest
import yaml
from safetensors.torch import load_file

from vfmtok.pipelines.cli import main
from vfmtok.pipelines.train.extract import extract_tokens
from vfmtok.pipelines.train.flow import LATENT_STATS_NAME, train_flow
from test_codes import saved_tokenizer
from test_train_ar import split_folders
from test_trainer import ROOT, SAMPLES, Interrupted, interrupt_after_checkpoint, metrics, needs_samples

DIT_TINY = ROOT / "configs" / "flow" / "dit-tiny.yaml"


def flow_config(directory, flow=None, base=DIT_TINY, **training):
    config = yaml.safe_load(base.read_text())
    config["flow"] = {"time_schedule": "logit_normal", **(flow or {})}
    config["sampling"] = {"guidance_scale": 1.5, "steps": 4}
    config["training"] = {"batch_size": 16, "num_workers": 0, "log_every": 1, "checkpoint_every": 3,
                          "sample_every": 3, "num_sample_images": 2, "log_with": ["none"], "learning_rate": 1e-3,
                          "ema_decay": 0.99, **training}
    path = directory / "flow.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    if not (SAMPLES / "labels.csv").is_file():
        pytest.skip("shared ImageNet samples missing")
    directory = tmp_path_factory.mktemp("flow")
    model, path, vfm = saved_tokenizer(directory, "vfmae-tiny")
    folder = split_folders(directory, 300, 1)["train"]
    output = extract_tokens(model, str(folder), directory / "latents", batch_size=50, num_workers=0)
    return {"latents": output, "tokenizer": path, "vfm": vfm}


@needs_samples
def test_latent_statistics_command_matches_numpy(latents):
    assert main(["latent-stats", "--latents", str(latents["latents"])]) == 0
    stats = load_file(str(latents["latents"] / LATENT_STATS_NAME))
    values = np.load(latents["latents"] / "latents.npy").astype(np.float64).reshape(-1, 8, 4, 4)
    assert np.allclose(stats["mean"].numpy(), values.mean(0), atol=1e-5)
    assert np.allclose(stats["std"].numpy(), values.std(0), rtol=1e-4, atol=1e-6)


@needs_samples
def test_interrupted_flow_run_resumes_bitwise(latents, tmp_path, monkeypatch):
    config = flow_config(tmp_path, max_steps=6)
    train_flow(config, tmp_path / "full", latents=str(latents["latents"]))
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, at_step=3)
        with pytest.raises(Interrupted):
            train_flow(config, tmp_path / "resumed", latents=str(latents["latents"]))
    train_flow(config, tmp_path / "resumed", latents=str(latents["latents"]), resume=True)
    assert [m["model/loss"] for m in metrics(tmp_path / "full")] == \
           [m["model/loss"] for m in metrics(tmp_path / "resumed")]


@needs_samples
def test_tiny_denoiser_lowers_its_flow_loss_and_exports_stats(latents, tmp_path):
    config = flow_config(tmp_path, flow={"time_schedule": "uniform"}, max_steps=120, batch_size=32,
                         checkpoint_every=120, sample_every=120, log_every=1)
    exported = train_flow(config, tmp_path / "out", latents=str(latents["latents"]),
                          tokenizer=str(latents["tokenizer"]), vfm_weights=str(latents["vfm"]))
    records = metrics(tmp_path / "out")
    first = sum(r["model/mse"] for r in records[:5]) / 5
    last = sum(r["model/mse"] for r in records[-5:]) / 5
    print(json.dumps({"flow_mse_first_5_steps": first, "flow_mse_last_5_steps": last}))
    # At initialisation the zero-initialised output gives E|data - noise|^2 = 2 for unit-variance latents. Even a
    # perfect model keeps an irreducible error (about 1.6 under uniform times if the latents were independent unit
    # Gaussians), so "clearly lower" is a loose bound.
    assert abs(first - 2.0) < 0.3 and last < 0.85 * first, (first, last)
    assert_exports_the_statistics(exported, latents["latents"] / LATENT_STATS_NAME)
    assert (tmp_path / "out" / "samples" / "step-00000120.png").is_file()


def assert_exports_the_statistics(exported, stats_file):
    """The exported denoiser holds the latent statistics as its own state: no side file, loaded with the model."""
    from vfmtok.generators import DiTModel

    assert not (exported / LATENT_STATS_NAME).exists()
    stats = load_file(str(stats_file))
    model = DiTModel.from_pretrained(exported)
    assert torch.equal(model.latent_mean, stats["mean"]) and torch.equal(model.latent_std, stats["std"])


@needs_samples
def test_online_encoding_trains_with_given_statistics(latents, tmp_path):
    main(["latent-stats", "--latents", str(latents["latents"])])
    config = flow_config(tmp_path, max_steps=2, checkpoint_every=2, sample_every=2)
    data = latents["latents"].parent / "train"
    exported = train_flow(config, tmp_path / "out", data=str(data), tokenizer=str(latents["tokenizer"]),
                          latent_stats=str(latents["latents"] / LATENT_STATS_NAME), vfm_weights=str(latents["vfm"]))
    assert_exports_the_statistics(exported, latents["latents"] / LATENT_STATS_NAME)
    assert len(metrics(tmp_path / "out")) == 2
    with pytest.raises(ValueError, match="--latent-stats"):
        train_flow(config, tmp_path / "other", data=str(data), tokenizer=str(latents["tokenizer"]))


def test_repa_alignment_loss_matches_a_hand_computation():
    import torch

    from vfmtok.generators.transport import repa_alignment_loss

    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    features = torch.tensor([[[1.0, 1.0], [0.0, -3.0]]])
    expected = ((1 - 1 / 2 ** 0.5) + (1 - (-1.0))) / 2
    assert abs(repa_alignment_loss(projected, features).item() - expected) < 1e-6
    # a 4 x 4 VFM grid of constant features is resized to the 2 x 2 denoiser grid
    constant = torch.ones(1, 16, 2)
    assert repa_alignment_loss(torch.ones(1, 4, 2), constant).item() < 1e-6
    with pytest.raises(ValueError, match="square"):
        repa_alignment_loss(torch.ones(1, 3, 2), constant)


@needs_samples
def test_repa_training_aligns_with_the_tokenizer_vfm(latents, tmp_path):
    main(["latent-stats", "--latents", str(latents["latents"])])
    config = yaml.safe_load(flow_config(tmp_path, flow={"repa_weight": 0.5}, max_steps=2, checkpoint_every=2,
                                        sample_every=2).read_text())
    config["params"].update({"repa_layer": 1, "repa_dim": 64, "repa_projector_dim": 32})  # vfmae-tiny VFM width 64
    path = tmp_path / "repa.yaml"
    path.write_text(yaml.safe_dump(config))
    data = latents["latents"].parent / "train"
    common = {"tokenizer": str(latents["tokenizer"]), "vfm_weights": str(latents["vfm"]),
              "latent_stats": str(latents["latents"] / LATENT_STATS_NAME)}
    train_flow(path, tmp_path / "out", data=str(data), **common)
    record = metrics(tmp_path / "out")[-1]
    assert 0 < record["model/repa"] <= 2 and record["model/loss"] > record["model/mse"]
    with pytest.raises(ValueError, match="repa_weight"):
        train_flow(path, tmp_path / "other", latents=str(latents["latents"]))


@needs_samples
def test_lightningdit_trains_through_the_command_line_and_samples_in_the_flow_pipeline(latents, tmp_path):
    """VFMTok2's LightningDiT (configs/flow/lightningdit-*.yaml) trains as any denoiser: `vfmtok train flow`."""
    from vfmtok.generators import DiTModel
    from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline
    from vfmtok.tokenizer.vfmtok import VFMTokModel

    main(["latent-stats", "--latents", str(latents["latents"])])
    config = flow_config(tmp_path, flow={"time_schedule": "uniform"}, base=ROOT / "configs/flow/lightningdit-tiny.yaml",
                         max_steps=80, batch_size=32, checkpoint_every=80, sample_every=80)
    assert main(["train", "flow", "--config", str(config), "--latents", str(latents["latents"]),
                 "--output-dir", str(tmp_path / "out")]) == 0
    records = metrics(tmp_path / "out")
    first = sum(r["model/mse"] for r in records[:5]) / 5
    last = sum(r["model/mse"] for r in records[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    model = DiTModel.from_pretrained(tmp_path / "out" / "generator")
    assert model.config.head_depth == 0 and model.config.condition_silu is False
    tokenizer = VFMTokModel.from_pretrained(latents["tokenizer"], vfm_source=str(latents["vfm"]))
    pipe = VFMTokFlowPipeline(tokenizer.eval(), model.eval(), None)
    images = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
