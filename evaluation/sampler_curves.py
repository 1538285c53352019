"""Sample quality against sampling cost, behind ``vfmtok speed flow-samplers``: for each flow sampler and step count,
gFID and the class accuracy of an independent judge (:mod:`vfmtok.evaluation.judge`) of the same samples, plus the
distance of the sampled latents to an accurate solution of the same ODE from the same noise, against the number of
velocity evaluations; a JSON report and one plot.

Every setting samples from the same noise and labels (one generator seeded per setting with the same seed, balanced
labels), so the settings differ only by their solver: differences between them are not sampling noise, while the
gFID of a few hundred images itself carries a spread of a few points (``gfid_spread`` measures it: the gFID of the
reference setting at other seeds).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vfmtok.evaluation.fid import ImageSource, InceptionFeatures, compare_sources, load_source
from vfmtok.evaluation.judge import PixelJudge
from vfmtok.tokenizer.utils.atomic import atomic_file, make_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError

__all__ = ["flow_sampler_curves", "DEFAULT_STEPS", "plot_flow_sampler_curves", "ar_sjd_comparison"]

# Step counts per sampler: Heun spends 2N - 1 velocity evaluations on N steps.
# 16 evaluations is a third of Euler's 50.
DEFAULT_STEPS = {"euler": (8, 16, 25, 50), "ab2": (6, 8, 12, 16), "heun": (4, 5, 7, 8),
                 "dpm++2m": (6, 8, 12, 16), "unipc": (6, 8, 12, 16)}
# gFID (the costly metric: Inception on every image) at these step counts only; class accuracy and latent error at all.
FID_STEPS = {"euler": (50,), "ab2": (16,), "heun": (8,), "dpm++2m": (16,), "unipc": (16,)}
ACCURATE = ("heun", 100)  # the "exact" ODE solution the latent error is measured against (199 evaluations)


def _judge(train: str, held_out: str, size: int, seed: int) -> PixelJudge:
    from vfmtok.pipelines.data import decode_image, load_image_dataset

    def split(directory: str):
        dataset = load_image_dataset(directory)
        return [decode_image(row["image"]) for row in dataset], np.asarray(dataset["label"])

    judge = PixelJudge(size, seed=seed).fit(*split(train))
    judge.check(*split(held_out))
    return judge


def _sample_latents(pipe, labels: torch.Tensor, sampler: str, steps: int, guidance_scale: float, seed: int,
                    batch_size: int) -> torch.Tensor:
    generator = torch.Generator(pipe.device).manual_seed(seed)
    return pipe(labels, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=generator, batch_size=batch_size, output_type="latent").images


def _decode(pipe, latents: torch.Tensor, output_size: int, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        images = torch.cat([pipe.vae.decode(chunk, output_size=output_size) for chunk in latents.split(batch_size)])
    array = pipe._convert(images, "np")
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def _evaluations(pipe, sampler: str, steps: int) -> int:
    """Velocity evaluations of one sample (each is one transformer call on the CFG-doubled batch)."""
    from vfmtok.generators.transport import flow_scheduler, scheduler_shift, set_flow_timesteps

    scheduler = flow_scheduler(sampler, scheduler_shift(pipe.scheduler))
    set_flow_timesteps(scheduler, steps)
    return len(scheduler.timesteps)


def flow_sampler_curves(pipeline: str, reference: str, judge_train: str, judge_held_out: str, output_dir: str,
                        steps: Optional[dict[str, Sequence[int]]] = None, num_samples: int = 300,
                        guidance_scale: Optional[float] = None,
                        guidance_interval: Optional[Sequence[float]] = None, seed: int = 0, batch_size: int = 100,
                        output_size: int = 32, judge_size: int = 8, spread_seeds: int = 2,
                        inception_weights: Optional[str] = None,
                        fid_steps: Optional[dict[str, Sequence[int]]] = None) -> dict[str, Any]:
    """Measure every (sampler, steps) of ``steps`` (default :data:`DEFAULT_STEPS`) on a flow pipeline, gFID at
    ``fid_steps`` (default :data:`FID_STEPS`) only; write ``report.json`` and ``flow_samplers.png`` to
    ``output_dir`` and return the report."""
    from vfmtok.generators.transport import scheduler_shift
    from vfmtok.pipelines.pipeline_common import load_pipeline

    steps = dict(steps or DEFAULT_STEPS)
    fid_steps = dict(FID_STEPS if fid_steps is None else fid_steps)
    if num_samples < 2 or batch_size < 1 or spread_seeds < 0:
        raise InvalidValueError(f"num_samples must be >= 2, batch_size >= 1, spread_seeds >= 0; got {num_samples}, "
                                f"{batch_size}, {spread_seeds}")
    output = make_directory(output_dir)
    pipe = load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.resolve_guidance_scale(guidance_scale)
    if guidance_interval is not None:
        pipe.set_default_guidance_interval(list(guidance_interval))
    num_classes = pipe.transformer.config.num_classes
    labels = torch.from_numpy(np.random.default_rng(seed).permutation(np.arange(num_samples) % num_classes))
    reference_source = load_source(reference)
    extractor = InceptionFeatures(inception_weights)
    judge = _judge(judge_train, judge_held_out, judge_size, seed)

    def measure(latents: torch.Tensor, name: str, fid: bool = True) -> dict[str, Any]:
        images = _decode(pipe, latents, output_size, batch_size)
        gfid = None
        if fid:
            source = ImageSource(Path(name), "npz", array=images,
                                 content_hash=hashlib.sha256(images.tobytes()).hexdigest())
            gfid = compare_sources(source, reference_source, extractor, batch_size=50, cache=False)["fid"]
        return {"gfid": gfid, "class_accuracy": judge.accuracy(images, labels.numpy())}

    accurate = _sample_latents(pipe, labels, *ACCURATE, scale, seed, batch_size)
    rows = []
    for sampler, counts in steps.items():
        for count in counts:
            start = time.perf_counter()
            latents = _sample_latents(pipe, labels, sampler, count, scale, seed, batch_size)
            seconds = time.perf_counter() - start
            error = float((latents - accurate).pow(2).mean().sqrt() / accurate.pow(2).mean().sqrt())
            row = {"sampler": sampler, "steps": count, "evaluations": _evaluations(pipe, sampler, count),
                   "relative_latent_error": error, "sampling_seconds": seconds,
                   **measure(latents, f"{sampler}-{count}", fid=count in fid_steps.get(sampler, ()))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    spread = []
    for extra in range(1, spread_seeds + 1):  # the same reference setting at other seeds: the gFID's own noise
        latents = _sample_latents(pipe, labels, "euler", 50, scale, seed + extra, batch_size)
        spread.append(measure(latents, f"euler-50-seed{seed + extra}"))
    report = {"pipeline": str(pipeline), "reference": str(reference), "num_samples": num_samples,
              "guidance_scale": scale, "guidance_interval": pipe.config.get("default_guidance_interval"),
              "shift": scheduler_shift(pipe.scheduler), "seed": seed,
              "judge_held_out_accuracy": judge.held_out_accuracy, "accurate_solution": list(ACCURATE),
              "rows": rows, "gfid_spread": spread, "threads": torch.get_num_threads()}
    with atomic_file(output / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1))
    report["plot"] = str(plot_flow_sampler_curves(report, output / "flow_samplers.png"))
    return report


def plot_flow_sampler_curves(report: dict[str, Any], path: Path) -> Path:
    """Three panels against velocity evaluations per image: gFID, class accuracy, latent error (log-log); the
    Euler-50 setting and the spread of its gFID over seeds are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    samplers = list(dict.fromkeys(r["sampler"] for r in report["rows"]))
    for sampler in samplers:
        rows = sorted((r for r in report["rows"] if r["sampler"] == sampler), key=lambda r: r["evaluations"])
        calls = [r["evaluations"] for r in rows]
        with_fid = [r for r in rows if r["gfid"] is not None]
        axes[0].plot([r["evaluations"] for r in with_fid], [r["gfid"] for r in with_fid], "o-", label=sampler)
        axes[1].plot(calls, [r["class_accuracy"] for r in rows], "o-", label=sampler)
        axes[2].loglog(calls, [r["relative_latent_error"] for r in rows], "o-", label=sampler)
    baseline = next((r for r in report["rows"] if r["sampler"] == "euler" and r["steps"] == 50), None)
    if baseline is not None:
        fids = [baseline["gfid"], *(s["gfid"] for s in report["gfid_spread"])]
        accuracies = [baseline["class_accuracy"], *(s["class_accuracy"] for s in report["gfid_spread"])]
        axes[0].axhspan(min(fids), max(fids), color="grey", alpha=0.25, label="euler 50, seeds")
        axes[1].axhspan(min(accuracies), max(accuracies), color="grey", alpha=0.25)
        for axis in axes:
            axis.axvline(50 / 3, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("gFID")
    axes[1].set_ylabel("class accuracy (judge)")
    axes[2].set_ylabel(f"latent error vs {report['accurate_solution'][0]} {report['accurate_solution'][1]} steps")
    for axis in axes:
        axis.set_xlabel("velocity evaluations per image (x2 model passes with CFG)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"flow samplers, {report['num_samples']} samples, guidance {report['guidance_scale']:g} "
                 f"interval {report['guidance_interval']}, shift {report['shift']:g} (dotted: 1/3 of Euler 50)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as temporary:
        fig.savefig(temporary, format="png", dpi=90)
    plt.close(fig)
    return path


def ar_sjd_comparison(pipeline: str, reference: str, judge_train: str, judge_held_out: str, output_dir: str,
                      windows: Sequence[int] = (2, 4, 8, 16), num_samples: int = 300,
                      guidance_scale: Optional[float] = None, seed: int = 0, batch_size: int = 100,
                      output_size: int = 32, judge_size: int = 8, seeds: int = 3,
                      inception_weights: Optional[str] = None, fid: bool = True) -> dict[str, Any]:
    """Plain KV-cache sampling against speculative Jacobi decoding with each of ``windows`` draft tokens on an AR
    pipeline: wall-clock seconds, model forwards (steps) and tokens accepted per step, gFID and judge class accuracy
    of ``num_samples`` images, each at ``seeds`` seeds (SJD draws other random numbers than plain sampling, so its
    samples are other samples of the same distribution: gFID and accuracy agree within their spread over seeds).
    Timings alternate between the settings seed by seed; ``report.json`` goes to ``output_dir``."""
    from vfmtok.pipelines.pipeline_common import load_pipeline

    if num_samples < 2 or seeds < 1 or batch_size < 1:
        raise InvalidValueError(f"num_samples must be >= 2, seeds and batch_size >= 1; got {num_samples}, {seeds}, "
                                f"{batch_size}")
    output = make_directory(output_dir)
    pipe = load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.resolve_guidance_scale(guidance_scale)
    model = pipe.transformer.eval()
    num_classes = model.config.num_classes
    labels = torch.from_numpy(np.random.default_rng(seed).permutation(np.arange(num_samples) % num_classes))
    reference_source = load_source(reference)
    extractor = InceptionFeatures(inception_weights)
    judge = _judge(judge_train, judge_held_out, judge_size, seed)
    settings = [None, *windows]
    runs: dict[str, list[dict[str, Any]]] = {("plain" if w is None else f"sjd-{w}"): [] for w in settings}
    for index in range(seeds):
        for window in settings:
            generator = torch.Generator().manual_seed(seed + index)
            start, codes, steps, committed, row_steps = time.perf_counter(), [], 0, 0, 0
            for chunk in labels.split(batch_size):
                if window is None:
                    codes.append(model.generate(chunk, guidance_scale=scale, generator=generator))
                    steps += model.num_tokens - 1
                    committed += len(chunk) * (model.num_tokens - 1)
                    row_steps += len(chunk) * (model.num_tokens - 1)
                else:
                    out, stats = model.generate(chunk, guidance_scale=scale, generator=generator, sjd_window=window,
                                              return_sjd_stats=True)
                    codes.append(out)
                    steps, committed, row_steps = steps + stats.steps, committed + stats.tokens, \
                        row_steps + stats.row_steps
            seconds = time.perf_counter() - start
            codes = torch.cat(codes)
            with torch.no_grad():
                images = torch.cat([pipe.vqvae.decode(c, output_size=output_size) for c in codes.split(batch_size)])
            array = (np.clip(pipe._convert(images, "np"), 0, 1) * 255).round().astype(np.uint8)
            source = ImageSource(Path(f"{window}-{index}"), "npz", array=array,
                                 content_hash=hashlib.sha256(array.tobytes()).hexdigest())
            gfid = compare_sources(source, reference_source, extractor, batch_size=50, cache=False)["fid"] \
                if fid else None
            chunks = -(-num_samples // batch_size)
            row = {"setting": "plain" if window is None else f"sjd-{window}", "seed": seed + index,
                   "seconds": seconds, "forwards_per_batch": steps / chunks,
                   "tokens_per_row_step": committed / row_steps,
                   "gfid": gfid, "class_accuracy": judge.accuracy(array, labels.numpy())}
            runs[row["setting"]].append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    plain_seconds = float(np.median([r["seconds"] for r in runs["plain"]]))
    for name, rows in runs.items():
        summary[name] = {key: float(np.mean([r[key] for r in rows])) for key in
                         ("seconds", "forwards_per_batch", "tokens_per_row_step", "class_accuracy")}
        fids = [r["gfid"] for r in rows if r["gfid"] is not None]
        summary[name].update(gfid=float(np.mean(fids)) if fids else None, gfid_min=min(fids, default=None),
                             gfid_max=max(fids, default=None), accuracy_min=min(r["class_accuracy"] for r in rows),
                             accuracy_max=max(r["class_accuracy"] for r in rows),
                             speedup=plain_seconds / float(np.median([r["seconds"] for r in rows])))
    report = {"pipeline": str(pipeline), "generator": type(model).__name__, "num_samples": num_samples,
              "batch_size": batch_size, "guidance_scale": scale, "num_tokens": model.num_tokens, "seeds": seeds,
              "judge_held_out_accuracy": judge.held_out_accuracy, "threads": torch.get_num_threads(),
              "runs": runs, "summary": summary}
    with atomic_file(output / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=1))
    return report
