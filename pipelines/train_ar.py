"""``vfmtok train ar``: train the LlamaGen-style GPT (:class:`generators.GPTModel`) over discrete tokenizer codes with
the shared trainer, from pre-extracted codes (``vfmtok extract``) or by tokenizing images online."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from accelerate.utils import set_seed
import torch
import torch.nn.functional as F
from torch import nn

from .codes import CodesDataset, load_tokenizer
from .config import build_model, load_config
from .data import ImageDataset, load_image_dataset
from .trainer import Trainer, TrainingConfig, TrainingTask

__all__ = ["ARTask", "train_ar", "ar_validation_loss"]


class ARTask(TrainingTask):
    """Next-token cross-entropy of a class-conditional GPT; label dropout (for CFG) happens inside the model."""

    export_name = "generator"

    def __init__(self, model: nn.Module, tokenizer: Optional[nn.Module] = None, sample_guidance_scale: float = 2.0):
        self.model = model
        self.tokenizer = tokenizer  # online tokenization and sample grids
        self.sample_guidance_scale = sample_guidance_scale

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def prepare(self, accelerator, prepared: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.wrapped = prepared["model"]
        if self.tokenizer is not None:
            self.tokenizer.to(accelerator.device).eval().requires_grad_(False)

    def tokens_of(self, batch: dict[str, Any]) -> torch.Tensor:
        if "values" in batch:
            return batch["values"]
        with torch.no_grad():  # online tokenization: the tokenizer is frozen
            return self.tokenizer.encode(batch["images"])

    def losses(self, batch: dict[str, Any], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        labels = batch["labels"]
        if (labels < 0).any():
            raise ValueError("class-conditional AR training needs a class label for every image; the data has "
                             "unlabeled images (label -1)")
        tokens = self.tokens_of(batch)
        logits = self.wrapped(tokens, labels)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        yield "model", loss, {"model/loss": float(loss.detach())}

    def sample_images(self, model: nn.Module, batch, count: int):
        """Images generated for ``count`` classes spread over the label range (fixed seed, CFG)."""
        if self.tokenizer is None:
            return None
        device = next(model.parameters()).device
        classes = torch.linspace(0, model.config.num_classes - 1, count, device=device).long()
        generator = torch.Generator(device=device).manual_seed(0)  # never the global RNG: exact resume
        tokens = model.generate(classes, guidance_scale=self.sample_guidance_scale, generator=generator)
        return self.tokenizer.decode(tokens), count


def check_codes_match(model: nn.Module, vocab_size: Optional[int], num_tokens: int, what: str) -> None:
    if vocab_size != model.config.vocab_size or num_tokens != model.config.num_tokens:
        raise ValueError(f"{what} has a vocabulary of {vocab_size} and {num_tokens} tokens per image; the GPT config "
                         f"expects vocab_size {model.config.vocab_size} and num_tokens {model.config.num_tokens}")


def train_ar(config: str | Path, output_dir: str | Path, codes: Optional[str] = None, data: Optional[str] = None,
             tokenizer: Optional[str] = None, vfm_weights: Optional[str] = None, max_steps: Optional[int] = None,
             resume: bool = False, overrides: Optional[dict[str, Any]] = None) -> Path:
    """Train the GPT a config describes on ``codes`` (an extraction directory) or on ``data`` tokenized online by
    ``tokenizer``. A tokenizer given with codes is used for the sample grids. Returns the exported EMA model."""
    if (codes is None) == (data is None):
        raise ValueError("give exactly one of --codes (an extraction directory) and --data (images, with --tokenizer)")
    if data is not None and tokenizer is None:
        raise ValueError("--data needs --tokenizer to tokenize the images online")
    run = load_config(config)
    training = TrainingConfig.from_run(run, overrides, max_steps=max_steps)
    set_seed(training.seed)  # python, numpy and torch, before the model is built
    model = build_model(run)
    tok = load_tokenizer(tokenizer, vfm_weights) if tokenizer is not None else None
    if tok is not None:
        if not tok.is_discrete:
            raise ValueError(f"tokenizer {tokenizer!r} is continuous; the AR model needs a discrete (VQ) tokenizer")
        check_codes_match(model, tok.config.codebook_size, tok.num_tokens, f"tokenizer {tokenizer!r}")
    if codes is not None:
        dataset = CodesDataset(codes)
        if dataset.kind != "codes":
            raise ValueError(f"{codes!r} holds {dataset.kind}, not discrete codes")
        check_codes_match(model, dataset.meta["vocab_size"], dataset.meta["shape"][0], f"codes {codes!r}")
    else:
        dataset = ImageDataset(load_image_dataset(data), tok.config.image_size, augment=training.augment,
                               flip=training.flip)
    run_config = {"model": run["model"], "params": run["params"], "data": str(codes or data),
                  "tokenizer": tokenizer, "config_file": run["_path"]}
    task = ARTask(model, tok, sample_guidance_scale=float(run.get("sampling", {}).get("guidance_scale", 2.0)))
    return Trainer(task, training, output_dir, dataset, run_config=run_config).fit(resume=resume)


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
