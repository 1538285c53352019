"""``vfmtok train flow``: train the flow denoiser (:class:`generators.DiTModel`) over continuous tokenizer latents with
the shared trainer, from latents extracted by ``vfmtok extract`` (a continuous tokenizer).

Latents are normalised per element with statistics measured over the extracted dataset (``vfmtok latent-stats``,
``latent_stats.safetensors``: ``mean`` and ``std`` of shape (C, h, w)); the statistics are exported with the model,
and generated latents are de-normalised with them before decoding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from accelerate.utils import set_seed
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_directory, atomic_file
from .codes import CodesDataset, load_tokenizer
from .config import build_model, load_config
from .data import ImageDataset, load_image_dataset
from .trainer import Trainer, TrainingConfig, TrainingTask

__all__ = ["FlowTask", "train_flow", "latent_statistics", "write_latent_statistics", "LATENT_STATS_NAME"]

LATENT_STATS_NAME = "latent_stats.safetensors"
FLOW_OPTIONS = {"time_schedule": "uniform", "time_mean": 0.0, "time_std": 1.0, "shift": 1.0, "cosine_weight": 0.0,
                "repa_weight": 0.0}


@torch.no_grad()
def latent_statistics(dataset: CodesDataset, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-element mean and std of every stored view of every readable image (float64 accumulation)."""
    if dataset.kind != "latents":
        raise ValueError(f"{str(dataset.path)!r} holds {dataset.kind}; latent statistics need continuous latents")
    total = count = squares = 0
    for start in range(0, len(dataset.rows), batch_size):
        rows = dataset.rows[start:start + batch_size]
        values = torch.from_numpy(dataset.values[rows].astype("float64")).flatten(0, 1)
        total = total + values.sum(0)
        squares = squares + values.pow(2).sum(0)
        count += len(values)
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    return {"mean": mean.float(), "std": std.float().clamp_min(1e-6)}


def write_latent_statistics(latents: str | Path) -> Path:
    """``vfmtok latent-stats``: measure and store ``latent_stats.safetensors`` in an extraction directory."""
    stats = latent_statistics(CodesDataset(latents))
    path = Path(latents) / LATENT_STATS_NAME
    with atomic_file(path) as temporary:
        save_file(stats, str(temporary))
    return path


class FlowTask(TrainingTask):
    """Flow matching (velocity prediction on the linear interpolant) on normalised latents."""

    export_name = "generator"

    def __init__(self, model: nn.Module, stats: dict[str, torch.Tensor], options: dict[str, Any],
                 tokenizer: Optional[nn.Module] = None, sample_guidance_scale: float = 1.5, sample_steps: int = 50):
        self.model = model
        self.stats = stats
        self.options = options
        self.tokenizer = tokenizer
        self.sample_guidance_scale = sample_guidance_scale
        self.sample_steps = sample_steps

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def prepare(self, accelerator, prepared: dict[str, nn.Module]) -> None:
        self.wrapped = prepared["model"]
        self.stats = {k: v.to(accelerator.device) for k, v in self.stats.items()}
        if self.tokenizer is not None:
            self.tokenizer.to(accelerator.device).eval().requires_grad_(False)

    def losses(self, batch: dict[str, Any], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        from generators.transport import flow_matching_loss

        labels = batch["labels"]
        if (labels < 0).any():
            raise ValueError("class-conditional flow training needs a class label for every image; the data has "
                             "unlabeled images (label -1)")
        if "values" in batch:
            latents = batch["values"]
        else:  # online tokenization: the tokenizer is frozen
            with torch.no_grad():
                latents = self.tokenizer.encode(batch["images"])
        latents = (latents - self.stats["mean"]) / self.stats["std"]
        options = {k: v for k, v in self.options.items() if k != "repa_weight"}
        repa_weight = self.options["repa_weight"]
        if repa_weight == 0:
            loss, logs = flow_matching_loss(self.wrapped, latents, labels, **options)
        else:  # REPA: align the trunk's tokens with the frozen VFM's last-layer features of the same images
            from generators.transport import repa_alignment_loss

            captured = {}

            def velocity(x, t, y):
                out, captured["projection"] = self.wrapped(x, t, y, return_alignment=True)
                return out

            loss, logs = flow_matching_loss(velocity, latents, labels, **options)
            target = self.tokenizer.vfm(batch["images"]).levels[-1]
            alignment = repa_alignment_loss(captured["projection"], target)
            loss = loss + repa_weight * alignment
            logs = {**logs, "loss": float(loss.detach()), "repa": float(alignment.detach())}
        yield "model", loss, {f"model/{k}": v for k, v in logs.items()}

    def sample_images(self, model: nn.Module, batch, count: int):
        """Images for ``count`` classes spread over the label range: Euler ODE with CFG, fixed noise."""
        if self.tokenizer is None:
            return None
        from generators.transport import guided_model, sample_ode

        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)  # never the global RNG: exact resume
        classes = torch.linspace(0, model.config.num_classes - 1, count, device=device).long()
        noise = torch.randn((count, *model.latent_shape), generator=generator, device=device)
        guided = guided_model(model, self.sample_guidance_scale, null_class=model.null_class)
        latents = sample_ode(guided, noise, classes, self.sample_steps, shift=self.options["shift"])
        latents = latents * self.stats["std"] + self.stats["mean"]
        return self.tokenizer.decode(latents), count

    def export(self, model: nn.Module, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            model.save_pretrained(staging)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.stats.items()}, str(staging / LATENT_STATS_NAME))


def train_flow(config: str | Path, output_dir: str | Path, latents: Optional[str] = None, data: Optional[str] = None,
               tokenizer: Optional[str] = None, latent_stats: Optional[str] = None, vfm_weights: Optional[str] = None,
               max_steps: Optional[int] = None, resume: bool = False,
               overrides: Optional[dict[str, Any]] = None) -> Path:
    """Train the denoiser a config describes on extracted ``latents``, or on images ``data`` encoded online by
    ``tokenizer`` (then ``latent_stats``, a ``latent_stats.safetensors`` measured with ``vfmtok latent-stats`` on
    extracted latents, is required). The ``flow:`` section of the config sets the time sampling (``time_schedule``
    uniform / logit_normal, ``time_mean``, ``time_std``), ``shift`` and ``cosine_weight``. A tokenizer also decodes
    the sample grids. Returns the exported EMA model."""
    if (latents is None) == (data is None):
        raise ValueError("give exactly one of --latents (from `vfmtok extract`) and --data (images, with --tokenizer)")
    if data is not None and (tokenizer is None or latent_stats is None):
        raise ValueError("--data needs --tokenizer (to encode the images online) and --latent-stats (a "
                         "latent_stats.safetensors from `vfmtok latent-stats`)")
    run = load_config(config)
    training = TrainingConfig.from_run(run, overrides, max_steps=max_steps)
    options = {**FLOW_OPTIONS, **run.get("flow", {})}
    unknown = sorted(set(options) - set(FLOW_OPTIONS))
    if unknown:
        raise ValueError(f"{run['_path']}: unknown flow option(s) {unknown}; known: {sorted(FLOW_OPTIONS)}")
    set_seed(training.seed)  # python, numpy and torch, before the model is built
    model = build_model(run)
    tok = load_tokenizer(tokenizer, vfm_weights) if tokenizer is not None else None
    if tok is not None and tuple(tok.latent_shape) != tuple(model.latent_shape):
        raise ValueError(f"tokenizer {tokenizer!r} makes latents of shape {list(tok.latent_shape)}; the config "
                         f"expects {list(model.latent_shape)}")
    if latents is not None:
        dataset = CodesDataset(latents)
        if dataset.kind != "latents":
            raise ValueError(f"{latents!r} holds {dataset.kind}; the flow denoiser trains on continuous latents")
        if tuple(dataset.meta["shape"]) != tuple(model.latent_shape):
            raise ValueError(f"latents {latents!r} have shape {dataset.meta['shape']}; the config expects "
                             f"{list(model.latent_shape)}")
        stats_path = Path(latent_stats) if latent_stats else Path(latents) / LATENT_STATS_NAME
        if not stats_path.is_file():
            write_latent_statistics(latents)
    else:
        if tok.is_discrete:
            raise ValueError(f"tokenizer {tokenizer!r} is discrete; the flow denoiser needs a continuous one")
        dataset = ImageDataset(load_image_dataset(data), tok.config.image_size, augment=training.augment,
                               flip=training.flip)
        stats_path = Path(latent_stats)
    if options["repa_weight"] > 0 and (data is None or model.repa_projector is None):
        raise ValueError("flow.repa_weight > 0 aligns with the frozen VFM's features of the images: it needs --data "
                         "with --tokenizer (online encoding) and a model config with repa_layer / repa_dim")
    stats = load_file(str(stats_path))
    if tuple(stats["mean"].shape) != tuple(model.latent_shape):
        raise ValueError(f"latent statistics {str(stats_path)!r} have shape {list(stats['mean'].shape)}; the config "
                         f"expects {list(model.latent_shape)}")
    run_config = {"model": run["model"], "params": run["params"], "data": str(latents or data), "flow": options,
                  "tokenizer": tokenizer, "config_file": run["_path"]}
    sampling = run.get("sampling", {})
    task = FlowTask(model, stats, options, tok, sample_guidance_scale=float(sampling.get("guidance_scale", 1.5)),
                    sample_steps=int(sampling.get("steps", 50)))
    return Trainer(task, training, output_dir, dataset, run_config=run_config).fit(resume=resume)
