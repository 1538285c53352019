"""``vfmtok benchmark``: gFID with and without classifier-free guidance in one run, with the protocol written next to
every number.

For each guidance scale the pipeline generates ``num_samples`` images in shards of ``shard_size`` (shard ``i`` goes to
process ``i mod world_size`` under ``accelerate launch``, on one machine or many). Labels are drawn once for the run
(``random``: uniform over the classes; ``balanced``: the same count per class, shuffled) and each shard samples with
its own generator seeded from (seed, guidance scale, shard), so the images do not depend on the number of processes.
A shard is written atomically as ``shard-NNNNN.npz`` (uint8 images, labels) beside a ``.json`` that records the run
settings (the pipeline's weights fingerprint included) and the sha256 of its images; a restarted run keeps every shard whose record matches (settings and
content) and generates only the others. The main process then computes FID, sFID, precision / recall and (where the
Inception weights allow) IS against the reference, and writes ``report.json``, ``report.md`` and ``samples.png``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vfmtok.tokenizer.utils.atomic import atomic_file, make_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.loading import read_npz
from vfmtok.evaluation.fid import ImageSource, InceptionFeatures, check_sample_counts, compare_sources, load_source
from vfmtok.evaluation.inception_weights import resolve_inception_weights

__all__ = ["run_benchmark", "benchmark_labels", "card_results", "LABEL_MODES"]

LABEL_MODES = ("random", "balanced")
MAX_SAMPLES = 10 ** 7  # per guidance setting; the labels of the run are held in memory
_GUIDANCE_CHANNELS = "all latent channels (flow) / all logits (AR)"


def benchmark_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """The class label of every sample of the run (int64), from ``seed`` only."""
    if mode not in LABEL_MODES:
        raise InvalidValueError(f"labels must be one of {LABEL_MODES}, got {mode!r}")
    rng = np.random.default_rng(seed)
    if mode == "random":
        return rng.integers(0, num_classes, num_samples)
    return rng.permutation(np.arange(num_samples) % num_classes)


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _checked_shard(path: Path, settings_hash: str, count: int) -> Optional[np.ndarray]:
    """The shard's images when its record names these settings and its images are what the record says; else None
    (missing, truncated, foreign or from other settings: generate it again)."""
    record_path = path.with_suffix(".json")
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
        images = read_npz(path, "shard")["arr_0"]
        complete = (isinstance(record, dict) and record.get("settings") == settings_hash
                    and len(images) == count == record.get("count")
                    and hashlib.sha256(images.tobytes()).hexdigest() == record.get("sha256"))
    except (OSError, ValueError, KeyError, TypeError):  # InvalidValueError included: an unreadable shard
        return None
    return images if complete else None


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, settings_hash: str) -> None:
    with atomic_file(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, arr_0=images, labels=labels)
    record = {"settings": settings_hash, "count": len(images), "sha256": hashlib.sha256(images.tobytes()).hexdigest()}
    with atomic_file(path.with_suffix(".json")) as temporary:
        temporary.write_text(json.dumps(record))


def _generate_shard(pipe, labels: np.ndarray, guidance_scale: float, seed: int, batch_size: int, output_size: int,
                    options: dict[str, Any]) -> np.ndarray:
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(torch.from_numpy(labels), guidance_scale=guidance_scale, generator=generator, output_type="np",
                  output_size=output_size, batch_size=batch_size, **options).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)  # rounded, not truncated


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in ("vfmtok", "torch", "diffusers", "transformers", "torch-fidelity", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _protocol(pipe, settings: dict[str, Any], reference: ImageSource, extractor: InceptionFeatures) -> dict[str, Any]:
    tokenizer = getattr(pipe, pipe._image_tokenizer_name)
    kind = type(pipe).__name__
    protocol = {
        "pipeline": kind, "weights_sha256": settings["weights"], "num_samples": settings["num_samples"],
        "labels": settings["labels"],
        "seed": settings["seed"], "guidance_scale": settings["guidance_scale"],
        "guided_channels": _GUIDANCE_CHANNELS, "sampler_options": settings["options"],
        "resolution": f"generated at {tokenizer.output_size}, resized to {settings['output_size']} by the tokenizer's "
                      f"decode ({_resize_kind(pipe)})" if tokenizer.output_size != settings["output_size"]
        else f"generated at {settings['output_size']}",
        "uint8_conversion": "round(clip(x, 0, 1) * 255)",
        "reference": str(reference.path), "reference_sha256": reference.content_hash,
        "reference_statistics": "precomputed in the reference file" if "pool" in reference.statistics
        else "computed from the reference images",
        "extractor": "torch-fidelity inception-v3-compat", "extractor_sha256": extractor.sha256,
        "package_versions": _package_versions(),
    }
    if kind == "VFMTokARPipeline":
        # every option the samples were drawn with: the pipeline's (or its generator family's) defaults, then those
        # given (a RAR pipeline's power-cosine guidance is recorded as such)
        protocol["sampler_options"] = {**pipe.sampler_defaults(), **settings["options"]}
    else:
        options = settings["options"]  # steps, scheduler, shift and end of the grid the samples were drawn with
        defaults = pipe.describe_sampling(options.get("sampler"), options.get("num_inference_steps"))
        defaults.pop("guidance_interval", None)  # recorded as given (options) or not at all
        protocol["sampler_options"] = {**defaults, **options}
    return protocol


def _resize_kind(pipe) -> str:
    """How the pipeline resizes its images (saved with it: a converted VFMTok release resizes as its evaluation)."""
    return "bicubic, antialiased" if pipe.config.get("resize_antialias", True) else \
        "bicubic F.interpolate without antialiasing, as the release's evaluation"


def run_benchmark(pipeline: str, output_dir: str | Path, num_samples: int, guidance_scales: Sequence[float],
                  reference: str, labels: str = "random", seed: int = 0, batch_size: int = 32,
                  shard_size: int = 1000, output_size: int = 256, inception_weights: Optional[str] = None,
                  sampler_options: Optional[dict[str, Any]] = None, device: Optional[str] = None,
                  update_model_card: bool = False) -> dict[str, Any]:
    """Generate, shard by shard (resumable, sharded across processes), and evaluate every guidance setting; returns
    the report (on the main process; other processes return an empty dict). ``update_model_card``: record the
    results in the (local) pipeline folder's ``model_index.json`` and model card."""
    from accelerate import PartialState

    from vfmtok.pipelines.pipeline_common import load_pipeline

    if num_samples > MAX_SAMPLES:
        raise InvalidValueError(f"num_samples {num_samples} is more than this benchmark takes ({MAX_SAMPLES}; ADM "
                                "uses 50000)")
    if num_samples < 2 or shard_size < 1 or batch_size < 1:
        raise InvalidValueError(f"num_samples must be >= 2, shard_size and batch_size >= 1; got {num_samples}, "
                                f"{shard_size}, {batch_size}")
    scales = [float(s) for s in guidance_scales]
    if not scales or any(not np.isfinite(s) or s < 0 for s in scales):
        raise InvalidValueError(f"guidance scales must be finite numbers >= 0, got {list(guidance_scales)}")
    state = PartialState()
    output_dir = make_directory(output_dir)
    reference_source = load_source(reference)  # checked before any sample is generated
    check_sample_counts(num_samples, reference_source, bool(resolve_inception_weights(inception_weights).has_fc))
    pipe = load_pipeline(pipeline)
    options = dict(sampler_options or {})
    pipe.check_sampler_options(options)
    weights = pipe.weights_fingerprint()  # a shard made by other weights at the same path is generated again
    pipe.to(device or state.device)
    pipe.set_progress_bar_config(disable=True)
    num_classes = getattr(pipe, "transformer").config.num_classes
    all_labels = benchmark_labels(num_samples, num_classes, labels, seed)
    runs = []
    for scale in scales:
        settings = {"pipeline": str(pipeline), "weights": weights, "num_samples": num_samples, "labels": labels,
                    "seed": seed, "guidance_scale": scale, "output_size": output_size, "options": options,
                    "shard_size": shard_size}
        settings_hash = _settings_hash(settings)
        folder = output_dir / "samples" / f"cfg-{scale:g}"
        make_directory(folder)
        starts = list(range(0, num_samples, shard_size))
        start_time, generated = time.perf_counter(), 0
        for shard, start in enumerate(starts):
            if shard % state.num_processes != state.process_index:
                continue
            path = folder / f"shard-{shard:05d}.npz"
            shard_labels = all_labels[start:start + shard_size]
            if _checked_shard(path, settings_hash, len(shard_labels)) is not None:
                continue
            shard_seed = int.from_bytes(hashlib.sha256(f"{seed}/{scale}/{shard}".encode()).digest()[:8], "little")
            images = _generate_shard(pipe, shard_labels, scale, shard_seed, batch_size, output_size, options)
            _write_shard(path, images, shard_labels, settings_hash)
            generated += len(images)
        runs.append((scale, settings, settings_hash, folder, len(starts), generated,
                     time.perf_counter() - start_time))
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    extractor = InceptionFeatures(inception_weights, device=state.device)
    results = []
    for scale, settings, settings_hash, folder, num_shards, generated, seconds in runs:
        paths = [folder / f"shard-{i:05d}.npz" for i in range(num_shards)]
        arrays = [_checked_shard(p, settings_hash, len(all_labels[i * shard_size:(i + 1) * shard_size]))
                  for i, p in enumerate(paths)]  # each shard read and verified once
        missing = [str(p) for p, images in zip(paths, arrays) if images is None]
        if missing:
            raise InvalidValueError(f"shards missing or corrupt after generation: {missing[:5]}")
        digest = hashlib.sha256(b"".join(hashlib.sha256(a.tobytes()).digest() for a in arrays)).hexdigest()
        samples = ImageSource(folder, "npz", array=np.concatenate(arrays), content_hash=digest)
        metrics = compare_sources(samples, reference_source, extractor, batch_size=50)
        results.append({"setting": f"cfg-{scale:g}", "guidance_scale": scale, **metrics,
                        "protocol": _protocol(pipe, settings, reference_source, extractor),
                        "generation": {"generated_by_main_process_now": generated, "wall_seconds": seconds,
                                       "images_per_s": generated / seconds if generated else None}})
    report = {"pipeline": str(pipeline), "settings": results}
    _write_reports(report, output_dir, [r["setting"] for r in results])
    if update_model_card:
        if not Path(pipeline).is_dir():
            raise InvalidValueError(f"--update-model-card needs a local pipeline folder, got {pipeline!r}")
        pipe.record_evaluation(card_results(report), pipeline)
    return report


def card_results(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a benchmark report for a model card, with a one-line protocol."""
    results: dict[str, Any] = {}
    for row in report["settings"]:
        results[f"gFID ({row['setting']})"] = round(row["fid"], 4)
        for key in ("sfid", "precision", "recall", "inception_score"):
            if row.get(key) is not None:
                results[f"{key} ({row['setting']})"] = round(row[key], 4)
    p = report["settings"][0]["protocol"]
    results["protocol"] = (f"{p['num_samples']} samples, {p['labels']} labels, seed {p['seed']}, sampler "
                           f"{json.dumps(p['sampler_options'])}, {p['resolution']}, uint8 by rounding, reference "
                           f"{Path(str(p['reference'])).name} (sha256 {p['reference_sha256'][:16]}), torch-fidelity Inception "
                           f"(sha256 {p['extractor_sha256'][:16]})")
    return results


def _write_reports(report: dict[str, Any], output_dir: Path, settings: list[str]) -> None:
    from PIL import Image

    with atomic_file(output_dir / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1, default=str))
    rows = ["| setting | guidance | FID | sFID | precision | recall | IS | samples | reference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    for r in report["settings"]:
        rows.append(f"| {r['setting']} | {r['guidance_scale']:g} | {fmt(r['fid'])} | {fmt(r['sfid'])} | "
                    f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['inception_score'])} | {r['num_samples']} "
                    f"| {r['protocol']['reference']} |")
    notes = sorted({w for r in report["settings"] for w in r["warnings"]} |
                   {r.get("inception_score_unavailable") for r in report["settings"]} - {None})
    protocol = {k: v for k, v in report["settings"][0]["protocol"].items() if k != "guidance_scale"}
    text = (f"# Benchmark of {report['pipeline']}\n\n" + "\n".join(rows) + "\n\n## Protocol\n\n```json\n"
            + json.dumps(protocol, indent=1) + "\n```\n" + ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes)
                                                            if notes else ""))
    with atomic_file(output_dir / "report.md") as temporary:
        temporary.write_text(text + "\n")
    grid_rows = []
    for name in settings:
        with np.load(output_dir / "samples" / name / "shard-00000.npz", allow_pickle=False) as data:
            images = data["arr_0"][:8]
        grid_rows.append(np.concatenate(list(images), axis=1))
    width = max(r.shape[1] for r in grid_rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in grid_rows])
    with atomic_file(output_dir / "samples.png") as temporary:
        Image.fromarray(grid).save(temporary, format="PNG")
