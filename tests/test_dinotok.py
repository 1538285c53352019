"""DINO-Tok: streaming PCA statistics against a direct computation, the exactly invertible PCA reweighting, PCA-space
quantization in a case where plain VQ collapses, the two-codebook code layout, training through the real task (AE,
then pca-stats, then VQ initialised from it) with exact resume, save / load, the AR and flow pipelines, describe."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vfmtok.pipelines import VFMTokARPipeline, VFMTokFlowPipeline
from vfmtok.pipelines.cli import main
from vfmtok.pipelines.config import build_model
from vfmtok.pipelines.train.extract import extract_tokens, load_tokenizer
from vfmtok.pipelines.train.tokenizer import train_tokenizer
from vfmtok.pipelines.train.tokenizer_stats import init_from_pretrained, pca_statistics
from vfmtok.tokenizer.dinotok import DINOTokModel, LatentMoments
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError
from test_trainer import ROOT, Interrupted, interrupt_after_checkpoint, metrics, needs_samples, small_image_folder

CONFIGS = ROOT / "configs" / "tokenizer"


def tiny(kind: str = "vq") -> DINOTokModel:
    torch.manual_seed(0)
    return build_model(CONFIGS / f"dinotok-{kind}-tiny.yaml").eval()


def anisotropic(count: int, seed: int = 0) -> torch.Tensor:
    """Latent-like vectors (count, 16): a large common offset, two dominant directions, 14 tiny ones, rotated."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([8.0, 4.0] + [0.05] * 14)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    return 40.0 + (torch.randn(count, 16, generator=g, dtype=torch.float64) * scales) @ rotation.t()


# -- statistics -------------------------------------------------------------------------------------------------------
def test_streamed_and_merged_moments_match_a_direct_computation():
    x = anisotropic(1000) + 1e4  # a large offset: the naive E[xx^T] - mu mu^T would lose most digits
    first, second = LatentMoments(16), LatentMoments(16)
    for part in torch.split(x[:430], 97):  # uneven batches
        first.update(part)
    for part in torch.split(x[430:], 128):
        second.update(part)
    merged = LatentMoments.from_tensor(first.to_tensor(), 16)  # as gathered from another process
    merged.merge(second)
    assert merged.count == 1000
    torch.testing.assert_close(merged.mean, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.covariance(), torch.cov(x.t()), rtol=1e-9, atol=1e-12)
    variances, components = merged.principal_directions()
    assert (variances[:-1] >= variances[1:]).all()
    torch.testing.assert_close(components.t() @ components, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(merged.covariance() @ components, components * variances, atol=1e-9, rtol=1e-9)
    with pytest.raises(InvalidValueError, match=r"shape \(N, 16\)"):
        merged.update(torch.zeros(3, 15))


def test_pca_reweighting_is_exactly_invertible_and_whitens():
    model = tiny().double()
    x = anisotropic(2000)
    moments = LatentMoments(16)
    moments.update(x)
    model.set_pca_statistics(moments)
    assert model.pca_fitted and int(model.pca_num_samples) == 2000
    y = model.to_pca_space(x)
    torch.testing.assert_close(model.from_pca_space(y), x, atol=1e-10, rtol=0)
    variances = model.pca_variances
    expected = torch.diag(variances / (variances + model.config.pca_eps))  # whitened up to the eps
    torch.testing.assert_close(torch.cov(y.t()), expected, atol=1e-9, rtol=0)
    # Dominant subspace (rank 4): the inverse keeps the top components and replaces the others by their mean.
    low = DINOTokModel(**{**model.config, "pca_rank": 4}).double()
    low.set_pca_statistics(moments)
    back = low.from_pca_space(low.to_pca_space(x))
    torch.testing.assert_close(low.from_pca_space(low.to_pca_space(back)), back, atol=1e-10, rtol=0)
    assert (back - x).norm() < 0.1 * (x - x.mean(0)).norm()


def test_quantizing_in_pca_space_avoids_the_collapse_of_plain_vq():
    model = tiny()
    z = anisotropic(4096).float()[None]
    _, plain, _ = model.quantize(z)  # identity statistics: plain VQ of the raw latent
    assert max(plain[0, k::2].unique().numel() for k in range(2)) <= 2  # the offset decides: (almost) one code
    moments = LatentMoments(16)
    moments.update(z[0])
    model.set_pca_statistics(moments)
    _, reweighted, _ = model.quantize(z)
    used = [reweighted[0, k::2].unique().numel() for k in range(2)]
    assert min(used) > 200, used  # of 256 per codebook


def test_codes_interleave_the_two_codebooks_and_decode_from_the_indices():
    model = tiny()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 32) and model.code_layout.tokens_per_position == 2
    assert (codes[:, 0::2] < 256).all() and (codes[:, 1::2] >= 256).all() and (codes < 512).all()
    output = model(images)
    assert torch.equal(output.tokens, codes)
    torch.testing.assert_close(model.decode(codes), output.reconstruction.clamp(-1, 1), atol=1e-4, rtol=0)
    with pytest.raises(InvalidValueError, match=r"\[0, 512\)"):
        model.decode(codes + 512)


def test_invalid_configs_are_refused():
    config = dict(tiny().config)
    with pytest.raises(InvalidValueError, match="pca_rank"):
        DINOTokModel(**{**config, "pca_rank": 17})
    with pytest.raises(InvalidValueError, match="split evenly"):
        DINOTokModel(**{**config, "num_codebooks": 3})
    with pytest.raises(InvalidValueError, match="16x downsampling"):
        DINOTokModel(**{**config, "image_size": 128})


# -- training, persistence, pipelines ---------------------------------------------------------------------------------
def run_config(tmp_path, kind: str, **training) -> str:
    config = yaml.safe_load((CONFIGS / f"dinotok-{kind}-tiny.yaml").read_text())
    config["loss"].update({"gan_weight": 0.0})
    config["training"].update({"batch_size": 2, "num_workers": 0, "log_every": 1, "checkpoint_every": 2,
                               "sample_every": 4, "num_sample_images": 2, "log_with": ["none"], "max_steps": 4,
                               "keep_last_checkpoints": 5, **training})
    if kind == "vq":
        config["params"]["train_encoder"] = False
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """AE trained 2 steps -> pca-stats -> VQ configs ready to be trained from it."""
    root = tmp_path_factory.mktemp("dinotok")
    data = small_image_folder(root / "data", count=8)
    ae = train_tokenizer(run_config(root, "ae", max_steps=2), str(data), root / "ae")
    summary = pca_statistics(load_tokenizer(str(ae)), str(data), root / "ae-pca", batch_size=3)
    return {"root": root, "data": data, "ae": ae, "pca": root / "ae-pca", "summary": summary}


@needs_samples
def test_pca_stats_command_stores_the_statistics_of_the_dataset(trained):
    assert trained["summary"]["num_vectors"] == 8 * 16
    ae = load_tokenizer(str(trained["ae"]))
    from vfmtok.pipelines.data import ImageDataset, load_image_dataset

    dataset = ImageDataset(load_image_dataset(str(trained["data"])), 64, augment="center", flip=False)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        latent = ae.latent_tokens(images).reshape(-1, 16).double()
    stored = DINOTokModel.from_pretrained(trained["pca"])
    torch.testing.assert_close(stored.pca_mean.double(), latent.mean(0), atol=1e-5, rtol=1e-5)
    variances = torch.linalg.eigvalsh(torch.cov(latent.t())).flip(0)
    torch.testing.assert_close(stored.pca_variances.double(), variances, atol=1e-5, rtol=1e-4)
    assert int(stored.pca_num_samples) == 128


@needs_samples
def test_ae_trains_saves_loads_and_round_trips_through_the_flow_pipeline(trained):
    ae = load_tokenizer(str(trained["ae"]))
    assert not ae.is_discrete and ae.latent_shape == (16, 4, 4)
    assert metrics(trained["ae"].parent)[-1]["model/l2"] > 0
    torch.manual_seed(0)
    dit = build_model({"model": "DiTModel", "params": {**yaml.safe_load(
        (ROOT / "configs" / "flow" / "dit-tiny.yaml").read_text())["params"], "in_channels": 16}}).eval()
    dit.set_latent_statistics(torch.zeros(dit.latent_shape), torch.ones(dit.latent_shape))
    pipe = VFMTokFlowPipeline(ae.eval(), dit, None)
    folder = trained["root"] / "flow-pipe"
    pipe.save_pretrained(folder)
    loaded = VFMTokFlowPipeline.from_pretrained(folder)
    kw = dict(num_inference_steps=2, guidance_scale=1.5, output_type="np")
    ours = pipe(207, generator=torch.Generator().manual_seed(0), **kw).images
    theirs = loaded(207, generator=torch.Generator().manual_seed(0), **kw).images
    assert ours.shape == (1, 64, 64, 3) and (ours == theirs).all()
    latents = extract_tokens(ae, str(trained["data"]), trained["root"] / "latents", batch_size=4, limit=4)
    meta = json.loads((latents / "meta.json").read_text())
    assert meta["kind"] == "latents" and meta["shape"] == [16, 4, 4] and meta["tokenizer"]["class"] == "DINOTokModel"


@needs_samples
@pytest.mark.slow
def test_pca_stats_sharded_over_two_processes_matches_one_process(trained):
    """`accelerate launch` with 2 CPU processes: each measures half of the images, the moments are merged."""
    output = trained["root"] / "pca-2proc"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29531", "-m", "vfmtok", "pca-stats", "--tokenizer", str(trained["ae"]),
               "--data", str(trained["data"]), "--output-dir", str(output), "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "pca_stats.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_vectors"] == 8 * 16
    one, two = DINOTokModel.from_pretrained(trained["pca"]), DINOTokModel.from_pretrained(output)
    torch.testing.assert_close(two.pca_mean, one.pca_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two.pca_variances, one.pca_variances, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(two.pca_components.abs(), one.pca_components.abs(), atol=1e-3, rtol=0)


@needs_samples
def test_vq_from_the_ae_resumes_exactly_and_round_trips_through_the_ar_pipeline(trained, monkeypatch):
    config, data, root = run_config(trained["root"], "vq"), str(trained["data"]), trained["root"]
    full = train_tokenizer(config, data, root / "vq-full", init_from=str(trained["pca"]))
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, at_step=2)
        with pytest.raises(Interrupted):
            train_tokenizer(config, data, root / "vq-resumed", init_from=str(trained["pca"]))
    train_tokenizer(config, data, root / "vq-resumed", init_from=str(trained["pca"]), resume=True)
    a, b = metrics(root / "vq-full"), metrics(root / "vq-resumed")
    keys = [k for k in a[0] if k.startswith("model/")]
    assert "model/codebook" in keys and [m["step"] for m in b] == [1, 2, 3, 4]
    assert [{k: m[k] for k in keys} for m in a] == [{k: m[k] for k in keys} for m in b]
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(root / "vq-full" / "checkpoints" / "step-00000004" / name))
        wb = load_file(str(root / "vq-resumed" / "checkpoints" / "step-00000004" / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

    vq = load_tokenizer(str(full))
    pca = DINOTokModel.from_pretrained(trained["pca"])
    assert vq.pca_fitted and torch.equal(vq.pca_components, pca.pca_components)
    assert torch.equal(vq.fusion.proj_out.weight, pca.fusion.proj_out.weight)  # frozen, from the AE
    assert not torch.equal(vq.decoder.proj_in.weight, pca.decoder.proj_in.weight)  # trained
    torch.manual_seed(0)
    gpt = build_model({"model": "GPTModel", "params": {**yaml.safe_load(
        (ROOT / "configs" / "ar" / "gpt-tiny.yaml").read_text())["params"], "num_tokens": 32,
        "codebook_sizes": [256, 256]}}).eval()
    pipe = VFMTokARPipeline(vq.eval(), gpt)
    pipe.save_pretrained(root / "ar-pipe")
    loaded = VFMTokARPipeline.from_pretrained(root / "ar-pipe")
    ours = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    theirs = loaded([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == (2, 3, 64, 64) and torch.equal(ours, theirs)


def test_init_from_refuses_a_folder_without_weights_or_shared_weights(tmp_path):
    with pytest.raises(MissingFileError, match="no diffusion_pytorch_model.safetensors"):
        init_from_pretrained(tiny(), tmp_path)
    torch.manual_seed(0)
    other = build_model(CONFIGS / "glotok-tiny.yaml")
    other.save_pretrained(tmp_path / "glotok")
    with pytest.raises(InvalidValueError, match="none of its weights"):
        init_from_pretrained(tiny(), tmp_path / "glotok")


def test_describe_reports_the_paper_presets(capsys):
    for kind, layout in (("vq", {"codebook_sizes": [16384, 16384], "num_tokens": 512, "vocab_size": 32768}),):
        assert main(["describe", str(CONFIGS / f"dinotok-{kind}.yaml")]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["latent_shape"] == [832, 16, 16] and info["vfm"]["grid"] == [16, 16]
        assert info["trainable_params"] > 10_000_000 and info["frozen_params"] > 80_000_000
        if layout:
            assert {k: info["code_layout"][k] for k in layout} == layout and info["code_dim"] == 416
