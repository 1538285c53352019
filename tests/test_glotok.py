"""GloTok: the histogram relation loss (zero for identical sets, positive otherwise, differentiable, chunked = dense,
against a pair-by-pair reference, bounded block memory), residual refinement as a function of the code indices, the
teacher command, training through the real task with exact resume, save / load, the AR pipeline, the frozen-VFM
encoder variant, describe, and the GPT's per-codebook logit ranges."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from vfmtok.pipelines import VFMTokARPipeline
from vfmtok.pipelines.cli import main
from vfmtok.pipelines.config import build_model
from vfmtok.pipelines.train.extract import extract_tokens, load_tokenizer
from vfmtok.pipelines.train.tokenizer import train_tokenizer
from vfmtok.pipelines.train.tokenizer_stats import build_glotok_teacher
from vfmtok.tokenizer import glotok
from vfmtok.tokenizer.glotok import GloTokModel, histogram_relation_loss, similarity_histogram
from vfmtok.tokenizer.losses import TokenizerLoss
from vfmtok.tokenizer.utils.errors import InvalidValueError
from test_trainer import ROOT, Interrupted, interrupt_after_checkpoint, metrics, needs_samples, small_image_folder

CONFIGS = ROOT / "configs" / "tokenizer"


def tiny(**changes) -> GloTokModel:
    torch.manual_seed(0)
    config = yaml.safe_load((CONFIGS / "glotok-tiny.yaml").read_text())["params"]
    return GloTokModel(**{**config, **changes}).eval()


# -- histogram relation loss ------------------------------------------------------------------------------------------
def reference_histogram(vectors: torch.Tensor, bins: int, sharpness: float) -> torch.Tensor:
    """Pair by pair, in Python: cosine of every pair i <= j, Gaussian soft votes into bin centres, normalised."""
    x = vectors.double()
    centres = [-1 + (m + 0.5) * 2 / bins for m in range(bins)]
    counts = [0.0] * bins
    for i in range(len(x)):
        for j in range(i, len(x)):
            d = float(F.cosine_similarity(x[i], x[j], dim=0))
            for m, b in enumerate(centres):
                counts[m] += math.exp(-sharpness * (d - b) ** 2)
    total = sum(counts)
    return torch.tensor([c / total for c in counts], dtype=torch.float64)


def test_histogram_matches_a_pair_by_pair_reference():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = similarity_histogram(x, bins=40, block_elements=None)
    assert ours.shape == (40,) and abs(float(ours.sum()) - 1) < 1e-12
    torch.testing.assert_close(ours, reference_histogram(x, 40, 200.0), atol=1e-12, rtol=1e-10)


def test_histogram_loss_is_zero_for_identical_sets_positive_otherwise_and_scale_free():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    ha = similarity_histogram(a)
    assert float(histogram_relation_loss(ha, similarity_histogram(a.clone()))) == 0.0
    # Cosine: the scale is irrelevant, up to fp32 rounding. Normalising 3a instead of a moves each similarity by a
    # few ulps, so each bin of the two histograms differs in relative terms by about eps32 times the number of pairs
    # summed into it (at most N(N+1)/2, bounded by ~1 in the normalised histogram), and each of the `bins` KL terms
    # t (log t - log s) by t * that relative difference (plus its own rounding, eps32 * |t log t|): at most
    # bins * eps32 * (1 + max |log t|). Machine- and instruction-set-independent, and far below a real difference.
    eps = torch.finfo(torch.float32).eps
    tolerance = len(ha) * eps * (1 + float(torch.log(ha + 1e-8).abs().max()))
    assert abs(float(histogram_relation_loss(similarity_histogram(3 * a), ha))) < tolerance
    assert float(histogram_relation_loss(similarity_histogram(b), ha)) > 100 * tolerance
    clustered = torch.randn(4, 8, generator=g).repeat(16, 1) + 0.01 * torch.randn(64, 8, generator=g)
    assert float(histogram_relation_loss(similarity_histogram(b), ha)) > 0
    assert float(histogram_relation_loss(similarity_histogram(clustered), ha)) > 0.1


def test_chunked_histogram_equals_the_dense_one_with_gradients():
    teacher = similarity_histogram(torch.randn(50, 6, generator=torch.Generator().manual_seed(2)))
    base = torch.randn(300, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads, values = [], []
    for block in (None, 300 * 40 * 7):  # dense, and blocks of 7 rows
        x = base.clone().requires_grad_(True)
        loss = histogram_relation_loss(similarity_histogram(x, block_elements=block), teacher)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    torch.testing.assert_close(values[0], values[1], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-9)
    assert grads[0].abs().sum() > 0


def test_histogram_loss_passes_gradcheck():
    teacher = similarity_histogram(torch.randn(20, 4, generator=torch.Generator().manual_seed(4)).double(), bins=10)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: histogram_relation_loss(
        similarity_histogram(v, bins=10, block_elements=7 * 10 * 2), teacher), (x,))
    with pytest.raises(InvalidValueError, match="40 bins.*10 bins"):
        histogram_relation_loss(similarity_histogram(x), teacher)


def test_block_memory_is_bounded_so_a_16k_codebook_fits(monkeypatch):
    shapes = []
    original = glotok._block_counts

    def recording(rows, columns, *args):
        shapes.append((rows.shape[0], columns.shape[0]))
        return original(rows, columns, *args)

    monkeypatch.setattr(glotok, "_block_counts", recording)
    n, budget = 600, 1 << 17
    similarity_histogram(torch.randn(n, 8), block_elements=budget)
    assert sum(r for r, _ in shapes) == n and all(r * c * 40 <= budget for r, c in shapes)
    # At 16384 codes the default budget (2^24 values, 64 MB in fp32) means blocks of 25 rows.
    assert (1 << 24) // (16384 * 40) == 25


def test_loss_without_teacher_is_a_clear_error():
    loss = TokenizerLoss(perceptual_weight=0.0, discriminator="none", histogram_weight=0.01)
    with pytest.raises(InvalidValueError, match="histogram_teacher"):
        loss.generator_loss(tiny()(torch.rand(1, 3, 64, 64) * 2 - 1), step=0)


# -- model ------------------------------------------------------------------------------------------------------------
def test_refined_features_and_reconstruction_depend_only_on_the_code_indices():
    model = tiny()
    with torch.no_grad():  # make R non-trivial (it starts as zero)
        for refiner in (model.semantic_refiner, model.visual_refiner):
            refiner.proj_out.weight.normal_(0, 0.5)
    captured = []
    hook = model.decoder.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    output = model(images)
    codes = model.encode(images)
    assert torch.equal(output.tokens, codes) and codes.shape == (3, 32)
    assert (codes[:, 0::2] < 128).all() and (codes[:, 1::2] >= 128).all() and (codes < 512).all()
    decoded = model.decode(codes)
    hook.remove()
    torch.testing.assert_close(captured[0], captured[1], atol=1e-6, rtol=0)  # forward vs decode(codes)
    torch.testing.assert_close(decoded, output.reconstruction.clamp(-1, 1), atol=1e-4, rtol=0)
    refined = model.refined_code_vectors(codes)
    raw = model.semantic_quantizer.lookup(codes[:, 0::2])
    assert not torch.allclose(refined[0], raw)  # R changes the features ...
    # ... and its loss is the distance of q + R(q) to the (normalised, detached) encoder output
    z = model.semantic_adapter(model._features(images, None)).flatten(2).transpose(1, 2)
    z_v = model.visual_adapter(model._features(images, None)).flatten(2).transpose(1, 2)
    expected = F.mse_loss(refined[0], F.normalize(z, dim=-1)) + F.mse_loss(refined[1], F.normalize(z_v, dim=-1))
    torch.testing.assert_close(output.losses["refinement"], expected, atol=1e-6, rtol=1e-5)
    # Other images mapping to the same codes decode identically: the decoder sees a function of the codes alone.
    torch.testing.assert_close(model.decode(codes[[2, 1, 0]]), decoded[[2, 1, 0]], atol=1e-6, rtol=0)


def test_gradients_reach_the_encoder_refiners_and_codebooks():
    model = tiny().train()
    output = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    (output.losses["pixel_l2"] + output.losses["refinement"]).backward()
    for module in (model.encoder, model.semantic_refiner, model.visual_quantizer, model.semantic_adapter):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module


def test_frozen_vfm_encoder_variant_saves_and_loads(tmp_path):
    vfm = yaml.safe_load((CONFIGS / "glotok-tiny.yaml").read_text())["params"]["vfm"]
    model = tiny(encoder_type="vfm", vfm=vfm)
    assert model.frozen_encoder is not None and not any(k.startswith("vfm") for k in model.state_dict())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "vfm.safetensors").is_file()  # a random VFM travels with the folder
    loaded = load_tokenizer(str(tmp_path / "m")).eval()
    assert torch.equal(model.encode(images), loaded.encode(images))
    with pytest.raises(InvalidValueError, match="patch grid"):
        tiny(encoder_type="vfm", vfm={**vfm, "image_size": 70})
    assert tiny().frozen_encoder is None


def test_gpt_restricts_each_token_to_its_codebook():
    torch.manual_seed(0)
    params = yaml.safe_load((ROOT / "configs" / "ar" / "gpt-tiny.yaml").read_text())["params"]
    gpt = build_model({"model": "GPTModel", "params": {**params, "num_tokens": 32, "codebook_sizes": [128, 384]}})
    gpt.eval()
    with torch.no_grad():
        gpt.head.weight.normal_()
    logits = gpt(torch.randint(0, 128, (2, 32)), torch.tensor([1, 2]))
    assert (logits[:, 0::2, 128:] == -1e9).all() and (logits[:, 1::2, :128] == -1e9).all()
    assert torch.equal(gpt.rope[1:3], gpt.rope[1:2].expand(2, -1, -1))  # a cell's two codes share its position
    codes = gpt.generate(torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert (codes[:, 0::2] < 128).all() and (codes[:, 1::2] >= 128).all()
    with pytest.raises(InvalidValueError, match="codebook_sizes"):
        build_model({"model": "GPTModel", "params": {**params, "num_tokens": 32, "codebook_sizes": [128, 128]}})


def test_describe_reports_the_paper_presets(capsys):
    for name, sizes in (("glotok", [4096, 12288]), ("glotok-2x", [16384, 16384])):
        assert main(["describe", str(CONFIGS / f"{name}.yaml")]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["code_layout"]["codebook_sizes"] == sizes and info["code_layout"]["num_tokens"] == 512
        assert info["latent_shape"] == [16, 16, 16] and info["frozen_params"] == 0
        assert 40_000_000 < info["trainable_params"] < 90_000_000


# -- teacher, training, pipeline ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_image_folder(tmp_path_factory.mktemp("glotok-data") / "data", count=8)


@needs_samples
def test_teacher_command_writes_centroids_and_their_histogram(data, tmp_path):
    summary = build_glotok_teacher(tmp_path / "t.safetensors", clusters=16, data=str(data),
                                   config=str(CONFIGS / "glotok-tiny.yaml"), random_vfm=True, batch_size=3)
    assert summary["feature_vectors"] == 8 * 16 and summary["centroids_shape"] == [16, 64]
    teacher = load_file(str(tmp_path / "t.safetensors"))
    torch.testing.assert_close(teacher["histogram"], similarity_histogram(teacher["centroids"].double()).float())
    loss = TokenizerLoss(perceptual_weight=0.0, discriminator="none", histogram_teacher=str(tmp_path / "t.safetensors"))
    assert torch.equal(loss.teacher_histogram, teacher["histogram"])
    again = TokenizerLoss(perceptual_weight=0.0, discriminator="none", histogram_bins=20,
                          histogram_teacher=str(tmp_path / "t.safetensors"))  # other bins: recomputed
    torch.testing.assert_close(again.teacher_histogram,
                               similarity_histogram(teacher["centroids"].double(), bins=20).float())
    with pytest.raises(InvalidValueError, match="at least as many"):
        build_glotok_teacher(tmp_path / "u.safetensors", clusters=2000, data=str(data),
                             config=str(CONFIGS / "glotok-tiny.yaml"), random_vfm=True)


@needs_samples
def test_trains_with_the_teacher_resumes_exactly_and_round_trips_through_the_ar_pipeline(data, tmp_path,
                                                                                         monkeypatch):
    build_glotok_teacher(tmp_path / "teacher.safetensors", clusters=16, data=str(data),
                         config=str(CONFIGS / "glotok-tiny.yaml"), random_vfm=True)
    config = yaml.safe_load((CONFIGS / "glotok-tiny.yaml").read_text())
    config["loss"].update({"histogram_weight": 0.01, "histogram_teacher": str(tmp_path / "teacher.safetensors"),
                           "gan_start_step": 2})
    config["training"].update({"batch_size": 2, "num_workers": 0, "log_every": 1, "checkpoint_every": 2,
                               "sample_every": 4, "num_sample_images": 2, "log_with": ["none"], "max_steps": 4,
                               "keep_last_checkpoints": 5})
    path = tmp_path / "glotok.yaml"
    path.write_text(yaml.safe_dump(config))
    full = train_tokenizer(path, str(data), tmp_path / "full")
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, at_step=2)
        with pytest.raises(Interrupted):
            train_tokenizer(path, str(data), tmp_path / "resumed")
    train_tokenizer(path, str(data), tmp_path / "resumed", resume=True)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    keys = [k for k in a[0] if k.startswith(("model/", "discriminator/"))]
    assert {"model/histogram", "model/refinement", "model/codebook"} <= set(keys)
    assert a[-1]["model/histogram"] > 0 and any(k.startswith("discriminator/") for k in a[-1])
    assert [{k: m.get(k) for k in keys} for m in a] == [{k: m.get(k) for k in keys} for m in b]
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / name))
        wb = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004" / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

    model = load_tokenizer(str(full))
    assert isinstance(model, GloTokModel) and not (full / "vfm.safetensors").exists()
    torch.manual_seed(0)
    params = yaml.safe_load((ROOT / "configs" / "ar" / "gpt-tiny.yaml").read_text())["params"]
    gpt = build_model({"model": "GPTModel", "params": {**params, "num_tokens": 32,
                                                       "codebook_sizes": [128, 384]}}).eval()
    pipe = VFMTokARPipeline(model.eval(), gpt)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = VFMTokARPipeline.from_pretrained(tmp_path / "pipe")
    ours = pipe([3, 4], generator=torch.Generator().manual_seed(0), output_type="pt").images
    theirs = loaded([3, 4], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == (2, 3, 64, 64) and torch.equal(ours, theirs)
    codes = extract_tokens(model, str(data), tmp_path / "codes", batch_size=4, limit=4)
    meta = json.loads((codes / "meta.json").read_text())
    assert meta["kind"] == "codes" and meta["shape"] == [32] and meta["vocab_size"] == 512
    # A teacher from an existing codebook: the trained tokenizer's semantic codebook.
    summary = build_glotok_teacher(tmp_path / "from-codebook.safetensors", from_codebook=str(full))
    assert summary["centroids_shape"] == [128, 8]
