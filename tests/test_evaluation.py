"""FID / sFID / precision-recall of image sets with the real FID Inception weights, and tokenizer reconstruction
metrics, on the shared ImageNet samples."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmtok.evaluation.fid import InceptionFeatures, compare_sources, load_source, save_statistics, source_features
from vfmtok.evaluation.metrics import frechet_distance, feature_statistics

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VFMTOK_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "fid-inception" / "pt_inception-2015-12-05-pool3-nofc.pth"
SAMPLES = SHARED / "data" / "imagenet-1k-samples-256"
needs_shared = pytest.mark.skipif(not (WEIGHTS.is_file() and (SAMPLES / "labels.csv").is_file()),
                                  reason="the shared Inception weights or ImageNet samples are missing")


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    # one feature cache for the module: a reference's features are extracted once
    os.environ["VFMTOK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield InceptionFeatures(str(WEIGHTS))
    del os.environ["VFMTOK_CACHE"]


def image_npz(path: Path, files: list[Path]) -> Path:
    from PIL import Image

    np.savez(path, arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    return path


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """Two disjoint sets of 32 shared ImageNet samples, as ADM-style .npz batches."""
    files = sorted(SAMPLES.glob("*.JPEG")) or sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in
                                                      (".jpg", ".jpeg", ".png"))
    root = tmp_path_factory.mktemp("halves")
    return image_npz(root / "a.npz", files[0:64:2]), image_npz(root / "b.npz", files[1:64:2])


@needs_shared
def test_fid_of_disjoint_halves_is_finite_and_far_above_a_half_against_itself(extractor, halves):
    a, b = (load_source(p) for p in halves)
    across = compare_sources(a, b, extractor, batch_size=16)
    itself = compare_sources(a, a, extractor, batch_size=16)
    print(json.dumps({"fid_disjoint_halves_32": across["fid"], "fid_half_with_itself": itself["fid"]}))
    assert np.isfinite(across["fid"]) and across["fid"] > 50
    assert abs(itself["fid"]) < 1e-3 and abs(itself["sfid"]) < 1e-3
    assert itself["precision"] == 1.0 and itself["recall"] == 1.0
    assert across["num_samples"] == across["num_reference"] == 32
    assert any("32 samples" in w for w in across["warnings"])  # fewer than 2048: the report says so
    # The shared weights have no classification layer: IS is unavailable, with the reason, never made up
    assert across["inception_score"] is None and "classification layer" in across["inception_score_unavailable"]
    assert across["extractor_sha256"] == extractor.sha256 and len(across["reference_hash"]) == 64


@needs_shared
def test_features_do_not_depend_on_the_batch_size(extractor, halves):
    source = load_source(halves[0])
    source.array = source.array[:15]
    small, large = source_features(source, extractor, batch_size=4), source_features(source, extractor, batch_size=15)
    for name in ("pool", "spatial"):
        assert small[name].shape == large[name].shape
        np.testing.assert_allclose(small[name], large[name], rtol=1e-4, atol=1e-5)
    fid = frechet_distance(*(lambda s: (s.mu, s.sigma))(feature_statistics(small["pool"])),
                           *(lambda s: (s.mu, s.sigma))(feature_statistics(large["pool"])))
    assert abs(fid) < 1e-3
    assert small["spatial"].shape[1] == 17 * 17 * 7  # sFID features: mixed_6/conv[..., :7]


@needs_shared
def test_a_statistics_file_gives_the_same_fid_as_its_images(extractor, halves, tmp_path):
    from vfmtok.evaluation.fid import _cached_features

    a, b = (load_source(p) for p in halves)
    stats = save_statistics(_cached_features(b, extractor, 16), tmp_path / "b-stats.npz", extractor.sha256)
    from_images = compare_sources(a, b, extractor, batch_size=16)
    from_stats = compare_sources(a, load_source(stats), extractor, batch_size=16)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert from_stats["sfid"] == pytest.approx(from_images["sfid"], rel=1e-9)
    assert from_stats["precision"] is None  # no reference images: precision / recall unavailable, and said so


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_source(tmp_path / "empty")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_source(tmp_path / "floats.npz")


@needs_shared
def test_reconstruction_metrics_of_a_tiny_tokenizer(tmp_path, monkeypatch):
    from vfmtok.evaluation.recon import reconstruction_metrics
    from vfmtok.pipelines.config import build_model

    monkeypatch.setenv("VFMTOK_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    tokenizer = build_model(ROOT / "configs" / "tokenizer" / "vfmtok-tiny.yaml")
    report = reconstruction_metrics(tokenizer, str(SAMPLES), tmp_path / "recon", batch_size=8, eval_size=64, limit=12,
                                    inception_weights=str(WEIGHTS))
    saved = json.loads((tmp_path / "recon" / "report.json").read_text())
    assert saved["num_images"] == report["num_images"] == 12
    assert np.isfinite(saved["rfid"]) and saved["rfid"] > 0
    assert 0 < saved["psnr"] < 40 and -1 <= saved["ssim"] <= 1
    (codebook,) = saved["codebooks"]
    assert 0 < codebook["usage"] <= 1 and 1 <= codebook["perplexity"] <= 512
    assert "data_range 1.0" in saved["protocol"]["pixel_range"] and saved["protocol"]["uint8_conversion"] == "round"
    assert (tmp_path / "recon" / "reconstructions.png").is_file()
    assert saved["lpips"] is not None or "lpips_unavailable" in saved


@pytest.fixture(scope="module")
def tiny_ar_pipeline(tmp_path_factory):
    from vfmtok.pipelines import VFMTokARPipeline
    from vfmtok.pipelines.config import build_model

    torch.manual_seed(0)
    gpt = build_model(ROOT / "configs" / "ar" / "gpt-tiny.yaml").eval()
    with torch.no_grad():  # the head starts at zero (uniform logits): make guidance change the samples
        gpt.head.weight.normal_(0, 0.5)
    pipe = VFMTokARPipeline(build_model(ROOT / "configs" / "tokenizer" / "vfmtok-tiny.yaml").eval(), gpt)
    path = tmp_path_factory.mktemp("bench") / "pipe"
    pipe.save_pretrained(path)
    return path


@needs_shared
def test_benchmark_reports_every_setting_with_its_protocol_and_resumes_without_regenerating(
        extractor, halves, tiny_ar_pipeline, tmp_path):
    from vfmtok.evaluation.benchmark import run_benchmark

    out = tmp_path / "bench"
    kwargs = dict(num_samples=8, guidance_scales=[1.0, 3.0], reference=str(halves[1]), labels="balanced", seed=5,
                  batch_size=4, shard_size=3, output_size=64, inception_weights=str(WEIGHTS),
                  sampler_options={"top_k": 50})
    first = run_benchmark(str(tiny_ar_pipeline), out, **kwargs)
    assert [r["setting"] for r in first["settings"]] == ["cfg-1", "cfg-3"]
    for row in first["settings"]:
        assert np.isfinite(row["fid"]) and row["num_samples"] == 8 and row["num_reference"] == 32
        protocol = row["protocol"]
        for key in ("num_samples", "labels", "seed", "guidance_scale", "guided_channels", "sampler_options",
                    "resolution", "uint8_conversion", "reference", "reference_sha256", "extractor_sha256",
                    "package_versions", "reference_statistics"):
            assert key in protocol, key
        assert protocol["sampler_options"]["top_k"] == 50 and protocol["labels"] == "balanced"
        assert row["inception_score"] is None and "classification layer" in row["inception_score_unavailable"]
        assert "wall_seconds" in row["generation"]
    assert first["settings"][0]["fid"] != first["settings"][1]["fid"]  # guidance changes the samples
    assert (out / "report.md").read_text().count("| cfg-") == 2 and (out / "samples.png").is_file()
    assert json.loads((out / "report.json").read_text())["settings"][1]["guidance_scale"] == 3.0

    shards = sorted((out / "samples" / "cfg-3").glob("shard-*.npz"))
    assert len(shards) == 3  # 8 samples in shards of 3
    kept = {p: p.stat().st_mtime_ns for p in shards}
    shards[0].unlink()  # a shard an interrupted run never wrote
    record = shards[1].with_suffix(".json")
    record.write_text(record.read_text().replace('"sha256": "', '"sha256": "0'))  # a shard whose content is wrong
    second = run_benchmark(str(tiny_ar_pipeline), out, **kwargs, update_model_card=True)
    assert shards[2].stat().st_mtime_ns == kept[shards[2]]  # a finished, intact shard is not generated again
    assert shards[1].stat().st_mtime_ns != kept[shards[1]] and shards[0].is_file()
    for a, b in zip(first["settings"], second["settings"]):
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-9)  # regenerated shards are the same images
    card = (tiny_ar_pipeline / "README.md").read_text()
    assert "gFID (cfg-3)" in card and "8 samples, balanced labels" in card and "Not evaluated" not in card
    from vfmtok.pipelines import load_pipeline

    recorded = load_pipeline(str(tiny_ar_pipeline)).config.evaluation
    assert recorded["gFID (cfg-1)"] == round(second["settings"][0]["fid"], 4)


@needs_shared
def test_a_labelled_dataset_folder_is_a_reference_of_centre_crops(tmp_path):
    from PIL import Image

    from test_trainer import small_image_folder

    folder = small_image_folder(tmp_path / "data", 6)
    Image.open(next(folder.glob("*.jpg"))).resize((300, 260)).save(folder / "odd.png")  # another size: centre-cropped
    (folder / "labels.csv").write_text((folder / "labels.csv").read_text() + "odd.png,0\n")
    source = load_source(folder, dataset_size=128)
    assert source.kind == "dataset" and source.num_images == 7
    batch = next(source.batches(7))
    assert batch.shape == (7, 3, 128, 128) and batch.dtype == torch.uint8
    assert load_source(folder, dataset_size=128).content_hash == source.content_hash
    assert load_source(folder, dataset_size=64).content_hash != source.content_hash


@needs_shared
def test_benchmark_shards_across_processes_and_gives_the_single_process_images(extractor, halves, tiny_ar_pipeline,
                                                                                tmp_path):
    import subprocess
    import sys

    from vfmtok.evaluation.benchmark import run_benchmark

    settings = dict(num_samples=8, guidance_scales=[2.0], reference=str(halves[1]), seed=1, batch_size=2,
                    shard_size=2, output_size=64, inception_weights=str(WEIGHTS))
    single = run_benchmark(str(tiny_ar_pipeline), tmp_path / "one", **settings)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29533", "-m", "vfmtok", "benchmark", "--pipeline",
               str(tiny_ar_pipeline), "--num-samples", "8", "--guidance-scales", "2.0", "--reference", str(halves[1]),
               "--seed", "1", "--batch-size", "2", "--shard-size", "2", "--output-size", "64",
               "--inception-weights", str(WEIGHTS), "--output-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    # the same images; the Inception of another process (other thread count) agrees to float rounding
    assert two["settings"][0]["fid"] == pytest.approx(single["settings"][0]["fid"], rel=1e-6)
    for shard in range(4):  # every shard, whichever process made it, holds the single-process images
        name = f"samples/cfg-2/shard-{shard:05d}.npz"
        with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "two" / name) as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
