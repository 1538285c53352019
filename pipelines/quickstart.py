"""``vfmtok quickstart``: the whole two-stage suite, end to end, offline, on a CPU in about ten minutes.

Stages (each recorded in ``O/stages/<name>.json`` when it finishes, so a rerun skips it; ``--force`` redoes all):

1. ``data``: the default data are the 1797 handwritten digits that ship inside scikit-learn (8 x 8, 17 grey levels,
   BSD licence), upscaled to 32 px RGB and saved as a ``datasets`` folder with the class names ``zero`` ... ``nine``
   (``--data`` takes anything the trainer accepts instead). A balanced subset, centre-cropped to 32 px, is written as
   the FID reference folder.
2. ``tokenizer-vq`` / ``tokenizer-ae``: a discrete (VFMTok) and a continuous (VFMAE) tokenizer, trained with the
   shared trainer (``configs/quickstart/tokenizer-*.yaml``). The frozen VFM is a pretrained one when ``--vfm`` names
   it (a preset of :data:`tokenizer.vfm.VFM_PRESETS`, a Hub id or a local ``save_pretrained`` folder of a DINOv2),
   otherwise a small randomly initialised one, and the output and report say which.
3. ``extract-codes`` / ``extract-latents``: every image encoded once (``vfmtok extract``; no mirrored views).
4. ``train-ar`` / ``train-flow``: the GPT over the codes and the flow denoiser over the latents.
5. ``pipelines``: both saved with ``save_pretrained`` under ``O/pipelines/ar`` and ``O/pipelines/flow``.
6. ``samples``: both loaded back with ``from_pretrained``; grids of ``pipe(class_ids)`` with and without CFG.
7. ``recon-vq`` / ``recon-ae``: PSNR, SSIM, rFID and codebook usage of the tokenizers.
8. ``benchmark-ar`` / ``benchmark-flow``: gFID with and without CFG against the reference (``vfmtok benchmark``).

Training stages interrupted part-way resume from their last checkpoint (exactly, like ``--resume``); the other stages
write their outputs atomically and are redone. Everything is deterministic for a fixed ``--seed`` on CPU.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

from vfmtok.pipelines.config import shipped_configs
from vfmtok.tokenizer.utils.atomic import atomic_directory, atomic_file
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError, OutputExistsError, WeightsUnavailableError

__all__ = ["QuickstartBudget", "FULL", "FAST", "run_quickstart", "digits_dataset", "quickstart_vfm_spec",
           "DIGIT_NAMES"]

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONFIG_DIR = shipped_configs() / "quickstart"
IMAGE_SIZE = 32  # the quickstart tokenizers' input and output size (configs/quickstart/tokenizer-*.yaml)
GRID_CELL = 64  # pixels per image in the sample grids (upscaled, so that captions fit)
_FORMAT = 1  # of quickstart.json; a different format is a different run


@dataclasses.dataclass(frozen=True)
class QuickstartBudget:
    """How much work each stage does."""

    images_per_class: Optional[int]  # training images per class (None: all)
    tokenizer_steps: int
    ar_steps: int
    flow_steps: int
    reference_images: int  # FID reference images (balanced over the classes, at least one per class)
    gfid_samples: int  # generated images per guidance setting, for gFID (balanced labels)
    recon_images: int  # images for the reconstruction metrics
    grid_per_class: int  # images per class in the sample grids
    flow_inference_steps: int


FULL = QuickstartBudget(images_per_class=None, tokenizer_steps=300, ar_steps=1500, flow_steps=1500,
                        reference_images=300, gfid_samples=150, recon_images=100, grid_per_class=6,
                        flow_inference_steps=50)
FAST = QuickstartBudget(images_per_class=12, tokenizer_steps=6, ar_steps=20, flow_steps=20, reference_images=40,
                        gfid_samples=30, recon_images=16, grid_per_class=2, flow_inference_steps=8)


# -- data ------------------------------------------------------------------------------------------------------------
def digits_dataset(directory: str | Path, images_per_class: Optional[int] = None) -> Path:
    """scikit-learn's bundled handwritten digits as a ``datasets`` folder (``save_to_disk``): 32 px RGB PNGs, dark ink
    on white, bicubic-upscaled from 8 x 8, with ClassLabel names ``zero`` ... ``nine``."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.arange(len(digits.target))
    if images_per_class is not None:
        keep = np.concatenate([np.flatnonzero(digits.target == c)[:images_per_class] for c in range(10)])
        keep.sort()
    encoded = []
    for index in keep:
        ink = np.asarray(digits.images[index], dtype=np.float64) / 16.0  # 0..16 grey levels
        small = Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), mode="L")
        image = small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_NAMES))})
    dataset = datasets.Dataset.from_dict({"image": encoded, "label": [int(t) for t in digits.target[keep]]},
                                         features=features)
    with atomic_directory(directory, replace=True) as staging:
        dataset.save_to_disk(str(staging))
    return Path(directory)


def reference_images(data: str, directory: str | Path, per_class: int, size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Write the first ``per_class`` images of every class of ``data`` (ADM centre crop to ``size``) as PNGs: the FID
    reference of the benchmark."""
    from vfmtok.pipelines.data import adm_center_crop, decode_image, load_image_dataset

    dataset = load_image_dataset(data)
    labels = np.asarray(dataset["label"])
    chosen = [int(i) for c in np.unique(labels[labels >= 0]) for i in np.flatnonzero(labels == c)[:per_class]]
    with atomic_directory(directory, replace=True) as staging:
        for k, index in enumerate(chosen):
            adm_center_crop(decode_image(dataset[index]["image"]), size).convert("RGB").save(
                staging / f"{k:05d}.png", format="PNG")
    return {"reference_images": len(chosen), "per_class": per_class}


def data_summary(data: str) -> dict[str, Any]:
    """Number of images and classes of a labelled dataset, and its class names ({id: name})."""
    from vfmtok.pipelines.data import class_names, load_image_dataset
    from vfmtok.pipelines.pipeline_common import default_id2label

    dataset = load_image_dataset(data)
    labels = np.asarray(dataset["label"])
    if (labels < 0).any():
        raise InvalidValueError(f"{data!r}: the quickstart trains class-conditional generators, so every image needs "
                                f"a class label; {int((labels < 0).sum())} of {len(labels)} have none")
    num_classes = int(labels.max()) + 1
    names = class_names(dataset)
    id2label = ({str(i): name for i, name in enumerate(names)} if names is not None
                else default_id2label(num_classes))
    return {"num_images": len(labels), "num_classes": num_classes, "id2label": id2label}


# -- the VFM ---------------------------------------------------------------------------------------------------------
def quickstart_vfm_spec(source: Optional[str], image_size: int) -> tuple[Optional[dict[str, Any]], str]:
    """(the ``vfm`` entry of a quickstart tokenizer config, or None to keep its small random VFM; a sentence saying
    which VFM it is). ``source``: a VFM preset name, or a Hub id / local folder of a DINOv2 (or SigLIP) model, whose
    ``config.json`` gives the architecture; four evenly spaced layers feed the tokenizer."""
    from vfmtok.tokenizer.vfm import VFM_PRESETS

    if source is None:
        return None, ("a small randomly initialised VFM (no --vfm given): the pipeline is exercised end to end, but "
                      "features and samples are far from what a pretrained DINOv2 gives")
    if source in VFM_PRESETS:
        return {"preset": source, "image_size": image_size}, \
            f"the pretrained {source} preset ({VFM_PRESETS[source]['pretrained']})"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise WeightsUnavailableError(f"--vfm {source!r}: cannot read its config.json ({str(error).splitlines()[0]}); "
                                      f"give a local save_pretrained folder, a cached Hub id, or a preset "
                                      f"({', '.join(sorted(VFM_PRESETS))})") from error
    defaults = type(config)().to_dict()
    architecture = {k: v for k, v in config.to_dict().items() if k in defaults and k not in {
        "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "id2label", "label2id",
        "out_features", "out_indices", "stage_names", "output_hidden_states", "return_dict"} and v != defaults[k]}
    architecture["model_type"] = config.model_type
    depth = config.num_hidden_layers
    layers = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})
    patch = config.patch_size
    size = max(patch, round(image_size / patch) * patch)
    return {"backend": "hf", "architecture": architecture, "pretrained": str(source), "image_size": size,
            "feature_layers": layers}, f"the pretrained VFM {source} ({config.model_type}, {depth} layers)"


# -- stages ----------------------------------------------------------------------------------------------------------
class _Stages:
    """Runs named stages once: a finished stage leaves ``stages/<name>.json`` (its result and wall time)."""

    def __init__(self, root: Path, total: int):
        from tqdm.auto import tqdm

        self.root = root / "stages"
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []
        self.progress = tqdm(total=total, desc="quickstart", unit="stage", dynamic_ncols=True)

    def run(self, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        marker = self.root / f"{name}.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            self.seconds[name] = record["seconds"]
            self.skipped.append(name)
            logger.info("stage %s: done in an earlier run (%.1f s), skipped", name, record["seconds"])
        else:
            self.progress.set_postfix_str(name)
            logger.info("stage %s ...", name)
            start = time.perf_counter()
            result = work()
            record = {"result": result, "seconds": time.perf_counter() - start}
            self.seconds[name] = record["seconds"]
            with atomic_file(marker) as temporary:
                temporary.write_text(json.dumps(record, indent=1, default=str))
            logger.info("stage %s: %.1f s", name, record["seconds"])
        self.progress.update(1)
        return record["result"]


def _template(name: str) -> dict[str, Any]:
    """``configs/quickstart/<name>``, read."""
    source = CONFIG_DIR / name
    if not source.is_file():
        raise MissingFileError(f"the quickstart's config {str(source)!r} is missing: the quickstart runs from a "
                               f"checkout of the repository (pip install -e .)")
    return yaml.safe_load(source.read_text())


def _write_config(template: str, output: Path, params: dict[str, Any], training: dict[str, Any]) -> Path:
    """``configs/quickstart/<template>`` with ``params`` and ``training`` values replaced, as ``output``."""
    config = _template(template)
    config["params"].update(params)
    config["training"].update(training)
    with atomic_file(output) as temporary:
        temporary.write_text(f"# Written by `vfmtok quickstart` from configs/quickstart/{template}.\n"
                             + yaml.safe_dump(config, sort_keys=False))
    return output


def _options_record(data: Optional[str], vfm: Optional[str], seed: int, fast: bool) -> dict[str, Any]:
    return {"format": _FORMAT, "data": data, "vfm": vfm, "seed": seed, "fast": fast}


def _prepare_output(output: Path, options: dict[str, Any], force: bool) -> None:
    """Refuse to mix runs: an output directory made with other options needs ``--force`` (which clears it)."""
    record = output / "quickstart.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if force:
            for child in output.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif previous != options:
            different = sorted(k for k in set(previous) | set(options) if previous.get(k) != options.get(k))
            raise OutputExistsError(
                f"{str(output)!r} holds a quickstart run with other options ("
                + ", ".join(f"{k}: {previous.get(k)!r} there, {options.get(k)!r} now" for k in different)
                + "); pass --force to redo it there or choose another --output-dir")
    elif output.is_dir() and any(output.iterdir()):
        raise OutputExistsError(f"{str(output)!r} is not empty and holds no quickstart run; choose another "
                                f"--output-dir")
    output.mkdir(parents=True, exist_ok=True)
    with atomic_file(record) as temporary:
        temporary.write_text(json.dumps(options, indent=1))


def _inception_or_reason(inception_weights: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(the FID Inception weights to use, or None with the reason none can be had)."""
    from vfmtok.evaluation.inception_weights import resolve_inception_weights

    try:
        resolve_inception_weights(inception_weights)
    except WeightsUnavailableError as error:
        return None, str(error).splitlines()[0]
    return inception_weights, None


def _sample_grids(pipe, kind: str, classes: list[int], names: dict[int, str], per_class: int, guidance: float,
                  seed: int, output: Path, options: dict[str, Any]) -> dict[str, str]:
    """Grids (one row per class, captioned) of ``pipe(class_ids)`` without CFG and with CFG ``guidance``."""
    from PIL import Image

    from vfmtok.pipelines.pipeline_common import captioned_image_grid

    written = {}
    for label, scale in (("without_cfg", 1.0), ("with_cfg", guidance)):
        images = pipe(classes, guidance_scale=scale, num_images_per_class=per_class,
                      generator=torch.Generator().manual_seed(seed), output_type="pil", **options).images
        images = [image.resize((GRID_CELL, GRID_CELL), Image.Resampling.BICUBIC) for image in images]
        captions = [f"{names.get(c, c)}" for c in classes for _ in range(per_class)]
        path = output / f"samples_{kind}_{label}.png"
        with atomic_file(path) as temporary:
            captioned_image_grid(images, captions, columns=per_class).save(temporary, format="PNG")
        written[label] = path.name
    return written


def _grid_classes(num_classes: int, count: int = 10) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, num_classes - 1, min(count, num_classes))})


@dataclasses.dataclass
class _Run:
    """What every stage of one quickstart run needs."""

    output: Path
    stages: _Stages
    budget: QuickstartBudget
    seed: int
    data_dir: str

    def config(self, template: str, params: dict[str, Any], max_steps: int) -> Path:
        """``configs/quickstart/<template>`` with ``params``, this run's seed and ``max_steps``, under ``configs/``."""
        return _write_config(template, self.output / "configs" / template, params,
                             {"max_steps": max_steps, "seed": self.seed})


def run_quickstart(output_dir: str | Path = "quickstart", data: Optional[str] = None, vfm: Optional[str] = None,
                   seed: int = 0, fast: bool = False, force: bool = False,
                   inception_weights: Optional[str] = None) -> dict[str, Any]:
    """Run every stage (see the module docstring) into ``output_dir`` and return the report (also written as
    ``report.json`` and ``report.md``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidValueError(f"--seed must be an integer >= 0, got {seed!r}")
    budget = FAST if fast else FULL
    output = Path(output_dir)
    _prepare_output(output, _options_record(data, vfm, seed, fast), force)
    started = time.perf_counter()
    run = _Run(output, _Stages(output, total=14), budget, seed,
               str(output / "data" / "digits") if data is None else data)
    info = _data_stage(run, generate_digits=data is None)
    tokenizers, vfm_note = _tokenizer_stages(run, vfm)
    codes, latents = _extraction_stages(run, tokenizers)
    generators, guidance = _generator_stages(run, info["num_classes"], codes, latents)
    pipelines_dir = _pipeline_stage(run, tokenizers, generators, info["id2label"])
    flow_sampling = {"num_inference_steps": budget.flow_inference_steps}
    grids = _sample_stages(run, pipelines_dir, info, guidance, flow_sampling)
    recon, bench, no_inception = _evaluation_stages(run, tokenizers, pipelines_dir, guidance, flow_sampling,
                                                    inception_weights)
    run.stages.progress.close()
    return _report(output, info, vfm, vfm_note, tokenizers, recon, bench, grids, no_inception, guidance, run.stages,
                   time.perf_counter() - started, seed, fast, budget, data)


def _data_stage(run: _Run, generate_digits: bool) -> dict[str, Any]:
    """1. The training data (the digits unless ``--data`` named some) and the FID reference images."""

    def prepare_data() -> dict[str, Any]:
        if generate_digits:
            digits_dataset(run.data_dir, run.budget.images_per_class)
        summary = data_summary(run.data_dir)
        per_class = max(1, run.budget.reference_images // summary["num_classes"])
        summary.update(reference_images(run.data_dir, run.output / "data" / "reference", per_class))
        return summary

    info = run.stages.run("data", prepare_data)
    info["id2label"] = {str(k): v for k, v in info["id2label"].items()}
    return info


def _tokenizer_stages(run: _Run, vfm: Optional[str]) -> tuple[dict[str, Path], str]:
    """2. The discrete and the continuous tokenizer: their exported folders, and which VFM they use."""
    from vfmtok.pipelines.train.tokenizer import train_tokenizer

    tokenizers: dict[str, Path] = {}
    vfm_notes = {}
    for kind, template in (("vq", "tokenizer-vq.yaml"), ("ae", "tokenizer-ae.yaml")):
        spec, vfm_notes[kind] = quickstart_vfm_spec(vfm, _template(template)["params"]["vfm"]["image_size"])
        config = run.config(template, {} if spec is None else {"vfm": spec}, run.budget.tokenizer_steps)
        run_dir = run.output / "runs" / f"tokenizer-{kind}"
        run.stages.run(f"tokenizer-{kind}", lambda config=config, run_dir=run_dir: {
            "exported": str(train_tokenizer(config, run.data_dir, run_dir, resume=True))})
        tokenizers[kind] = run_dir / "tokenizer"
    logger.info("VFM: %s", vfm_notes["vq"])
    return tokenizers, vfm_notes["vq"]


def _extraction_stages(run: _Run, tokenizers: dict[str, Path]) -> tuple[Path, Path]:
    """3. Every image encoded once: the codes folder and the latents folder (with its statistics)."""
    from vfmtok.pipelines.train.extract import extract_tokens, load_tokenizer
    from vfmtok.pipelines.train.flow import write_latent_statistics

    def extract(kind: str, target: Path) -> dict[str, Any]:
        # an interrupted extraction left only a staging directory, which extract_tokens removes; a finished one
        # whose statistics were not written yet is removed here
        shutil.rmtree(target, ignore_errors=True)
        extract_tokens(load_tokenizer(str(tokenizers[kind])), run.data_dir, target, batch_size=64, num_workers=0,
                       flip=False)
        if kind == "ae":
            write_latent_statistics(target)
        return {"path": str(target), "shape": json.loads((target / "meta.json").read_text())["shape"]}

    codes, latents = run.output / "codes", run.output / "latents"
    for kind, name, target in (("vq", "extract-codes", codes), ("ae", "extract-latents", latents)):
        run.stages.run(name, lambda kind=kind, target=target: extract(kind, target))
    return codes, latents


def _generator_stages(run: _Run, num_classes: int, codes: Path, latents: Path
                      ) -> tuple[dict[str, Path], dict[str, float]]:
    """4. The GPT over the codes and the flow denoiser over the latents: their run folders and their configs'
    sampling CFG scales."""
    from vfmtok.pipelines.train.ar import train_ar
    from vfmtok.pipelines.train.flow import train_flow

    options = {"num_classes": num_classes}
    ar_config = run.config("ar.yaml", options, run.budget.ar_steps)
    flow_config = run.config("flow.yaml", options, run.budget.flow_steps)
    runs = {"ar": run.output / "runs" / "ar", "flow": run.output / "runs" / "flow"}
    run.stages.run("train-ar", lambda: {
        "exported": str(train_ar(ar_config, runs["ar"], codes=str(codes), resume=True))})
    run.stages.run("train-flow", lambda: {
        "exported": str(train_flow(flow_config, runs["flow"], latents=str(latents), resume=True))})
    guidance = {kind: float(yaml.safe_load(config.read_text())["sampling"]["guidance_scale"])
                for kind, config in (("ar", ar_config), ("flow", flow_config))}
    return runs, guidance


def _pipeline_stage(run: _Run, tokenizers: dict[str, Path], generators: dict[str, Path],
                    id2label: dict[str, str]) -> dict[str, Path]:
    """5. Both pipelines saved with ``save_pretrained``: their folders."""
    pipelines_dir = {"ar": run.output / "pipelines" / "ar", "flow": run.output / "pipelines" / "flow"}

    def save_pipelines() -> dict[str, Any]:
        from vfmtok.generators import DiTModel, GPTModel
        from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline
        from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline
        from vfmtok.pipelines.train.extract import load_tokenizer

        ar = VFMTokARPipeline(load_tokenizer(str(tokenizers["vq"])),
                              GPTModel.from_pretrained(generators["ar"] / "generator"), id2label=id2label)
        flow = VFMTokFlowPipeline(load_tokenizer(str(tokenizers["ae"])),
                                  DiTModel.from_pretrained(generators["flow"] / "generator"), None, id2label=id2label)
        for pipe, target in ((ar, pipelines_dir["ar"]), (flow, pipelines_dir["flow"])):
            with atomic_directory(target, replace=True) as staging:
                pipe.save_pretrained(staging)
        return {k: str(v) for k, v in pipelines_dir.items()}

    run.stages.run("pipelines", save_pipelines)
    return pipelines_dir


def _sample_stages(run: _Run, pipelines_dir: dict[str, Path], info: dict[str, Any], guidance: dict[str, float],
                   flow_sampling: dict[str, Any]) -> dict[str, dict[str, str]]:
    """6. Sample grids from both pipelines loaded back with ``from_pretrained``, without and with CFG."""
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline
    from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline

    classes = _grid_classes(info["num_classes"])
    names = {int(k): v for k, v in info["id2label"].items()}

    def sample(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        pipe = (VFMTokARPipeline if kind == "ar" else VFMTokFlowPipeline).from_pretrained(pipelines_dir[kind])
        pipe.set_progress_bar_config(disable=True)
        return _sample_grids(pipe, kind, classes, names, run.budget.grid_per_class, guidance[kind], run.seed,
                             run.output, options)

    return {"ar": run.stages.run("samples-ar", lambda: sample("ar", {})),
            "flow": run.stages.run("samples-flow", lambda: sample("flow", flow_sampling))}


def _evaluation_stages(run: _Run, tokenizers: dict[str, Path], pipelines_dir: dict[str, Path],
                       guidance: dict[str, float], flow_sampling: dict[str, Any], inception_weights: Optional[str]
                       ) -> tuple[dict[str, Any], dict[str, Any], Optional[str]]:
    """7. Tokenizer metrics and 8. gFID with and without CFG; both None per kind (with the reason) when no FID
    Inception weights can be had."""
    from vfmtok.evaluation.benchmark import run_benchmark
    from vfmtok.evaluation.recon import reconstruction_metrics
    from vfmtok.pipelines.train.extract import load_tokenizer

    weights, no_inception = _inception_or_reason(inception_weights)
    recon: dict[str, Any] = {}
    bench: dict[str, Any] = {}
    if no_inception:
        run.stages.progress.update(4)
        return {"vq": None, "ae": None}, {"ar": None, "flow": None}, no_inception
    for kind in ("vq", "ae"):
        recon[kind] = run.stages.run(f"recon-{kind}", lambda kind=kind: _recon_summary(reconstruction_metrics(
            load_tokenizer(str(tokenizers[kind])), run.data_dir, run.output / "eval" / f"recon-{kind}",
            batch_size=32, eval_size=IMAGE_SIZE, limit=run.budget.recon_images, inception_weights=weights,
            lpips=False)))  # LPIPS would download VGG16 weights (528 MB); the quickstart stays offline
    for kind, options in (("ar", {}), ("flow", flow_sampling)):
        bench[kind] = run.stages.run(f"benchmark-{kind}", lambda kind=kind, options=options: run_benchmark(
            str(pipelines_dir[kind]), run.output / "eval" / f"benchmark-{kind}", run.budget.gfid_samples,
            [1.0, guidance[kind]], str(run.output / "data" / "reference"), labels="balanced", seed=run.seed,
            batch_size=64, output_size=IMAGE_SIZE, inception_weights=weights, sampler_options=options, device="cpu",
            update_model_card=True))
    return recon, bench, no_inception


def _recon_summary(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("psnr", "ssim", "rfid", "lpips", "lpips_unavailable", "num_images", "codebooks", "protocol", "warnings")
    return {k: report[k] for k in keep if k in report}


def _gfid_entry(bench: Optional[dict[str, Any]], guidance: float, pipeline: Path, grids: dict[str, str],
                no_inception: Optional[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"pipeline": str(pipeline), "guidance_scale": guidance, "sample_grids": grids}
    if bench is None:
        entry.update(gfid_with_cfg=None, gfid_without_cfg=None, gfid_unavailable=no_inception, protocol=None)
        return entry
    rows = {row["guidance_scale"]: row for row in bench["settings"]}
    with_cfg, without = rows[guidance], rows[1.0]
    protocol = {k: v for k, v in with_cfg["protocol"].items() if k != "guidance_scale"}
    entry.update(gfid_with_cfg=with_cfg["fid"], gfid_without_cfg=without["fid"],
                 precision_with_cfg=with_cfg["precision"], recall_with_cfg=with_cfg["recall"],
                 precision_without_cfg=without["precision"], recall_without_cfg=without["recall"],
                 cfg_lowers_gfid=bool(with_cfg["fid"] < without["fid"]), protocol=protocol,
                 warnings=sorted(set(with_cfg["warnings"]) | set(without["warnings"])))
    if not entry["cfg_lowers_gfid"]:
        entry["note"] = (f"gFID with CFG {guidance:g} ({with_cfg['fid']:.2f}) is not below gFID without it "
                         f"({without['fid']:.2f}) in this run")
    return entry


def _report(output: Path, info: dict[str, Any], vfm: Optional[str], vfm_note: str, tokenizers: dict[str, Path],
            recon: dict[str, Any], bench: dict[str, Any], grids: dict[str, Any], no_inception: Optional[str],
            guidance: dict[str, float], stages: _Stages, seconds: float, seed: int, fast: bool,
            budget: QuickstartBudget, data: Optional[str]) -> dict[str, Any]:
    import platform

    tokenizer_entries = {}
    for kind, name in (("vq", "discrete"), ("ae", "continuous")):
        entry: dict[str, Any] = {"path": str(tokenizers[kind]), "grid": f"eval/recon-{kind}/reconstructions.png"}
        if recon[kind] is None:
            entry.update(psnr=None, ssim=None, rfid=None, unavailable=no_inception)
        else:
            entry.update(recon[kind])
            if kind == "vq":
                entry["codebook_usage"] = recon[kind]["codebooks"][0]["usage"]
                entry["codebook_perplexity"] = recon[kind]["codebooks"][0]["perplexity"]
        tokenizer_entries[name] = entry
    report = {
        "tokenizers": tokenizer_entries,
        "ar": _gfid_entry(bench["ar"], guidance["ar"], output / "pipelines" / "ar", grids["ar"], no_inception),
        "flow": _gfid_entry(bench["flow"], guidance["flow"], output / "pipelines" / "flow", grids["flow"],
                            no_inception),
        "vfm": {"source": vfm, "pretrained": vfm is not None, "description": vfm_note},
        "data": {"source": data or f"scikit-learn handwritten digits (bundled, BSD licence), {IMAGE_SIZE} px",
                 "num_images": info["num_images"], "num_classes": info["num_classes"],
                 "reference_images": info["reference_images"]},
        "stages_seconds": {name: round(s, 1) for name, s in stages.seconds.items()},
        "stages_skipped": stages.skipped,
        "total_seconds": round(seconds, 1),
        "options": {"seed": seed, "fast": fast, "budget": dataclasses.asdict(budget)},
        "machine": {"torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
    }
    with atomic_file(output / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1, default=str))
    text = report_markdown(report)
    with atomic_file(output / "report.md") as temporary:
        temporary.write_text(text)
    print(text)
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report_markdown(report: dict[str, Any]) -> str:
    """The quickstart's report as Markdown tables."""
    tok = report["tokenizers"]
    lines = ["# vfmtok quickstart", "",
             f"VFM: {report['vfm']['description']}.", "",
             f"Data: {report['data']['source']}: {report['data']['num_images']} images, "
             f"{report['data']['num_classes']} classes; FID reference: {report['data']['reference_images']} of them.",
             "", "## Tokenizers", "",
             "| tokenizer | PSNR | SSIM | rFID | codebook usage | images |", "| --- | --- | --- | --- | --- | --- |"]
    for name, entry in tok.items():
        usage = entry.get("codebook_usage")
        lines.append(f"| {name} | {_fmt(entry.get('psnr'))} | {_fmt(entry.get('ssim'), 3)} | {_fmt(entry.get('rfid'))} "
                     f"| {'-' if usage is None else f'{usage:.1%}'} | {entry.get('num_images', 'n/a')} |")
    lines += ["", "## Generators", "",
              "| generator | gFID without CFG | gFID with CFG | CFG scale | CFG lowers gFID |",
              "| --- | --- | --- | --- | --- |"]
    for name in ("ar", "flow"):
        entry = report[name]
        lowers = entry.get("cfg_lowers_gfid")
        lines.append(f"| {name} | {_fmt(entry['gfid_without_cfg'])} | {_fmt(entry['gfid_with_cfg'])} | "
                     f"{entry['guidance_scale']:g} | {'n/a' if lowers is None else 'yes' if lowers else 'no'} |")
    protocol = report["ar"].get("protocol") or {}
    if protocol:
        lines += ["", f"gFID protocol: {protocol.get('num_samples')} samples per setting ({protocol.get('labels')} "
                      f"labels, seed {protocol.get('seed')}), {protocol.get('resolution')}, against "
                      f"{report['data']['reference_images']} reference images; FIDs from so few samples are "
                      f"biased upwards and comparable only with each other."]
    notes = [report[k]["note"] for k in ("ar", "flow") if report[k].get("note")]
    notes += [f"{k}: {report[k]['gfid_unavailable']}" for k in ("ar", "flow") if report[k].get("gfid_unavailable")]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name}{' (earlier run)' if name in report['stages_skipped'] else ''} | {s:.1f} |"
              for name, s in report["stages_seconds"].items()]
    lines += [f"| total (this run) | {report['total_seconds']:.1f} |", ""]
    return "\n".join(lines)
