"""What the two stage-two tasks (the AR GPT over codes, the flow denoiser over latents) share: a frozen tokenizer of
the right kind, training data that is either pre-extracted (``vfmtok extract``) or images encoded online, class
labels for every image, and class-conditional sample grids."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate.utils import set_seed
from torch import nn

from vfmtok.pipelines.config import TrainingConfig, build_model, load_config
from vfmtok.pipelines.data import ImageDataset, load_image_dataset
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.pipelines.train.extract import CodesDataset, load_tokenizer
from vfmtok.pipelines.train.trainer import TrainingTask

__all__ = ["StageTwoTask", "StageTwoRun", "prepare_stage_two_run"]

# What each kind of stage-two data needs from the tokenizer.
_DISCRETE = {"codes": True, "latents": False}


class StageTwoTask(TrainingTask):
    """A class-conditional generator trained on a frozen tokenizer's outputs; subclasses define the loss."""

    export_name = "generator"

    def __init__(self, model: nn.Module, tokenizer: Optional[nn.Module] = None, sample_guidance_scale: float = 1.0):
        self.model = model
        self.tokenizer = tokenizer  # online encoding and sample grids
        self.sample_guidance_scale = sample_guidance_scale

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def prepare(self, accelerator, prepared: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.wrapped = prepared["model"]
        if self.tokenizer is not None:
            self.tokenizer.to(accelerator.device).eval().requires_grad_(False)

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes or latents, class labels) of a batch; images are encoded by the frozen tokenizer."""
        labels = batch["labels"]
        if (labels < 0).any():
            raise InvalidValueError("class-conditional training needs a class label for every image; the data has "
                                    "unlabeled images (label -1)")
        if "values" in batch:
            return batch["values"], labels
        with torch.no_grad():
            return self.tokenizer.encode(batch["images"]), labels

    def sample_setup(self, model: nn.Module, count: int) -> tuple[torch.device, torch.Generator, torch.Tensor]:
        """(device, a private generator seeded 0, ``count`` classes spread over the label range) for sample grids;
        never the global RNG, so that resumed runs stay exact."""
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        classes = torch.linspace(0, model.config.num_classes - 1, count, device=device).long()
        return device, generator, classes


class StageTwoRun:
    """The loaded pieces of a stage-two run: config, training options, model, tokenizer and dataset."""

    def __init__(self, run: dict[str, Any], training: TrainingConfig, model: nn.Module, tokenizer, dataset,
                 data: str, tokenizer_source: Optional[str]):
        self.run, self.training, self.model, self.tokenizer, self.dataset = run, training, model, tokenizer, dataset
        self.run_config = {"model": run["model"], "params": run["params"], "data": data,
                           "tokenizer": tokenizer_source, "config_file": run["_path"]}

    @property
    def sampling(self) -> dict[str, Any]:
        return self.run.get("sampling", {})


def prepare_stage_two_run(kind: str, config: str | Path, values: Optional[str], data: Optional[str],
                          tokenizer: Optional[str], vfm_weights: Optional[str], max_steps: Optional[int],
                          overrides: Optional[dict[str, Any]],
                          check_fits: Callable[[nn.Module, dict[str, Any], str], None]) -> StageTwoRun:
    """Load everything a stage-two run of ``kind`` ("codes" or "latents") trains on: the model the config
    describes, the tokenizer (needed with ``data``; optional with ``values``, then only for sample grids) and either
    the extraction directory ``values`` or the images ``data``. ``check_fits(model, layout, what)`` refuses a
    tokenizer or extraction whose ``layout`` (``vocab_size``/``num_tokens`` or ``shape``) does not fit the model."""
    flag = "--codes" if kind == "codes" else "--latents"
    if (values is None) == (data is None):
        raise InvalidValueError(f"give exactly one of {flag} (from `vfmtok extract`) and --data (images, with "
                                "--tokenizer)")
    if data is not None and tokenizer is None:
        raise InvalidValueError("--data needs --tokenizer to encode the images online")
    run = load_config(config)
    training = TrainingConfig.from_run(run, overrides, max_steps=max_steps)
    set_seed(training.seed)  # python, numpy and torch, before the model is built
    model = build_model(run)
    tok = load_tokenizer(tokenizer, vfm_weights) if tokenizer is not None else None
    if tok is not None:
        if tok.is_discrete != _DISCRETE[kind]:
            raise InvalidValueError(f"tokenizer {tokenizer!r} is {'discrete' if tok.is_discrete else 'continuous'}; "
                                    f"this model trains on {kind} of a "
                                    f"{'discrete' if _DISCRETE[kind] else 'continuous'} tokenizer")
        layout = ({"vocab_size": tok.code_layout.vocab_size, "num_tokens": tok.code_layout.num_tokens,
                   "codebook_sizes": list(tok.code_layout.codebook_sizes)}
                  if tok.is_discrete else {"shape": list(tok.latent_shape)})
        check_fits(model, layout, f"tokenizer {tokenizer!r}")
    if values is not None:
        dataset = CodesDataset(values)
        if dataset.kind != kind:
            raise InvalidValueError(f"{values!r} holds {dataset.kind}; this model trains on {kind}")
        layout = {"vocab_size": dataset.meta.get("vocab_size"), "num_tokens": dataset.meta["shape"][0],
                  "shape": dataset.meta["shape"],
                  "codebook_sizes": (dataset.meta.get("tokenizer") or {}).get("code_layout", {}).get("codebook_sizes")}
        check_fits(model, layout, f"{kind} {values!r}")
    else:
        dataset = ImageDataset(load_image_dataset(data), tok.input_size, augment=training.augment, flip=training.flip)
    return StageTwoRun(run, training, model, tok, dataset, str(values or data), tokenizer)
