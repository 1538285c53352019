"""``vfmtok quickstart``: the whole two-stage suite, end to end, offline, on a CPU in about ten minutes, with numbers
an outsider can check.

Stages (each recorded in ``O/stages/<name>.json`` when it finishes, so a rerun skips it; ``--force`` redoes all):

1. ``data``: the default data are the 1797 handwritten digits that ship inside scikit-learn (8 x 8, 17 grey levels,
   BSD licence), upscaled to 32 px RGB with the class names ``zero`` ... ``nine`` (``--data`` takes anything the
   trainer accepts instead). They are split once, stratified and seeded: about 300 images are **held out** and
   every metric is measured on them; the rest trains. The held-out images are the FID reference; a balanced
   sample of training images as large as each gFID sample is the **floor** (the FID real images reach).
2. ``tokenizer-vq`` / ``tokenizer-ae``: a discrete (VFMTok) and a continuous (VFMAE) tokenizer, trained with the
   shared trainer (``configs/quickstart/tokenizer-*.yaml``), side by side in two single-threaded processes. The
   frozen VFM is a pretrained one when ``--vfm`` names it (a preset of :data:`vfmtok.tokenizer.vfm.VFM_PRESETS`, a
   Hub id or a local ``save_pretrained`` folder of a DINOv2), otherwise a small randomly initialised one, and the
   output and report say which.
3. ``extract-codes`` / ``extract-latents``: every training image encoded once (``vfmtok extract``; no mirrored
   views).
4. ``train-ar`` / ``train-flow``: the GPT over the codes and the flow denoiser over the latents, side by side.
5. ``pipelines``: both saved with ``save_pretrained`` under ``O/pipelines/ar`` and ``O/pipelines/flow``.
6. ``judge``: an independent digit classifier (scikit-learn, on the training split's pixels at their native 8 x 8;
   :mod:`vfmtok.evaluation.judge`) and its held-out accuracy.
7. ``recon-vq`` / ``recon-ae``: PSNR, SSIM, rFID and codebook usage of the tokenizers on the held-out images.
8. ``floor``, ``benchmark-ar`` / ``benchmark-flow``: gFID and the judge's class accuracy of generated samples at every
   guidance scale of the sweep; the best scale by gFID becomes the saved pipeline's default; one plot per generator.
9. ``samples-ar`` / ``samples-flow``: both pipelines loaded back with ``from_pretrained``; sample grids without
   guidance and at the chosen scale.

Training stages interrupted part-way resume from their last checkpoint (exactly, like ``--resume``); the other stages
write their outputs atomically and are redone. A run is deterministic for a fixed ``--seed`` on one machine; other
CPUs (other SIMD kernels) give slightly different numbers.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
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
           "stratified_split", "DIGIT_NAMES"]

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONFIG_DIR = shipped_configs() / "quickstart"
IMAGE_SIZE = 32  # the quickstart tokenizers' input and output size (configs/quickstart/tokenizer-*.yaml)
# The flow denoiser is guided in the middle of its trajectory only (SiT time, 0 = noise): on the quickstart's trained
# model, interval [0.2, 0.8] at scale 1.5 gave gFID 89.0 against 91.0 guided at every step and 90.3 unguided.
FLOW_GUIDANCE_INTERVAL = (0.2, 0.8)
GRID_CELL = 96  # pixels per image in the sample and reconstruction grids (upscaled so that a reader can judge them)
DIGITS_JUDGE_SIZE = 8  # the digits' native resolution
OTHER_JUDGE_SIZE = 16
_FORMAT = 3  # of quickstart.json; a different format is a different run


@dataclasses.dataclass(frozen=True)
class QuickstartBudget:
    """How much work each stage does."""

    images_per_class: Optional[int]  # images per class taken from the data before the split (None: all)
    held_out: int  # images held out (stratified) for every metric
    tokenizer_steps: int
    ar_steps: int
    flow_steps: int
    gfid_samples: int  # generated images per guidance scale (balanced labels); also the floor's size
    recon_images: int  # held-out images for the tokenizer metrics (the first of the held-out split)
    grid_per_class: int  # images per class in the sample grids
    flow_inference_steps: int
    guidance_scales: tuple[float, ...]  # the sweep (1 = no guidance)


# flow_inference_steps: with the flow pipeline's default sampler (ab2), 16 steps matched 50 Euler steps' gFID and
# class accuracy on the quickstart's flow model (`vfmtok speed flow-samplers`, README "Flow samplers")
FULL = QuickstartBudget(images_per_class=None, held_out=300, tokenizer_steps=1000, ar_steps=1500, flow_steps=1500,
                        gfid_samples=100, recon_images=150, grid_per_class=6, flow_inference_steps=16,
                        guidance_scales=(1.0, 1.25, 1.5, 2.0, 3.0, 4.0))
FAST = QuickstartBudget(images_per_class=12, held_out=30, tokenizer_steps=6, ar_steps=20, flow_steps=20,
                        gfid_samples=30, recon_images=30, grid_per_class=2, flow_inference_steps=8,
                        guidance_scales=(1.0, 2.0))


# -- data ------------------------------------------------------------------------------------------------------------
def digits_dataset(directory: Optional[str | Path] = None, images_per_class: Optional[int] = None):
    """scikit-learn's bundled handwritten digits as a ``datasets.Dataset``: 32 px RGB PNGs, dark ink on white,
    bicubic-upscaled from 8 x 8, with ClassLabel names ``zero`` ... ``nine``; saved (``save_to_disk``) into
    ``directory`` when one is given (then its path is returned)."""
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
    if directory is None:
        return dataset
    with atomic_directory(directory, replace=True) as staging:
        dataset.save_to_disk(str(staging))
    return Path(directory)


def stratified_split(labels: np.ndarray, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), sorted: ``held_out`` images with the classes in the data's proportions
    (scikit-learn's stratified split, seeded)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    num_classes = int((counts > 0).sum())
    if held_out < num_classes or len(labels) - held_out < num_classes or counts[counts > 0].min() < 2:
        raise InvalidValueError(f"cannot hold out {held_out} of {len(labels)} images stratified over {num_classes} "
                                f"classes: every class needs at least 2 images and each split one per class")
    train, test = train_test_split(np.arange(len(labels)), test_size=held_out, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def write_images(dataset, directory: str | Path, indices: Optional[np.ndarray] = None,
                 size: int = IMAGE_SIZE) -> int:
    """Images of ``dataset`` (from :func:`vfmtok.pipelines.data.load_image_dataset`; all, or ``indices``) as PNGs,
    ADM-centre-cropped to ``size``: an FID image folder. Unreadable images are skipped (and logged); returns how many
    were written."""
    from vfmtok.pipelines.data import adm_center_crop

    written = 0
    with atomic_directory(directory, replace=True) as staging:
        for _, image in readable_images(dataset, indices):
            adm_center_crop(image, size).convert("RGB").save(staging / f"{written:05d}.png", format="PNG")
            written += 1
    return written


def readable_images(dataset, indices: Optional[np.ndarray] = None):
    """(index, RGB PIL image) of the images of ``dataset`` (all, or ``indices``) that decode; an unreadable one is
    skipped with a warning, as training skips it."""
    from vfmtok.pipelines.data import decode_image

    for index in (np.arange(len(dataset)) if indices is None else indices):
        try:
            image = decode_image(dataset[int(index)]["image"])
        # PIL raises many exception types for a broken file; only decoding is inside the try
        except Exception as error:
            logger.warning("image %d skipped: %s: %s", int(index), type(error).__name__, error)
            continue
        yield int(index), image


def balanced_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` images of every class."""
    labels = np.asarray(labels)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def dataset_info(dataset, source: str) -> dict[str, Any]:
    """Number of images and classes of a labelled dataset, and its class names ({id: name})."""
    from vfmtok.pipelines.data import class_names
    from vfmtok.pipelines.pipeline_common import default_id2label

    labels = np.asarray(dataset["label"])
    if (labels < 0).any():
        raise InvalidValueError(f"{source!r}: the quickstart trains class-conditional generators, so every image "
                                f"needs a class label; {int((labels < 0).sum())} of {len(labels)} have none")
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
        # disable=None: no bar when stderr is not a terminal (a log file gets the stage lines, not escape codes)
        self.progress = tqdm(total=total, desc="quickstart", unit="stage", dynamic_ncols=True, disable=None)

    def done(self, name: str) -> bool:
        return (self.root / f"{name}.json").is_file()

    def run(self, name: str, work: Callable[[], dict[str, Any]], seconds_from: Optional[float] = None
            ) -> dict[str, Any]:
        """Run ``work`` unless an earlier run finished it; ``seconds_from``: the stage started then (a stage run
        side by side with another is timed from their common start)."""
        marker = self.root / f"{name}.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            self.seconds[name] = record["seconds"]
            self.skipped.append(name)
            logger.info("stage %s: done in an earlier run (%.1f s), skipped", name, record["seconds"])
        else:
            self.progress.set_postfix_str(name)
            logger.info("stage %s ...", name)
            start = time.perf_counter() if seconds_from is None else seconds_from
            result = work()
            record = {"result": result, "seconds": time.perf_counter() - start}
            self.seconds[name] = record["seconds"]
            with atomic_file(marker) as temporary:
                temporary.write_text(json.dumps(record, indent=1, default=str))
            logger.info("stage %s: %.1f s", name, record["seconds"])
        self.progress.update(1)
        return record["result"]


def _template(name: str) -> dict[str, Any]:
    """``configs/quickstart/<name>`` (shipped with the package), read."""
    source = CONFIG_DIR / name
    if not source.is_file():
        raise MissingFileError(f"the quickstart's config {str(source)!r} is missing: reinstall vfmtok")
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


# What a quickstart run writes at the top of its output folder (``--force`` removes these and nothing else).
_OWN_NAMES = ("quickstart.json", "report.json", "report.md", "data", "configs", "runs", "codes", "latents",
              "pipelines", "eval", "stages")
_OWN_PATTERNS = ("samples_*.png", "guidance_*.png")


def _own_outputs(output: Path) -> list[Path]:
    """The quickstart's files and folders in ``output``, with the staging entries, temporary files and locks of
    interrupted writes to them (``.<name>.*``); a user's own files stay."""
    found = {output / name for name in _OWN_NAMES if (output / name).exists()}
    for pattern in _OWN_PATTERNS:
        found.update(output.glob(pattern))
    for name in (*_OWN_NAMES, *(pattern.split("*")[0] for pattern in _OWN_PATTERNS)):
        found.update(output.glob(f".{Path(name).stem}*"))
    return sorted(found)


def _options_record(data: Optional[str], vfm: Optional[str], seed: int, fast: bool) -> dict[str, Any]:
    return {"format": _FORMAT, "data": data, "vfm": vfm, "seed": seed, "fast": fast}


def _prepare_output(output: Path, options: dict[str, Any], force: bool) -> None:
    """Refuse to mix runs: an output directory made with other options needs ``--force`` (which clears it)."""
    record = output / "quickstart.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if force:
            for child in _own_outputs(output):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
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


# -- running stages side by side ------------------------------------------------------------------------------------
def _single_threaded_worker() -> None:
    """Each side-by-side training process uses one thread: the quickstart's small models gain nothing from a second
    one (measured; see the README), and two processes of one thread use both cores without oversubscribing them."""
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"  # two processes' progress bars would garble each other


def _run_side_by_side(stages: "_Stages", work: dict[str, Callable[[], dict[str, Any]]], workers: int) -> dict:
    """Run the named stages (picklable callables) in ``workers`` spawned processes; a stage already finished is
    skipped as in :meth:`_Stages.run`."""
    pending = {name: fn for name, fn in work.items() if not stages.done(name)}
    if workers < 2 or len(pending) < 2:
        return {name: stages.run(name, fn) for name, fn in work.items()}
    context = multiprocessing.get_context("spawn")
    results = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                initializer=_single_threaded_worker) as pool:
        started = time.perf_counter()
        futures = {name: pool.submit(fn) for name, fn in pending.items()}
        for name in work:
            if name in futures:
                results[name] = stages.run(name, futures[name].result, seconds_from=started)
            else:
                results[name] = stages.run(name, work[name])
    return results


def _train_tokenizer_stage(config: Path, data: str, run_dir: Path) -> dict[str, Any]:
    from vfmtok.pipelines.train.tokenizer import train_tokenizer

    return {"exported": str(train_tokenizer(config, data, run_dir, resume=True, random_vfm_intended=True))}


def _train_ar_stage(config: Path, run_dir: Path, codes: Path) -> dict[str, Any]:
    from vfmtok.pipelines.train.ar import train_ar

    return {"exported": str(train_ar(config, run_dir, codes=str(codes), resume=True))}


def _train_flow_stage(config: Path, run_dir: Path, latents: Path) -> dict[str, Any]:
    from vfmtok.pipelines.train.flow import train_flow

    return {"exported": str(train_flow(config, run_dir, latents=str(latents), resume=True))}


@dataclasses.dataclass
class _Run:
    """What every stage of one quickstart run needs."""

    output: Path
    stages: _Stages
    budget: QuickstartBudget
    seed: int
    workers: int
    digits: bool  # the default data (the judge works at their native 8 x 8)

    @property
    def train_dir(self) -> str:
        return str(self.output / "data" / "train")

    @property
    def held_out_dir(self) -> str:
        return str(self.output / "data" / "held-out")

    def config(self, template: str, params: dict[str, Any], max_steps: int) -> Path:
        """``configs/quickstart/<template>`` with ``params``, this run's seed and ``max_steps``, under ``configs/``."""
        return _write_config(template, self.output / "configs" / template, params,
                             {"max_steps": max_steps, "seed": self.seed})

    def relative(self, path: str | Path) -> str:
        """A path inside the output folder, relative to it (report.json holds only such paths)."""
        return str(Path(path).relative_to(self.output))

    @functools.cached_property
    def judge(self):
        """6. The judge, fitted once per process on the training split and checked on the held-out split (about 2 s,
        so a rerun refits it rather than reading a pickle)."""
        from vfmtok.evaluation.judge import PixelJudge

        judge = PixelJudge(DIGITS_JUDGE_SIZE if self.digits else OTHER_JUDGE_SIZE, seed=self.seed)
        judge.fit(*_split_images(self.train_dir))
        judge.check(*_split_images(self.held_out_dir))
        return judge


def run_quickstart(output_dir: str | Path = "quickstart", data: Optional[str] = None, vfm: Optional[str] = None,
                   seed: int = 0, fast: bool = False, force: bool = False,
                   inception_weights: Optional[str] = None) -> dict[str, Any]:
    """Run every stage (see the module docstring) into ``output_dir`` and return the report (also written as
    ``report.json`` and ``report.md``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidValueError(f"--seed must be an integer >= 0, got {seed!r}")
    budget = FAST if fast else FULL
    output = Path(output_dir)
    weights, no_inception = _inception_or_reason(inception_weights)  # checked before any training
    if inception_weights is not None and no_inception:
        raise MissingFileError(f"--inception-weights: {no_inception}")
    _prepare_output(output, _options_record(data, vfm, seed, fast), force)
    with _library_bars_off_unless_terminal():
        return _run_stages(output, budget, seed, data, vfm, weights, no_inception, fast)


def _run_stages(output: Path, budget: QuickstartBudget, seed: int, data: Optional[str], vfm: Optional[str],
                weights: Optional[str], no_inception: Optional[str], fast: bool) -> dict[str, Any]:
    started = time.perf_counter()
    run = _Run(output, _Stages(output, total=17), budget, seed, workers=min(2, os.cpu_count() or 1),
               digits=data is None)
    info = _data_stage(run, data)
    tokenizers, vfm_note = _tokenizer_stages(run, vfm)
    codes, latents = _extraction_stages(run, tokenizers)
    generators = _generator_stages(run, info["num_classes"], codes, latents)
    pipelines_dir = _pipeline_stage(run, tokenizers, generators, info["id2label"])
    judge = run.stages.run("judge", lambda: run.judge.describe())
    flow_sampling = {"num_inference_steps": budget.flow_inference_steps,
                     "guidance_interval": list(FLOW_GUIDANCE_INTERVAL)}
    recon, sweeps, floor = _evaluation_stages(run, tokenizers, pipelines_dir, flow_sampling, weights, no_inception,
                                              judge)
    defaults = {kind: (sweeps[kind] or {}).get("best_scale") for kind in ("ar", "flow")}
    grids = _sample_stages(run, pipelines_dir, info, defaults, flow_sampling)
    run.stages.progress.close()
    return _report(run, info, vfm, vfm_note, tokenizers, recon, sweeps, floor, judge, grids, no_inception,
                   time.perf_counter() - started, fast, data)


def _data_stage(run: _Run, data: Optional[str]) -> dict[str, Any]:
    """1. The data (the digits unless ``--data`` named some), split once into training and held-out images; the FID
    reference (the held-out images) and the floor (a balanced training sample of the gFID sample size)."""

    info = run.stages.run("data", lambda: _prepare_data(run, data))
    info["id2label"] = {str(k): v for k, v in info["id2label"].items()}
    return info


@contextlib.contextmanager
def _library_bars_off_unless_terminal():
    """datasets' (saving) and diffusers' (loading a pipeline) own progress bars write carriage returns into a log
    that is not a terminal: off for the run in that case, restored afterwards."""
    import datasets
    from diffusers.utils import logging as diffusers_logging

    switches = [(datasets.is_progress_bar_enabled, datasets.disable_progress_bars, datasets.enable_progress_bars),
                (diffusers_logging.is_progress_bar_enabled, diffusers_logging.disable_progress_bar,
                 diffusers_logging.enable_progress_bar)]
    turned_off = []
    if not sys.stderr.isatty():
        for is_enabled, disable, enable in switches:
            if is_enabled():
                disable()
                turned_off.append(enable)
    try:
        yield
    finally:
        for enable in turned_off:
            enable()


def _prepare_data(run: _Run, data: Optional[str]) -> dict[str, Any]:
    from vfmtok.pipelines.data import load_image_dataset

    dataset = digits_dataset(None, run.budget.images_per_class) if data is None else load_image_dataset(data)
    summary = dataset_info(dataset, data or "digits")
    labels = np.asarray(dataset["label"])
    train, held_out = stratified_split(labels, min(run.budget.held_out, len(labels) // 2), run.seed)
    for name, indices in (("train", train), ("held-out", held_out)):
        with atomic_directory(run.output / "data" / name, replace=True) as staging:
            dataset.select(indices).save_to_disk(str(staging))
    summary.update(train_images=len(train), held_out_images=len(held_out), split_seed=run.seed)
    summary["reference_images"] = write_images(load_image_dataset(run.held_out_dir),
                                               run.output / "data" / "reference")
    training = load_image_dataset(run.train_dir)
    per_class = max(1, run.budget.gfid_samples // summary["num_classes"])
    summary["floor_images"] = write_images(training, run.output / "data" / "floor",
                                           balanced_indices(np.asarray(training["label"]), per_class))
    return summary


def _tokenizer_stages(run: _Run, vfm: Optional[str]) -> tuple[dict[str, Path], str]:
    """2. The discrete and the continuous tokenizer, side by side: their exported folders, and which VFM they use."""
    tokenizers: dict[str, Path] = {}
    vfm_notes = {}
    work = {}
    for kind, template in (("vq", "tokenizer-vq.yaml"), ("ae", "tokenizer-ae.yaml")):
        spec, vfm_notes[kind] = quickstart_vfm_spec(vfm, _template(template)["params"]["vfm"]["image_size"])
        config = run.config(template, {} if spec is None else {"vfm": spec}, run.budget.tokenizer_steps)
        run_dir = run.output / "runs" / f"tokenizer-{kind}"
        work[f"tokenizer-{kind}"] = functools.partial(_train_tokenizer_stage, config, run.train_dir, run_dir)
        tokenizers[kind] = run_dir / "tokenizer"
    logger.info("VFM: %s", vfm_notes["vq"])
    _run_side_by_side(run.stages, work, run.workers)
    return tokenizers, vfm_notes["vq"]


def _extraction_stages(run: _Run, tokenizers: dict[str, Path]) -> tuple[Path, Path]:
    """3. Every training image encoded once: the codes folder and the latents folder (with its statistics)."""
    from vfmtok.pipelines.train.extract import extract_tokens, load_tokenizer
    from vfmtok.pipelines.train.flow import write_latent_statistics

    def extract(kind: str, target: Path) -> dict[str, Any]:
        # an interrupted extraction left only a staging directory, which extract_tokens removes; a finished one
        # whose statistics were not written yet is removed here
        shutil.rmtree(target, ignore_errors=True)
        extract_tokens(load_tokenizer(str(tokenizers[kind])), run.train_dir, target, batch_size=64, num_workers=0,
                       flip=False)
        if kind == "ae":
            write_latent_statistics(target)
        return {"path": run.relative(target), "shape": json.loads((target / "meta.json").read_text())["shape"]}

    codes, latents = run.output / "codes", run.output / "latents"
    for kind, name, target in (("vq", "extract-codes", codes), ("ae", "extract-latents", latents)):
        run.stages.run(name, lambda kind=kind, target=target: extract(kind, target))
    return codes, latents


def _generator_stages(run: _Run, num_classes: int, codes: Path, latents: Path) -> dict[str, Path]:
    """4. The GPT over the codes and the flow denoiser over the latents, side by side: their run folders."""
    options = {"num_classes": num_classes}
    ar_config = run.config("ar.yaml", options, run.budget.ar_steps)
    flow_config = run.config("flow.yaml", options, run.budget.flow_steps)
    runs = {"ar": run.output / "runs" / "ar", "flow": run.output / "runs" / "flow"}
    _run_side_by_side(run.stages, {
        "train-ar": functools.partial(_train_ar_stage, ar_config, runs["ar"], codes),
        "train-flow": functools.partial(_train_flow_stage, flow_config, runs["flow"], latents)}, run.workers)
    return runs


def _pipeline_stage(run: _Run, tokenizers: dict[str, Path], generators: dict[str, Path],
                    id2label: dict[str, str]) -> dict[str, Path]:
    """5. Both pipelines saved with ``save_pretrained``: their folders."""
    pipelines_dir = {"ar": run.output / "pipelines" / "ar", "flow": run.output / "pipelines" / "flow"}

    def save_pipelines() -> dict[str, Any]:
        from vfmtok.generators import load_generator
        from vfmtok.pipelines.convert import assemble_pipeline
        from vfmtok.pipelines.train.extract import load_tokenizer

        for kind, tokenizer in (("ar", "vq"), ("flow", "ae")):
            pipe = assemble_pipeline(load_tokenizer(str(tokenizers[tokenizer])),
                                     load_generator(str(generators[kind] / "generator")), id2label=id2label)
            with atomic_directory(pipelines_dir[kind], replace=True) as staging:
                pipe.save_pretrained(staging)
        return {k: run.relative(v) for k, v in pipelines_dir.items()}

    run.stages.run("pipelines", save_pipelines)
    return pipelines_dir


# -- evaluation ------------------------------------------------------------------------------------------------------
def _split_images(directory: str) -> tuple[list, np.ndarray]:
    from vfmtok.pipelines.data import load_image_dataset

    dataset = load_image_dataset(directory)
    labels = np.asarray(dataset["label"])
    pairs = list(readable_images(dataset))
    return [image for _, image in pairs], labels[[index for index, _ in pairs]]


def _evaluation_stages(run: _Run, tokenizers: dict[str, Path], pipelines_dir: dict[str, Path],
                       flow_sampling: dict[str, Any], weights: Optional[str], no_inception: Optional[str],
                       judge_record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Optional[dict]]:
    """7. Tokenizer metrics on the held-out images; 8. the floor and each generator's guidance sweep. All None (with
    the reason in the report) when no FID Inception weights can be had."""
    from vfmtok.evaluation.recon import reconstruction_metrics
    from vfmtok.pipelines.train.extract import load_tokenizer

    if no_inception:
        run.stages.progress.update(5)
        return {"vq": None, "ae": None}, {"ar": None, "flow": None}, None
    recon: dict[str, Any] = {}
    for kind in ("vq", "ae"):
        recon[kind] = run.stages.run(f"recon-{kind}", lambda kind=kind: _recon_summary(run, reconstruction_metrics(
            load_tokenizer(str(tokenizers[kind])), run.held_out_dir, run.output / "eval" / f"recon-{kind}",
            batch_size=64, eval_size=IMAGE_SIZE, limit=run.budget.recon_images, inception_weights=weights,
            grid_images=16, grid_cell=GRID_CELL,
            lpips=False)))  # LPIPS would download VGG16 weights (528 MB); the quickstart stays offline
    floor = run.stages.run("floor", lambda: _floor(run, tokenizers, weights))
    sweeps = {}
    for kind, options in (("ar", {}), ("flow", flow_sampling)):
        sweeps[kind] = run.stages.run(f"benchmark-{kind}", lambda kind=kind, options=options: _sweep(
            run, kind, pipelines_dir[kind], options, weights, floor, judge_record))
    return recon, sweeps, floor


def _recon_summary(run: _Run, report: dict[str, Any]) -> dict[str, Any]:
    keep = ("psnr", "ssim", "rfid", "lpips", "lpips_unavailable", "num_images", "codebooks", "warnings")
    summary = {k: report[k] for k in keep if k in report}
    summary["protocol"] = {**report["protocol"], "data": "the held-out split (data/held-out)"}
    return summary


def _floor(run: _Run, tokenizers: dict[str, Path], weights: Optional[str]) -> dict[str, Any]:
    """The FID of real training images against the held-out reference, at the gFID sample size and with the same
    protocol: no generator can be expected below it. And the same images after a round trip through each tokenizer
    (``through_tokenizer``): a generator draws its images through its tokenizer's decoder, so that is the floor it
    can reach even if it learned the codes' or latents' distribution perfectly."""
    from vfmtok.evaluation.fid import InceptionFeatures, compare_sources, load_source

    extractor, reference = InceptionFeatures(weights), load_source(run.output / "data" / "reference")
    floor_images = run.output / "data" / "floor"
    metrics = compare_sources(load_source(floor_images), reference, extractor, batch_size=50)
    through = {}
    for kind, path in tokenizers.items():
        reconstructions = _round_trip(path, floor_images, run.output / "eval" / f"floor-{kind}.npz")
        through[kind] = compare_sources(load_source(reconstructions), reference, extractor, batch_size=50)["fid"]
    return {"fid": metrics["fid"], "num_images": metrics["num_samples"], "through_tokenizer": through,
            "what": "real training images (balanced) against the held-out reference, same protocol as gFID; "
                    "through_tokenizer: the same images encoded and decoded by each tokenizer"}


def _round_trip(tokenizer_path: Path, images: Path, output: Path) -> Path:
    """The images of a folder encoded and decoded by a tokenizer, as an ``.npz`` of uint8 images (``arr_0``)."""
    from vfmtok.evaluation.fid import load_source
    from vfmtok.evaluation.recon import to_uint8
    from vfmtok.pipelines.train.extract import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_path)).eval()
    source = load_source(images)
    pixels = torch.cat(list(source.batches(source.num_images)))  # uint8 (N, 3, H, W), the FID stages' reader
    with torch.no_grad():
        decoded = tokenizer.decode(tokenizer.encode(pixels.float() / 127.5 - 1), output_size=IMAGE_SIZE)
    with atomic_file(output) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, arr_0=to_uint8(decoded).permute(0, 2, 3, 1).numpy())
    return output


def _sweep(run: _Run, kind: str, pipeline: Path, options: dict[str, Any], weights: Optional[str],
           floor: dict[str, Any], judge_record: dict[str, Any]) -> dict[str, Any]:
    """gFID (``vfmtok benchmark``) and class accuracy (the judge on the same samples) at every scale of the sweep;
    the best scale by gFID becomes the pipeline's default and goes into its model card with the results; a plot."""
    from vfmtok.evaluation.benchmark import card_results, run_benchmark
    from vfmtok.pipelines.pipeline_common import load_pipeline

    output = run.output / "eval" / f"benchmark-{kind}"
    report = run_benchmark(str(pipeline), output, run.budget.gfid_samples, list(run.budget.guidance_scales),
                           str(run.output / "data" / "reference"), labels="balanced", seed=run.seed, batch_size=64,
                           output_size=IMAGE_SIZE, inception_weights=weights, sampler_options=options, device="cpu")
    judge = run.judge if judge_record["useful"] else None
    rows = []
    for row in report["settings"]:
        images, labels = _benchmark_samples(output / "samples" / row["setting"])
        rows.append({"guidance_scale": row["guidance_scale"], "gfid": row["fid"], "precision": row["precision"],
                     "recall": row["recall"], "class_accuracy": judge.accuracy(images, labels) if judge else None})
    best = min(rows, key=lambda r: r["gfid"])
    without = next(r for r in rows if r["guidance_scale"] == 1.0)
    pipe = load_pipeline(pipeline)
    pipe.set_default_guidance_scale(best["guidance_scale"])
    if "guidance_interval" in options:  # pipe(...) samples as evaluated
        pipe.set_default_guidance_interval(options["guidance_interval"])
    evaluation = card_results(report)
    evaluation.update({f"class accuracy (cfg-{r['guidance_scale']:g})": round(r["class_accuracy"], 4)
                       for r in rows if r["class_accuracy"] is not None})
    evaluation["FID floor (real training images)"] = round(floor["fid"], 4)
    evaluation["FID floor through the tokenizer"] = round(floor["through_tokenizer"][GENERATOR_TOKENIZER[kind]], 4)
    pipe.record_evaluation(evaluation, pipeline)
    plot = _plot_sweep(kind, rows, floor, judge_record, run.output / f"guidance_{kind}.png")
    protocol = {k: v for k, v in report["settings"][0]["protocol"].items() if k != "guidance_scale"}
    protocol["reference"] = "data/reference (the held-out split)"
    return {"rows": rows, "best_scale": best["guidance_scale"], "best": best, "without_guidance": without,
            "plot": run.relative(plot), "protocol": protocol}


def _benchmark_samples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and their labels of a benchmark setting's shards."""
    images, labels = [], []
    for shard in sorted(folder.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            images.append(data["arr_0"])
            labels.append(data["labels"])
    return np.concatenate(images), np.concatenate(labels)


def _plot_sweep(kind: str, rows: list[dict[str, Any]], floor: dict[str, Any], judge: dict[str, Any],
                path: Path) -> Path:
    """gFID (left axis, with the floor) and class accuracy (right axis) against the guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scales = [r["guidance_scale"] for r in rows]
    figure, left = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    left.plot(scales, [r["gfid"] for r in rows], "o-", color="tab:blue", label="gFID")
    left.axhline(floor["fid"], color="tab:blue", linestyle="--", linewidth=1,
                 label=f"floor: real images ({floor['fid']:.1f})")
    through = floor["through_tokenizer"][GENERATOR_TOKENIZER[kind]]
    left.axhline(through, color="tab:gray", linestyle="-.", linewidth=1,
                 label=f"floor through the tokenizer ({through:.1f})")
    levels = [r["gfid"] for r in rows] + [floor["fid"], through]  # axhline alone does not widen the axis
    margin = 0.05 * (max(levels) - min(levels) or 1.0)
    left.set_ylim(min(levels) - margin, max(levels) + margin)
    left.set_xlabel("classifier-free guidance scale (1 = none)")
    left.set_ylabel("gFID (lower is better)", color="tab:blue")
    left.set_xticks(scales)
    handles, labels = left.get_legend_handles_labels()
    if rows[0]["class_accuracy"] is not None:
        right = left.twinx()
        right.plot(scales, [100 * r["class_accuracy"] for r in rows], "s-", color="tab:red", label="class accuracy")
        right.axhline(100 * judge["held_out_accuracy"], color="tab:red", linestyle=":", linewidth=1,
                      label=f"judge on real held-out ({100 * judge['held_out_accuracy']:.1f}%)")
        right.set_ylabel("class accuracy of samples (%)", color="tab:red")
        right.set_ylim(0, 100)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    left.legend(handles, labels, loc="best", fontsize=8)
    left.set_title(f"{'GPT over VQ codes' if kind == 'ar' else 'flow denoiser over latents'}: guidance sweep")
    figure.tight_layout()
    points = {"guidance_scale": scales, "gfid": [r["gfid"] for r in rows], "floor": floor["fid"],
              "tokenizer_floor": through,
              "class_accuracy": [r["class_accuracy"] for r in rows]}
    with atomic_file(path) as temporary:  # the plotted numbers ride along in the PNG's text chunk
        figure.savefig(temporary, format="png", metadata={"Description": json.dumps(points)})
    plt.close(figure)
    return path


def _sample_grids(pipe, kind: str, classes: list[int], names: dict[int, str], per_class: int,
                  guidance: Optional[float], seed: int, output: Path, options: dict[str, Any]) -> dict[str, str]:
    """Grids (one row per class, ``per_class`` samples each, captioned) of ``pipe(class_ids)`` without guidance and
    at the pipeline's default (the sweep's best) scale."""
    from PIL import Image

    from vfmtok.pipelines.pipeline_common import captioned_image_grid

    written = {}
    for label, scale in (("without_cfg", 1.0), ("with_cfg", guidance)):
        if scale is None or (label == "with_cfg" and scale == 1.0):  # no guidance chosen: one grid says it all
            continue
        images = pipe(classes, guidance_scale=scale, num_images_per_class=per_class,
                      generator=torch.Generator().manual_seed(seed), output_type="pil", **options).images
        images = [image.resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST) for image in images]
        captions = [f"{names.get(c, c)}" for c in classes for _ in range(per_class)]
        path = output / f"samples_{kind}_{label}.png"
        with atomic_file(path) as temporary:
            captioned_image_grid(images, captions, columns=per_class).save(temporary, format="PNG")
        written[label] = path.name
    return written


def _grid_classes(num_classes: int, count: int = 10) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, num_classes - 1, min(count, num_classes))})


def _sample_stages(run: _Run, pipelines_dir: dict[str, Path], info: dict[str, Any],
                   defaults: dict[str, Optional[float]], flow_sampling: dict[str, Any]) -> dict[str, dict[str, str]]:
    """9. Sample grids from both pipelines loaded back with ``from_pretrained``, without guidance and at the chosen
    scale (the pipeline's default)."""
    from vfmtok.pipelines.pipeline_common import load_pipeline

    classes = _grid_classes(info["num_classes"])
    names = {int(k): v for k, v in info["id2label"].items()}

    def sample(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        pipe = load_pipeline(pipelines_dir[kind])
        pipe.set_progress_bar_config(disable=True)
        return _sample_grids(pipe, kind, classes, names, run.budget.grid_per_class, defaults[kind], run.seed,
                             run.output, options)

    return {"ar": run.stages.run("samples-ar", lambda: sample("ar", {})),
            "flow": run.stages.run("samples-flow", lambda: sample("flow", flow_sampling))}


# -- the report ------------------------------------------------------------------------------------------------------
def _generator_entry(run: _Run, kind: str, sweep: Optional[dict[str, Any]], floor: Optional[dict[str, Any]],
                     grids: dict[str, str], no_inception: Optional[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"pipeline": run.relative(run.output / "pipelines" / kind), "sample_grids": grids}
    if sweep is None:
        entry.update(gfid_unavailable=no_inception, sweep=None, best_scale=None)
        return entry
    best, without = sweep["best"], sweep["without_guidance"]
    entry.update(sweep=sweep["rows"], best_scale=sweep["best_scale"], default_guidance_scale=sweep["best_scale"],
                 floor=floor["fid"], tokenizer_floor=floor["through_tokenizer"][GENERATOR_TOKENIZER[kind]],
                 plot=sweep["plot"], protocol=sweep["protocol"],
                 gfid_without_cfg=without["gfid"], gfid_at_best_scale=best["gfid"],
                 class_accuracy_without_cfg=without["class_accuracy"],
                 class_accuracy_at_best_scale=best["class_accuracy"],
                 cfg_lowers_gfid=bool(best["gfid"] < without["gfid"]))
    name = GENERATOR_NAMES[kind]
    notes = []
    if not entry["cfg_lowers_gfid"]:
        notes.append(f"{name}: no guidance scale of the sweep lowers gFID below the unguided "
                     f"{without['gfid']:.2f}")
    if best["class_accuracy"] is not None and without["class_accuracy"] is not None and \
            best["class_accuracy"] <= without["class_accuracy"]:
        notes.append(f"{name}: class accuracy at the best scale ({best['class_accuracy']:.1%}) is not above the "
                     f"unguided {without['class_accuracy']:.1%}")
    entry["notes"] = notes
    return entry


GENERATOR_NAMES = {"ar": "GPT over the discrete codes (ar)", "flow": "flow denoiser over the continuous latents (flow)"}
GENERATOR_TOKENIZER = {"ar": "vq", "flow": "ae"}  # the tokenizer each generator decodes through


def _report(run: _Run, info: dict[str, Any], vfm: Optional[str], vfm_note: str, tokenizers: dict[str, Path],
            recon: dict[str, Any], sweeps: dict[str, Any], floor: Optional[dict[str, Any]], judge: dict[str, Any],
            grids: dict[str, Any], no_inception: Optional[str], seconds: float, fast: bool,
            data: Optional[str]) -> dict[str, Any]:
    import platform

    tokenizer_entries = {}
    for kind, name in (("vq", "discrete"), ("ae", "continuous")):
        entry: dict[str, Any] = {"path": run.relative(tokenizers[kind]),
                                 "grid": f"eval/recon-{kind}/reconstructions.png", "images": "held-out"}
        if recon[kind] is None:
            entry.update(psnr=None, ssim=None, rfid=None, unavailable=no_inception)
        else:
            entry.update(recon[kind])
            if kind == "vq":
                entry["codebook_usage"] = recon[kind]["codebooks"][0]["usage"]
                entry["codebook_perplexity"] = recon[kind]["codebooks"][0]["perplexity"]
        tokenizer_entries[name] = entry
    report = {
        "fast": fast,
        "tokenizers": tokenizer_entries,
        "ar": _generator_entry(run, "ar", sweeps["ar"], floor, grids["ar"], no_inception),
        "flow": _generator_entry(run, "flow", sweeps["flow"], floor, grids["flow"], no_inception),
        "floor": floor,
        "judge": judge,
        "vfm": {"source": vfm, "pretrained": vfm is not None, "description": vfm_note},
        "data": {"source": data or f"scikit-learn handwritten digits (bundled, BSD licence), {IMAGE_SIZE} px",
                 **{k: info[k] for k in ("num_images", "num_classes", "train_images", "held_out_images",
                                         "reference_images", "floor_images", "split_seed")}},
        "stages_seconds": {name: round(s, 1) for name, s in run.stages.seconds.items()},
        "stages_skipped": run.stages.skipped,
        "total_seconds": round(seconds, 1),
        "options": {"seed": run.seed, "fast": fast, "budget": dataclasses.asdict(run.budget),
                    "side_by_side_processes": run.workers},
        "machine": {"torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "paths": "relative to this folder",
    }
    with atomic_file(run.output / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1, default=str))
    text = report_markdown(report)
    with atomic_file(run.output / "report.md") as temporary:
        temporary.write_text(text)
    print(text)
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def report_markdown(report: dict[str, Any]) -> str:
    """The quickstart's report as Markdown: tables, the sweep plots and the sample grids (linked relative to the
    report's folder)."""
    tok, data = report["tokenizers"], report["data"]
    lines = ["# vfmtok quickstart" + (" (--fast: a reduced smoke run; its numbers mean nothing)" if report["fast"]
                                      else ""), "",
             f"VFM: {report['vfm']['description']}.", "",
             f"Data: {data['source']}: {data['num_images']} images, {data['num_classes']} classes, split once "
             f"(stratified, seed {data['split_seed']}) into {data['train_images']} training and "
             f"{data['held_out_images']} held-out images. Every number below is measured on the held-out images.",
             "", "## Tokenizers (held-out images)", "",
             "| tokenizer | PSNR | SSIM | rFID | codebook usage | images | reconstructions |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in tok.items():
        usage = entry.get("codebook_usage")
        lines.append(f"| {name} | {_fmt(entry.get('psnr'))} | {_fmt(entry.get('ssim'), 3)} | {_fmt(entry.get('rfid'))} "
                     f"| {'-' if usage is None else f'{usage:.1%}'} | {entry.get('num_images', 'n/a')} | "
                     f"[grid]({entry['grid']}) |")
    judge = report["judge"]
    lines += ["", "## Generators", "",
              f"The judge: {judge['model']} at {judge['resolution']}, trained on the training split; held-out "
              f"accuracy {_pct(judge['held_out_accuracy'])}" + ("" if judge["useful"] else
                                                                 " (too low to judge samples: not used)") + ".",
              ""]
    floor = report.get("floor")
    for kind in ("ar", "flow"):
        entry = report[kind]
        lines += [f"### {GENERATOR_NAMES[kind]}", ""]
        if entry.get("sweep") is None:
            lines += [f"gFID unavailable: {entry.get('gfid_unavailable')}", ""]
            continue
        lines += ["| guidance scale | gFID | floor | floor through the tokenizer | class accuracy | precision | recall |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in entry["sweep"]:
            best = " (best, the pipeline's default)" if row["guidance_scale"] == entry["best_scale"] else ""
            lines.append(f"| {row['guidance_scale']:g}{best} | {_fmt(row['gfid'])} | {_fmt(floor['fid'])} | "
                         f"{_fmt(entry['tokenizer_floor'])} | {_pct(row['class_accuracy'])} | "
                         f"{_fmt(row['precision'], 3)} | {_fmt(row['recall'], 3)} |")
        lines += ["", f"![guidance sweep]({entry['plot']})", ""]
        grids = entry["sample_grids"]
        if grids:
            caption = ("Samples (one row per class): without guidance (left), at guidance "
                       f"{entry['best_scale']:g} (right)." if "with_cfg" in grids else
                       "Samples (one row per class) without guidance, the scale the sweep chose.")
            lines += [" ".join(f"![{label.replace('_', ' ')}]({path})" for label, path in grids.items()), "",
                      caption, ""]
    protocol = report["ar"].get("protocol") or {}
    if protocol and floor:
        lines += [f"gFID protocol: {protocol.get('num_samples')} samples per scale ({protocol.get('labels')} labels, "
                  f"seed {protocol.get('seed')}), {protocol.get('resolution')}, against the "
                  f"{data['reference_images']} held-out images. The floor is the FID of {floor['num_images']} real "
                  f"training images against the same reference with the same protocol: no generator can be expected "
                  f"below it. The floor through the tokenizer is the FID of the same images encoded and decoded by "
                  f"the generator's tokenizer: a generator that learned its tokens perfectly would reach it. FIDs from so few images are biased far upwards: compare them with the floor and with "
                  f"each other, never with published numbers.", ""]
    notes = [note for kind in ("ar", "flow") for note in report[kind].get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name}{' (earlier run)' if name in report['stages_skipped'] else ''} | {s:.1f} |"
              for name, s in report["stages_seconds"].items()]
    lines += [f"| total (this run) | {report['total_seconds']:.1f} |", ""]
    return "\n".join(lines)
