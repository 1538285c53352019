"""``vfmtok train flow``: train the flow denoiser (:class:`vfmtok.generators.DiTModel`) over continuous tokenizer latents with
the shared trainer, from latents extracted by ``vfmtok extract`` (a continuous tokenizer) or encoded online.

Latents are normalised per element with statistics measured over the extracted dataset (``vfmtok latent-stats``,
``latent_stats.safetensors``: ``mean`` and ``std`` of shape (C, h, w)). The statistics are stored in the model
(:meth:`vfmtok.generators.DiTModel.set_latent_statistics`), so the exported denoiser de-normalises what it generates by itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from vfmtok.generators.convert_dit import check_latent_statistics, read_latent_statistics
from vfmtok.tokenizer.utils.atomic import atomic_file
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError
from vfmtok.pipelines.train.extract import CodesDataset
from vfmtok.pipelines.train.stage_two import StageTwoTask, prepare_stage_two_run
from vfmtok.pipelines.train.trainer import Trainer

__all__ = ["FlowTask", "train_flow", "latent_statistics", "write_latent_statistics", "LATENT_STATS_NAME"]

LATENT_STATS_NAME = "latent_stats.safetensors"


@torch.no_grad()
def latent_statistics(dataset: CodesDataset, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-element mean and std of every stored view of every readable image (float64 accumulation)."""
    if dataset.kind != "latents":
        raise InvalidValueError(f"{str(dataset.path)!r} holds {dataset.kind}; latent statistics need continuous "
                                "latents")
    total = count = squares = 0
    nonfinite, bad_rows = 0, []
    for start in range(0, len(dataset.rows), batch_size):
        rows = dataset.rows[start:start + batch_size]
        values = torch.from_numpy(dataset.values[rows].astype("float64"))
        finite = torch.isfinite(values)
        if not finite.all():  # a NaN / inf latent would make every statistic of its element NaN
            nonfinite += int((~finite).sum())
            bad_rows.extend(int(r) for r in rows[(~finite).flatten(1).any(1).numpy()])
            continue
        values = values.flatten(0, 1)
        total = total + values.sum(0)
        squares = squares + values.pow(2).sum(0)
        count += len(values)
    if nonfinite:
        raise InvalidValueError(
            f"{str(dataset.path / (dataset.kind + '.npy'))!r} holds {nonfinite} non-finite (NaN / inf) value(s) in "
            f"{len(bad_rows)} image(s) (rows {bad_rows[:10]}): latent statistics of them would be NaN. Extract "
            f"again (a tokenizer that encodes to NaN / inf, or float16 overflow), or leave those rows out")
    if count == 0:
        raise InvalidValueError(f"{str(dataset.path)!r} has no readable image: no latent statistics")
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    return {"mean": mean.float(), "std": std.float().clamp_min(1e-6)}


def write_latent_statistics(latents: str | Path) -> Path:
    """``vfmtok latent-stats``: measure and store ``latent_stats.safetensors`` in an extraction directory; statistics
    that are not finite (or a std that is not > 0) are refused, not written."""
    stats = latent_statistics(CodesDataset(latents))
    path = Path(latents) / LATENT_STATS_NAME
    check_latent_statistics(stats["mean"], stats["std"], f"latent statistics for {str(path)!r} (not written)")
    with atomic_file(path) as temporary:
        save_file(stats, str(temporary))
    return path


class FlowTask(StageTwoTask):
    """Flow matching (velocity prediction on the linear interpolant) on latents normalised by the model's
    statistics."""

    def __init__(self, model: nn.Module, options: dict[str, Any], tokenizer: Optional[nn.Module] = None,
                 sample_guidance_scale: float = 1.5, sample_steps: int = 50):
        super().__init__(model, tokenizer, sample_guidance_scale)
        self.options = options
        self.sample_steps = sample_steps

    def losses(self, batch: dict[str, Any], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        from vfmtok.generators.transport import flow_matching_loss, repa_alignment_loss

        latents, labels = self.inputs(batch)
        latents = self.model.normalize_latents(latents)
        options = {k: v for k, v in self.options.items() if k != "repa_weight"}
        repa_weight = self.options["repa_weight"]
        if repa_weight == 0:
            loss, logs = flow_matching_loss(self.wrapped, latents, labels, **options)
        else:  # REPA: align the trunk's tokens with the frozen encoder's last-layer features of the same images
            captured = {}

            def velocity(x, t, y):
                out, captured["projection"] = self.wrapped(x, t, y, return_alignment=True)
                return out

            loss, logs = flow_matching_loss(velocity, latents, labels, **options)
            target = self.tokenizer.frozen_encoder(batch["images"]).levels[-1]
            alignment = repa_alignment_loss(captured["projection"], target)
            loss = loss + repa_weight * alignment
            logs = {**logs, "loss": float(loss.detach()), "repa": float(alignment.detach())}
        yield "model", loss, {f"model/{k}": v for k, v in logs.items()}

    def sample_images(self, model: nn.Module, batch, count: int):
        """Images for ``count`` classes spread over the label range: Euler ODE with CFG, fixed noise."""
        if self.tokenizer is None:
            return None
        from vfmtok.generators.transport import guided_model, sample_ode

        device, generator, classes = self.sample_setup(model, count)
        noise = torch.randn((count, *model.latent_shape), generator=generator, device=device)
        guided = guided_model(model, self.sample_guidance_scale, null_class=model.null_class)
        latents = sample_ode(guided, noise, classes, self.sample_steps, shift=self.options["shift"])
        return self.tokenizer.decode(model.denormalize_latents(latents)), count


def check_latents_fit(model: nn.Module, layout: dict[str, Any], what: str) -> None:
    if tuple(layout["shape"]) != tuple(model.latent_shape):
        raise InvalidValueError(f"{what} has latents of shape {list(layout['shape'])}; the config expects "
                                f"{list(model.latent_shape)}")


def train_flow(config: str | Path, output_dir: str | Path, latents: Optional[str] = None, data: Optional[str] = None,
               tokenizer: Optional[str] = None, latent_stats: Optional[str] = None, vfm_weights: Optional[str] = None,
               max_steps: Optional[int] = None, resume: bool = False,
               overrides: Optional[dict[str, Any]] = None,
               allow_changes: Sequence[str] = ()) -> Path:
    """Train the denoiser a config describes on extracted ``latents``, or on images ``data`` encoded online by
    ``tokenizer`` (then ``latent_stats``, a ``latent_stats.safetensors`` measured with ``vfmtok latent-stats`` on
    extracted latents, is required). The ``flow:`` section of the config sets the time sampling (``time_schedule``
    uniform / logit_normal, ``time_mean``, ``time_std``), ``shift``, ``cosine_weight`` and ``repa_weight``. A
    tokenizer also decodes the sample grids. Returns the exported EMA model."""
    if data is not None and latent_stats is None:
        raise InvalidValueError("--data needs --latent-stats (a latent_stats.safetensors from `vfmtok latent-stats`)")
    setup = prepare_stage_two_run("latents", config, latents, data, tokenizer, vfm_weights, max_steps, overrides,
                                  check_latents_fit)
    options, model = setup.run["flow"], setup.model
    if options["repa_weight"] > 0 and (data is None or model.repa_projector is None):
        raise InvalidValueError("flow.repa_weight > 0 aligns with the frozen encoder's features of the images: it "
                                "needs --data with --tokenizer (online encoding) and a model config with repa_layer / "
                                "repa_dim")
    stats_path = Path(latent_stats) if latent_stats else Path(latents) / LATENT_STATS_NAME
    if latent_stats is None and not stats_path.is_file():
        write_latent_statistics(latents)
    if not stats_path.is_file():
        raise MissingFileError(f"latent statistics {str(stats_path)!r} do not exist")
    model.set_latent_statistics(*read_latent_statistics(stats_path))  # 'mean' and 'std', finite, std > 0
    setup.run_config["flow"] = options
    task = FlowTask(model, options, setup.tokenizer, sample_guidance_scale=setup.sampling["guidance_scale"],
                    sample_steps=setup.sampling["steps"])
    trainer = Trainer(task, setup.training, output_dir, setup.dataset, run_config=setup.run_config)
    return trainer.fit(resume=resume, allow_changes=tuple(allow_changes))
