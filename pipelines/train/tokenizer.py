"""``vfmtok train tokenizer``: train a tokenizer of any family (VFMTok / VFMAE, DINO-Tok, GloTok) with the shared
trainer.

A config file has three sections: ``params`` (the model), ``loss`` (:class:`vfmtok.tokenizer.losses.TokenizerLoss`
arguments) and ``training`` (:class:`vfmtok.pipelines.config.TrainingConfig`). The paper recipe lives in
``configs/tokenizer/vfmtok-l.yaml`` / ``vfmae-l.yaml``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from accelerate.utils import set_seed
import torch
from torch import nn

from vfmtok.pipelines.config import TrainingConfig, build_model, load_config
from vfmtok.pipelines.data import ImageDataset, StreamingImageDataset, collate_images, load_image_dataset
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.pipelines.train.trainer import Trainer, TrainingTask

__all__ = ["TokenizerTask", "train_tokenizer"]

logger = logging.getLogger(__name__)


class TokenizerTask(TrainingTask):
    """Reconstruction + semantic + VQ (+ perceptual, + GAN) training of a tokenizer (its ``forward`` returns the
    reconstruction and its own loss terms, see :class:`vfmtok.tokenizer.VFMTokOutput`). The export is the model's own
    ``save_pretrained``, which carries the frozen encoder's weights when no config names them."""

    export_name = "tokenizer"

    def __init__(self, model: nn.Module, loss: nn.Module, feature_cache=None):
        self.model = model
        self.loss = loss
        self.feature_cache = feature_cache
        self.discriminator = loss.discriminator

    def modules(self) -> dict[str, nn.Module]:
        modules = {"model": self.model}
        if self.discriminator is not None and self.loss.gan_weight > 0:
            modules["discriminator"] = self.discriminator
        return modules

    def prepare(self, accelerator, prepared: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.model = prepared["model"]  # wrapped (DDP ...) for the forward pass
        # The generator's adversarial term runs the plain discriminator (its weights are not being updated then);
        # the discriminator update runs the wrapped one so that its gradients are synchronised.
        self.wrapped_discriminator = prepared.get("discriminator")

    def losses(self, batch: dict[str, Any], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        images = batch["images"]
        features = None
        if self.feature_cache is not None:
            features = self.feature_cache.features(batch["indices"], device=images.device)
        output = self.model(images, vfm_features=features)
        unwrapped = self.accelerator.unwrap_model(self.model)
        last_layer = unwrapped.last_decoder_layer if self.loss.use_adaptive_weight else None
        loss, logs = self.loss.generator_loss(output, step, last_layer=last_layer)
        logs = {f"model/{k}": v for k, v in logs.items()}
        logs["model/loss"] = float(loss.detach())
        if output.codebook_usage is not None:  # the model's own training statistic
            logs["model/codebook_usage"] = float(output.codebook_usage)
        yield "model", loss, logs
        if self.wrapped_discriminator is not None and self.loss.discriminator_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(output, step, discriminator=self.wrapped_discriminator)
            yield "discriminator", d_loss, {f"discriminator/{k}": v for k, v in d_logs.items()}

    def sample_images(self, model: nn.Module, batch, count: int) -> Optional[tuple[torch.Tensor, int]]:
        """Inputs (top row) above their reconstructions (none for a streamed dataset)."""
        if batch is None:
            return None
        images = batch["images"]
        reconstructions = model.decode(model.encode(images), output_size=images.shape[-1])
        return torch.cat([images, reconstructions]), len(images)


def train_tokenizer(config: str | Path, data: str, output_dir: str | Path, max_steps: Optional[int] = None,
                    resume: bool = False, feature_cache: Optional[str] = None, vfm_weights: Optional[str] = None,
                    streaming: Optional[bool] = None, overrides: Optional[dict[str, Any]] = None,
                    allow_changes: Sequence[str] = (), init_from: Optional[str] = None,
                    random_vfm_intended: bool = False) -> Path:
    """Train the tokenizer a config describes on ``data`` (see :func:`vfmtok.pipelines.data.load_image_dataset`).

    ``vfm_weights`` overrides the VFM source of the config (Hub id, local directory or official ``.pth``); a config
    without any (the tiny test configs) trains on a randomly initialised VFM and says so. ``overrides`` replaces
    ``training`` options. ``init_from``: a saved tokenizer folder whose matching weights (names and shapes) start the
    model (see :func:`vfmtok.pipelines.train.tokenizer_stats.init_from_pretrained`; e.g. DINO-Tok VQ from its AE with PCA
    statistics). ``random_vfm_intended``: a config without VFM weights is meant to train on a random VFM (the
    quickstart): logged, not warned about. Returns the directory of the exported EMA tokenizer.
    """
    from vfmtok.tokenizer.interface import ImageTokenizerMixin
    from vfmtok.tokenizer.losses import TokenizerLoss

    run = load_config(config)
    training = TrainingConfig.from_run(run, overrides, max_steps=max_steps, feature_cache=feature_cache,
                                       streaming=streaming)
    set_seed(training.seed)  # python, numpy and torch, before the model is built
    model = build_model(run)
    if not isinstance(model, ImageTokenizerMixin):
        raise InvalidValueError(f"{run['_path']}: `vfmtok train tokenizer` trains tokenizer configs, got "
                                f"{run['model']}")
    if init_from is not None:
        from vfmtok.pipelines.train.tokenizer_stats import init_from_pretrained

        init_from_pretrained(model, init_from)
    encoder = model.frozen_encoder
    if encoder is not None and (vfm_weights is not None or encoder.pretrained is not None):
        model.load_vfm_weights(vfm_weights)
    elif encoder is not None:
        (logger.info if random_vfm_intended else logger.warning)(
            "%s names no VFM weights: training on a randomly initialised VFM", run["_path"])
    if encoder is not None and training.compile:
        encoder.compile_blocks()  # the trained part is compiled by the trainer
    loss = TokenizerLoss(**run["loss"])

    size = model.input_size
    cached = training.feature_cache is not None
    if training.streaming:
        if cached:
            raise InvalidValueError("a feature cache needs a fixed (not streamed) dataset")
        from accelerate import PartialState

        processes = PartialState()
        dataset = StreamingImageDataset(load_image_dataset(data, streaming=True), size, seed=training.seed,
                                        augment=training.augment, flip=training.flip,
                                        shuffle_buffer=training.shuffle_buffer, rank=processes.process_index,
                                        world_size=processes.num_processes)
        sample_dataset = None
    else:
        source = load_image_dataset(data)
        # Cached features are those of the centre crop, so training from a cache uses it without flips.
        dataset = ImageDataset(source, size, augment="center" if cached else training.augment,
                               flip=False if cached else training.flip)
        sample_dataset = ImageDataset(source, size, augment="center", flip=False)
    run_config = {"model": run["model"], "params": run["params"], "loss": run["loss"], "data": str(data),
                  "config_file": run["_path"]}
    if init_from is not None:
        run_config["init_from"] = str(init_from)
    task = TokenizerTask(model, loss)
    trainer = Trainer(task, training, output_dir, dataset, sample_dataset=sample_dataset, run_config=run_config)
    if cached:
        if encoder is None:
            raise InvalidValueError(f"{run['_path']}: a feature cache stores a frozen encoder's features; "
                                    f"{run['model']} has none")
        task.feature_cache = open_or_build_feature_cache(trainer.accelerator, model, sample_dataset,
                                                         training.feature_cache, str(data), training)
    return trainer.fit(resume=resume, allow_changes=tuple(allow_changes))


def open_or_build_feature_cache(accelerator, model, dataset: ImageDataset, path: str, source: str,
                                training: TrainingConfig):
    """Open the cache at ``path``, building it first (on the main process) if it does not exist yet."""
    from vfmtok.tokenizer.feature_cache import VFMFeatureCache

    model.to(accelerator.device)
    if accelerator.is_main_process and not (Path(path) / "meta.json").is_file():
        loader = torch.utils.data.DataLoader(dataset, batch_size=training.batch_size, num_workers=training.num_workers,
                                             collate_fn=collate_images, generator=torch.Generator())
        batches = ((batch["indices"], batch["images"]) for batch in loader if len(batch["images"]))
        logger.info("caching frozen-VFM features of %d images into %s", len(dataset), path)
        VFMFeatureCache.build(model.frozen_encoder, batches, len(dataset), path, source=source,
                              image_size=dataset.image_size,
                              device=accelerator.device)
    accelerator.wait_for_everyone()
    cache = VFMFeatureCache(path)
    cache.check_compatible(model.frozen_encoder, source=source, image_size=dataset.image_size, num_images=len(dataset))
    return cache
