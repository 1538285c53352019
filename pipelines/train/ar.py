"""``vfmtok train ar``: train an autoregressive generator over discrete tokenizer codes (any family of
:class:`vfmtok.generators.interface.AutoregressiveGeneratorMixin`: the LlamaGen-style GPT, RAR with its random-order
training and randomness annealing) with the shared trainer, from pre-extracted codes (``vfmtok extract``) or by
tokenizing images online."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.pipelines.train.extract import CodesDataset
from vfmtok.pipelines.train.stage_two import StageTwoTask, prepare_stage_two_run
from vfmtok.pipelines.train.trainer import Trainer

__all__ = ["ARTask", "train_ar", "ar_validation_loss"]


class ARTask(StageTwoTask):
    """Next-token cross-entropy of a class-conditional AR generator: its forward returns logits aligned with the
    tokens whatever order it generated them in. Label dropout (for CFG) and RAR's order randomisation happen inside
    the model (torch's global RNG, saved with every checkpoint); ``on_train_step`` sets the model's per-step
    schedules (RAR's permutation probability) before each micro-batch."""

    def __init__(self, model: nn.Module, tokenizer: Optional[nn.Module] = None, sample_guidance_scale: float = 1.0,
                 sample_options: Optional[dict[str, Any]] = None):
        super().__init__(model, tokenizer, sample_guidance_scale)
        self.sample_options = dict(sample_options or {})

    def losses(self, batch: dict[str, Any], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        tokens, labels = self.inputs(batch)
        self.model.on_train_step(step)
        logits = self.wrapped(tokens, labels)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        yield "model", loss, {"model/loss": float(loss.detach())}

    def sample_images(self, model: nn.Module, batch, count: int):
        """Images generated for ``count`` classes spread over the label range (fixed seed, CFG)."""
        if self.tokenizer is None:
            return None
        _, generator, classes = self.sample_setup(model, count)
        tokens = model.generate(classes, guidance_scale=self.sample_guidance_scale, generator=generator,
                                **self.sample_options)
        return self.tokenizer.decode(tokens), count


def check_codes_fit(model: nn.Module, layout: dict[str, Any], what: str) -> None:
    if layout["vocab_size"] != model.config.vocab_size or layout["num_tokens"] != model.config.num_tokens:
        raise InvalidValueError(f"{what} has a vocabulary of {layout['vocab_size']} and {layout['num_tokens']} tokens "
                                f"per image; the {type(model).__name__} config expects vocab_size "
                                f"{model.config.vocab_size} and "
                                f"num_tokens {model.config.num_tokens}")
    expected = list(model.codebook_sizes)
    if layout.get("codebook_sizes") is not None and list(layout["codebook_sizes"]) != expected:
        raise InvalidValueError(f"{what} has codebooks {list(layout['codebook_sizes'])} (one code of each per grid "
                                f"cell); the {type(model).__name__} config expects codebook_sizes {expected}")


def train_ar(config: str | Path, output_dir: str | Path, codes: Optional[str] = None, data: Optional[str] = None,
             tokenizer: Optional[str] = None, vfm_weights: Optional[str] = None, max_steps: Optional[int] = None,
             resume: bool = False, overrides: Optional[dict[str, Any]] = None,
             allow_changes: Sequence[str] = ()) -> Path:
    """Train the AR generator (GPT, RAR) a config describes on ``codes`` (an extraction directory) or on ``data`` tokenized online by
    ``tokenizer``. A tokenizer given with codes is used for the sample grids. Returns the exported EMA model."""
    setup = prepare_stage_two_run("codes", config, codes, data, tokenizer, vfm_weights, max_steps, overrides,
                                  check_codes_fit)
    options = {k: v for k, v in setup.sampling.items() if k != "guidance_scale" and v is not None}
    task = ARTask(setup.model, setup.tokenizer, sample_guidance_scale=setup.sampling["guidance_scale"],
                  sample_options=options)
    trainer = Trainer(task, setup.training, output_dir, setup.dataset, run_config=setup.run_config)
    return trainer.fit(resume=resume, allow_changes=tuple(allow_changes))


@torch.no_grad()
def ar_validation_loss(model: nn.Module, dataset: CodesDataset, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over every image of ``dataset`` (first view), without label dropout."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[(i, 0)] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = CodesDataset.collate(samples)
        tokens = batch["values"].to(next(model.parameters()).device)
        logits = model(tokens, batch["labels"].to(tokens.device))
        total += F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum").item()
        count += tokens.numel()
    return total / count
