"""The training loop shared by every stage (tokenizers now, the generators later).

A *task* says what is trained (its modules, its losses, what to export); the :class:`Trainer` does the rest through
``accelerate``: devices and processes (CPU, one GPU, DDP; FSDP/DeepSpeed through accelerate's own config), mixed
precision, gradient accumulation and clipping, EMA weights, learning-rate schedules, logging (accelerate trackers plus
``metrics.jsonl``), periodic sample grids, and resumable checkpoints.

Exact resume. A checkpoint holds the models, EMA, optimizers, schedulers, GradScaler, every process's RNG states, the
step and the data position (epoch and batch within it). The data order and augmentations are pure functions of
(seed, epoch, index) (see :mod:`vfmtok.pipelines.data`) and the data loader never touches the global RNG, so a run stopped at
step k and resumed follows the uninterrupted run's loss trajectory (bitwise on CPU). So a checkpoint resumes only
into the same run: the run config (model, params, loss, data, tokenizer, flow, ...), every training option that
affects the trajectory (not max_steps with a constant schedule, log_every, checkpoint_every, keep_last_checkpoints,
sample_every, num_sample_images, num_workers, log_with) and the dataset's size must match, else the error names each
difference; ``fit(resume=True, allow_changes=("learning_rate",))`` (``--resume-allow-change``) continues deliberately
with the new values. Every file of the checkpoint must be restored (accelerate's ``load_state`` skips an unreadable
RNG file silently, so the trainer checks them itself); one that cannot be is an error naming the file and the older
checkpoint to fall back to.

Output directory layout::

    .vfmtok.lock                 held (``fcntl.flock``) by the run training in this directory; holds its pid and host
    checkpoints/step-00001000/   accelerate state (model*.safetensors, optimizer*.bin, scheduler*.bin,
                                 random_states_*.pkl), ema.safetensors, trainer_state.json
    metrics.jsonl                one JSON object per logged step
    logs/                        tracker files (TensorBoard)
    samples/step-00001000.png    sample grids (EMA weights)
    <export name>/               the final EMA model, ``save_pretrained`` format

Safety checks. One run at a time per output directory: :meth:`Trainer.fit` takes an exclusive ``flock`` on
``.vfmtok.lock`` (the operating system releases it when the process ends, however it ends, so a killed run never
leaves a stuck lock; the pid and host written into the file only name the holder in the error). With the lock held,
staging directories and temporary files left by a killed run are removed. Labels are checked once before training
(class-conditional tasks: all in ``[0, num_classes)``). Unreadable images are skipped and counted over all
processes, but an epoch without a single readable image, or with more than ``max_unreadable_fraction`` of them
unreadable, stops the run (a micro-batch without a readable image on any process is skipped by every process, which
keeps DDP's gradient synchronisations paired). A full disk while writing a checkpoint is a ``DiskFullError`` that
names it; its staging directory is removed and the last complete checkpoint is untouched. A
non-finite loss or gradient norm stops the run (:class:`TrainingDiverged`), or, for gradients and with
``skip_nonfinite_gradients``, skips that update and counts it; with fp16 loss scaling, overflowing steps are the
GradScaler's to skip (that is how it finds its scale), so they are not errors.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from accelerate.utils import load as load_checkpoint_part
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from vfmtok.pipelines.config import TrainingConfig
from vfmtok.pipelines.data import ImageDataset, ResumableBatchSampler, StreamingImageDataset, build_dataloader
from vfmtok.tokenizer.utils.atomic import (atomic_file, exclusive_lock, give_plain_modes, removed_on_failure,
                                           reporting_disk_full, save_pretrained_atomically, write_text_atomically)
from vfmtok.tokenizer.utils.errors import (CheckpointError, InvalidValueError, MissingFileError, OutputExistsError,
                                    VFMTokError)

__all__ = ["TrainingConfig", "TrainingTask", "Trainer", "TrainingDiverged", "latest_checkpoint"]  # TrainingConfig: re-exported

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
LOCK_NAME = ".vfmtok.lock"
# Training options that never change the trajectory of a run: a resumed run may set them differently. (max_steps
# only while the schedule does not depend on it: cosine / linear decay to max_steps.)
RESUME_FREE_OPTIONS = frozenset({"max_steps", "log_every", "checkpoint_every", "keep_last_checkpoints", "sample_every",
                                 "num_workers", "log_with", "num_sample_images"})
# Run-config keys that only name things (the config file's path: its contents are compared).
RESUME_FREE_RUN_KEYS = frozenset({"config_file"})
# Unreadable-image fraction checked once this many images of an epoch were drawn (or at the epoch's end).
UNREADABLE_CHECK_AFTER = 1000
# What a killed run can leave behind (tokenizer.utils.atomic's staging names, the checkpoint staging directory and
# atomic_file's temporaries of what the trainer writes), per sub-directory of the output directory.
_LEFTOVERS = {
    ".": (re.compile(r"^\..+\.(staging|old)-[^/]+$"), re.compile(r"^\.(run_config\.json|metrics\.jsonl)\..+$")),
    "checkpoints": (re.compile(r"^\.staging-.+$"),),
    "samples": (re.compile(r"^\.step-\d{8}\.png\..+$"),),
}


class TrainingDiverged(VFMTokError, RuntimeError):
    """A loss or gradient norm became NaN or infinite; the run stops and the last good checkpoint stays as it is."""


@contextlib.contextmanager
def output_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of a run's output directory (created if needed) for the ``with`` block.

    ``fcntl.flock`` on ``<output_dir>/.vfmtok.lock``: the kernel releases it when the holder exits or is killed, so a
    lock is never stale; the pid, host and start time written into the file only serve the error message. (On a
    network file system, flock is as reliable as the file system's lock support.)
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / LOCK_NAME, f"{str(directory)!r} is in use by another training run; wait for "
                        f"it to finish or choose another output directory") as path:
        yield path


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Remove the staging directories and temporary files that a killed run left in ``output_dir`` (call it only
    while holding :func:`output_lock`: nothing else writes there then). Returns what was removed."""
    removed = []
    for sub, patterns in _LEFTOVERS.items():
        folder = Path(output_dir) / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name != LOCK_NAME and any(p.match(entry.name) for p in patterns):
                old = re.match(r"^\.(.+)\.old-[^/]+$", entry.name)
                if old and not (folder / old.group(1)).exists():
                    # Killed between the two renames of atomic_directory: this is the only copy; keep it.
                    logger.warning("keeping %s: it holds the previous %s, which is missing", entry, old.group(1))
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                removed.append(entry)
    return removed


class TrainingTask:
    """What a stage trains. Subclasses set ``export_name`` and implement the methods below.

    ``modules()`` maps names to trainable modules; the one named ``model`` gets EMA weights and is exported. Each
    module gets its own optimizer and scheduler. ``losses`` is a generator: for every module to update it yields
    ``(name, loss, logs)``; the trainer back-propagates ``loss``, steps that module's optimizer and resumes the
    generator (so a GAN discriminator loss can use the generator's outputs after the generator update).
    """

    export_name = "model"

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def prepare(self, accelerator: Accelerator, prepared: dict[str, nn.Module]) -> None:
        """Called once the modules are wrapped for distributed training (e.g. to keep the wrapped versions)."""

    def losses(self, batch: dict[str, Any], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        raise NotImplementedError

    def sample_images(self, model: nn.Module, batch: Optional[dict[str, Any]], count: int
                      ) -> Optional[tuple[torch.Tensor, int]]:
        """Images in [-1, 1] for the sample grid and the number per row, or None for no grid. ``batch`` holds the
        first ``count`` images of the sample dataset (None without one). Must not draw from the global RNG (exact
        resume)."""
        raise NotImplementedError

    def export(self, model: nn.Module, directory: Path) -> None:
        save_pretrained_atomically(model, directory)

    def num_classes(self, model: nn.Module) -> Optional[int]:
        """Class-conditional tasks: the number of classes of ``model`` (the unwrapped ``model`` module); every label
        of a map-style dataset is then checked once, before training, to be in ``[0, num_classes)``. None: labels
        are not used. Default: ``model.config.num_classes`` when the model has one."""
        config = getattr(model, "config", None)
        value = config.get("num_classes") if isinstance(config, dict) else getattr(config, "num_classes", None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint directory of a run (staging directories are ignored), or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)))
    return steps[-1][1] if steps else None


def _optimizer(module: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise InvalidValueError(f"{type(module).__name__} has no trainable parameters")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, betas=config.betas,
                                weight_decay=config.weight_decay)
    # AdamW: decay matrices and convolution kernels, not biases, norms, embeddings' 1-D scales, nor what the model
    # names (``no_weight_decay_parameters``: RAR's embeddings and position tables, as its recipe).
    exempt = getattr(module, "no_weight_decay_parameters", lambda: set())()
    groups = [{"params": [p for n, p in named if p.ndim >= 2 and n not in exempt], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named if p.ndim < 2 or n in exempt], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, betas=config.betas)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``lr_warmup_steps``, then constant, or a cosine / linear decay over the remaining steps to
    ``min_learning_rate`` (RAR: cosine to 1e-5, ``utils/lr_schedulers.py``; 0: diffusers' schedules)."""
    if config.lr_scheduler == "constant" or config.min_learning_rate == 0:
        return get_scheduler(config.lr_scheduler if config.lr_scheduler != "constant" else "constant_with_warmup",
                             optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps)
    floor, warmup, total = config.min_learning_rate / config.learning_rate, config.lr_warmup_steps, config.max_steps
    cosine = config.lr_scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _same_location(saved: Any, current: Any) -> bool:
    """Two spellings of one local file or folder (``data/good``, ``./data/good``, its absolute path, a symlink to
    it): the same data, not a different run. Hub ids and anything that does not exist here compare as text."""
    if not (isinstance(saved, str) and isinstance(current, str)):
        return False
    try:
        return os.path.samefile(os.path.expanduser(saved), os.path.expanduser(current))
    except (OSError, ValueError):
        return False


class Trainer:
    """Runs a :class:`TrainingTask` on an image dataset (see the module docstring)."""

    def __init__(self, task: TrainingTask, config: TrainingConfig, output_dir: str | Path,
                 dataset: torch.utils.data.Dataset, sample_dataset: Optional[ImageDataset] = None, run_config: Optional[dict[str, Any]] = None,
                 accelerator: Optional[Accelerator] = None):
        self.task = task
        self.config = config
        self.output_dir = Path(output_dir)
        self.dataset = dataset
        self.sample_dataset = sample_dataset
        self.run_config = run_config or {}
        log_with = [name for name in config.log_with if name != "none"]
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=log_with or None, step_scheduler_with_optimizer=False,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.images_seen = 0
        self.skipped_images = 0
        self.skipped_examples: list[str] = []
        self.skipped_updates = 0  # updates skipped for a non-finite gradient norm (skip_nonfinite_gradients)
        self.resume_changes: list[str] = []  # deliberate differences from the resumed checkpoint's run

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        accelerator, config = self.accelerator, self.config
        modules = self.task.modules()
        if "model" not in modules:
            raise InvalidValueError(f"{type(self.task).__name__}.modules() must contain 'model'")
        self.names = list(modules)
        optimizers = [_optimizer(modules[name], config) for name in self.names]
        schedulers = [_scheduler(optimizer, config) for optimizer in optimizers]
        if config.compile:
            modules["model"].compile()  # in place: parameter names (checkpoints, EMA) stay the same
        prepared = accelerator.prepare(*[modules[n] for n in self.names], *optimizers, *schedulers)
        k = len(self.names)
        self.modules = dict(zip(self.names, prepared[:k]))
        self.optimizers = dict(zip(self.names, prepared[k:2 * k]))
        self.schedulers = dict(zip(self.names, prepared[2 * k:]))
        self.task.prepare(accelerator, self.modules)
        self.model = accelerator.unwrap_model(self.modules["model"])
        self.ema_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.ema = EMAModel(self.ema_parameters, decay=config.ema_decay, foreach=True)
        self.ema.to(accelerator.device)

    def _check_output_dir(self, resume: bool) -> Optional[Path]:
        checkpoint = latest_checkpoint(self.output_dir)
        if not resume and checkpoint is not None:
            raise OutputExistsError(f"{str(self.output_dir)!r} already holds checkpoints (latest {checkpoint.name}); "
                                  f"pass --resume to continue that run or choose another output directory")
        if resume and checkpoint is None:
            logger.info("no checkpoint in %s/checkpoints: starting from step 0", self.output_dir)
        return checkpoint if resume else None

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "images_seen": self.images_seen, "skipped_images": self.skipped_images,
                "skipped_updates": self.skipped_updates,
                "skipped_examples": self.skipped_examples[:20], "ema_optimization_step": self.ema.optimization_step,
                "num_processes": self.accelerator.num_processes, "modules": self.names,
                "config": self.run_config, "training": self.config.to_dict(), "dataset_size": self._dataset_size(),
                "stream_state": self._stream_state()}

    def _dataset_size(self) -> Optional[int]:
        if isinstance(self.dataset, StreamingImageDataset):
            return None
        try:
            return len(self.dataset)
        except TypeError:
            return None

    def _run_differences(self, state: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, checkpoint's value, this run's value) for everything that determines the run and differs: the run
        config (model, params, loss, data, tokenizer, flow, ...), the training options that affect the trajectory
        and the dataset's size. Checkpoints of older versions lack some of these; what they hold is compared."""
        differences: list[tuple[str, Any, Any]] = []

        def compare(prefix: str, saved: Any, current: Any) -> None:
            if isinstance(saved, dict) and isinstance(current, dict):
                for key in sorted(set(saved) | set(current), key=str):
                    compare(f"{prefix}.{key}" if prefix else str(key), saved.get(key, "<absent>"),
                            current.get(key, "<absent>"))
            elif saved != current and not _same_location(saved, current):
                differences.append((prefix, saved, current))

        saved_config = state.get("config")
        if isinstance(saved_config, dict):
            current_config = json.loads(json.dumps(self.run_config, default=str))  # as the checkpoint stores it
            compare("", {k: v for k, v in saved_config.items() if k not in RESUME_FREE_RUN_KEYS},
                    {k: v for k, v in current_config.items() if k not in RESUME_FREE_RUN_KEYS})
        saved_training = state.get("training")
        if isinstance(saved_training, dict):
            saved_training = {"min_learning_rate": 0.0, **saved_training}  # older checkpoints: decay to 0
            current = self.config.to_dict()
            free = set(RESUME_FREE_OPTIONS)
            if "constant" not in (saved_training.get("lr_scheduler"), current["lr_scheduler"]):
                free.discard("max_steps")  # a cosine / linear decay is stretched over max_steps
            compare("training", {k: v for k, v in saved_training.items() if k not in free},
                    {k: v for k, v in current.items() if k not in free})
        if state.get("dataset_size") is not None and self._dataset_size() is not None and \
                state["dataset_size"] != self._dataset_size():
            differences.append(("dataset_size", state["dataset_size"], self._dataset_size()))
        return differences

    def _check_same_run(self, checkpoint: Path, state: dict[str, Any], allow_changes: tuple[str, ...]) -> list[str]:
        """Refuse to resume ``checkpoint`` into a different run, naming every difference, except those named in
        ``allow_changes`` (a training option such as ``learning_rate``, a run-config key such as ``data`` or
        ``params``, or a dotted path such as ``params.depth``). Returns the allowed differences that were found."""
        training_keys = set(self.config.to_dict())
        config_keys = set(self.run_config) | set(state.get("config") or {}) | {"dataset_size"}
        allowed = set()
        for key in map(str, allow_changes):
            if key.split(".")[0] in config_keys:
                allowed.add(key)
            elif key.removeprefix("training.") in training_keys:
                allowed.add("training." + key.removeprefix("training."))
            else:
                raise InvalidValueError(f"--resume-allow-change {key}: not an option of the run; known: "
                                        f"{sorted(training_keys | config_keys)}")
        refused, accepted = [], []
        for key, saved, current in self._run_differences(state):
            is_allowed = any(key == a or key.startswith(a + ".") for a in allowed)
            (accepted if is_allowed else refused).append(f"{key}: {saved!r} in the checkpoint, {current!r} now")
        if refused:
            names = sorted({entry.split(":")[0].removeprefix("training.") for entry in refused})
            raise InvalidValueError(
                f"checkpoint {str(checkpoint)!r} belongs to a different run; resuming it would not continue that "
                f"run: " + "; ".join(refused[:20]) + ". Resume with the settings it was trained with, or, to "
                f"continue deliberately with the new ones, pass --resume-allow-change {' '.join(names)} "
                f"(Trainer.fit(resume=True, allow_changes={tuple(names)!r}))")
        for entry in accepted:
            logger.warning("resuming %s with a deliberate change: %s", checkpoint, entry)
        return accepted

    def _stream_state(self) -> Optional[dict[str, Any]]:
        """Position in a streamed dataset, per process (gathered so that every rank can resume its own shard)."""
        if not isinstance(self.dataset, StreamingImageDataset):
            return None
        from accelerate.utils import gather_object

        return {"per_process": gather_object([self.dataset.state_dict()])}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` through a staging directory; keep the last ``keep_last_checkpoints``."""
        accelerator = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        staging = root / f".staging-{final.name}"
        last = latest_checkpoint(self.output_dir)
        advice = (f"Free some space, then run again with --resume: the last complete checkpoint, {str(last)!r}, is "
                  f"untouched" if last else "Free some space, then run again (no checkpoint was completed yet)")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            with reporting_disk_full(final, advice):
                staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Any failure removes the staging directory; a full disk is a DiskFullError naming the checkpoint.
        with removed_on_failure(staging, final, advice):
            accelerator.save_state(str(staging), safe_serialization=True)
            trainer_state = self._trainer_state()  # collective (stream positions): every process
            if accelerator.is_main_process:
                ema = {name: p.detach().cpu().contiguous()
                       for name, p in zip(self.ema_names, self.ema.shadow_params)}
                save_file(ema, str(staging / "ema.safetensors"))
                save_file(self._non_persistent_buffers(), str(staging / "buffers.safetensors"))
                (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
                give_plain_modes(staging)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging, final)
        if accelerator.is_main_process:
            self._prune_checkpoints(root)
        accelerator.wait_for_everyone()
        return final

    def _non_persistent_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers left out of ``state_dict`` (e.g. the VQ usage window): not part of exported weights, but part of
        the exact training state."""
        buffers = {}
        for name, module in self.modules.items():
            module = self.accelerator.unwrap_model(module)
            persistent = module.state_dict().keys()
            for key, buffer in module.named_buffers():
                if key not in persistent:
                    buffers[f"{name}.{key}"] = buffer.detach().cpu().contiguous()
        return buffers

    def _prune_checkpoints(self, root: Path) -> None:
        complete = sorted(p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name))
        for old in complete[:-self.config.keep_last_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, checkpoint: Path, allow_changes: tuple[str, ...] = ()) -> None:
        """Restore the exact training state of ``checkpoint``, after checking that it belongs to this run (see
        :meth:`_check_same_run`; ``allow_changes`` names deliberate differences)."""
        state_path = checkpoint / "trainer_state.json"
        if not state_path.is_file():
            raise MissingFileError(f"checkpoint {str(checkpoint)!r} has no trainer_state.json"
                                   + self._older_checkpoint_hint(checkpoint))
        try:
            state = json.loads(state_path.read_text())
            if not isinstance(state, dict):
                raise ValueError(f"expected a JSON object, got {type(state).__name__}")
        except (ValueError, UnicodeDecodeError, OSError) as error:
            raise self._unrestorable(checkpoint, state_path.name, error) from error
        if state.get("modules") != self.names:
            raise InvalidValueError(f"checkpoint {str(checkpoint)!r} holds modules {state.get('modules')}; this run trains "
                             f"{self.names}")
        if state.get("num_processes") != self.accelerator.num_processes:
            raise InvalidValueError(f"checkpoint {str(checkpoint)!r} was written by {state.get('num_processes')} process(es); "
                             f"this run has {self.accelerator.num_processes}: the data position would not carry over")
        changes = self._check_same_run(checkpoint, state, tuple(allow_changes))
        self.resume_changes = changes
        random_states = self._check_checkpoint_files(checkpoint)
        try:
            self.accelerator.load_state(str(checkpoint))
        except Exception as error:  # a truncated or foreign file: find which one
            raise self._unrestorable(checkpoint, self._unreadable_part(checkpoint) or "(accelerate state)",
                                     error) from error
        self._restore_random_states(random_states)  # accelerate skips an unusable RNG file silently
        try:
            ema = load_file(str(checkpoint / "ema.safetensors"))
        except Exception as error:
            raise self._unrestorable(checkpoint, "ema.safetensors", error) from error
        missing = [n for n in self.ema_names if n not in ema]
        if missing or len(ema) != len(self.ema_names):
            raise InvalidValueError(f"checkpoint {str(checkpoint)!r}: ema.safetensors does not match the model "
                             f"(missing {missing[:5]}, {len(ema)} tensors vs {len(self.ema_names)})")
        for shadow, name in zip(self.ema.shadow_params, self.ema_names):
            shadow.copy_(ema[name].to(shadow.device))
        buffers_path = checkpoint / "buffers.safetensors"
        if buffers_path.is_file():
            try:
                saved = load_file(str(buffers_path))
            except Exception as error:
                raise self._unrestorable(checkpoint, buffers_path.name, error) from error
            current = self._non_persistent_buffers()
            for name, module in self.modules.items():
                module = self.accelerator.unwrap_model(module)
                for key, buffer in module.named_buffers():
                    full = f"{name}.{key}"
                    if full in current and full in saved and saved[full].shape == buffer.shape:
                        buffer.copy_(saved[full].to(buffer.device))
        self.ema.optimization_step = state["ema_optimization_step"]
        for key in ("step", "epoch", "batch_in_epoch", "images_seen", "skipped_images"):
            setattr(self, key, state[key])
        saved_batch = (state.get("training") or {}).get("batch_size", self.config.batch_size)
        if saved_batch != self.config.batch_size:  # allowed above: keep the position in images, not in batches
            self.batch_in_epoch = self.batch_in_epoch * saved_batch // self.config.batch_size
        if changes:
            self._apply_optimizer_options()
        self.skipped_examples = list(state.get("skipped_examples", []))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        if isinstance(self.dataset, StreamingImageDataset) and state.get("stream_state"):
            self.dataset.load_state_dict(state["stream_state"]["per_process"][self.accelerator.process_index])

    # Every part of a checkpoint must be restored, or the resumed run is not the interrupted one.
    def _expected_files(self) -> list[str]:
        """The files of a checkpoint that this process restores (accelerate's names)."""
        k = len(self.names)
        suffix = lambda i: "" if i == 0 else f"_{i}"  # noqa: E731
        files = [f"optimizer{suffix(i)}.bin" for i in range(k)] + [f"scheduler{suffix(i)}.bin" for i in range(k)]
        if self.accelerator.scaler is not None:
            files.append("scaler.pt")
        files += [f"random_states_{self.accelerator.process_index}.pkl", "ema.safetensors"]
        return files

    def _model_file(self, checkpoint: Path, index: int) -> Path:
        suffix = "" if index == 0 else f"_{index}"
        safe = checkpoint / f"model{suffix}.safetensors"
        return safe if safe.exists() else checkpoint / f"pytorch_model{suffix}.bin"

    def _older_checkpoint_hint(self, checkpoint: Path) -> str:
        root = checkpoint.parent
        older = sorted(p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.name < checkpoint.name) \
            if root.is_dir() else []
        if not older:
            return ". No older checkpoint exists in this run; start again without --resume in a new output directory"
        return (f". The older checkpoint {str(older[-1])!r} exists: to resume from it, delete or move away the "
                f"corrupt one (e.g. `mv {checkpoint} {checkpoint.parent / ('corrupt-' + checkpoint.name)}`) and run "
                f"again with --resume")

    def _unrestorable(self, checkpoint: Path, name: str, error: BaseException) -> CheckpointError:
        return CheckpointError(f"cannot restore checkpoint {str(checkpoint)!r}: {name} cannot be read "
                               f"({type(error).__name__}: {str(error)[:300]})" + self._older_checkpoint_hint(checkpoint))

    def _check_checkpoint_files(self, checkpoint: Path) -> dict[str, Any]:
        """Before accelerate loads the state (it ignores an unreadable RNG file): every file this process restores
        exists and is not empty, and the RNG file loads and holds the states this machine needs. Returns them."""
        names = [self._model_file(checkpoint, i).name for i in range(len(self.names))] + self._expected_files()
        for name in names:
            path = checkpoint / name
            if not path.is_file():
                raise self._unrestorable(checkpoint, name, FileNotFoundError("missing"))
            if path.stat().st_size == 0:
                raise self._unrestorable(checkpoint, name, ValueError("empty file"))
        name = f"random_states_{self.accelerator.process_index}.pkl"
        try:
            # Read the way accelerate's load_state reads it: weights_only=True with its safe globals (numpy arrays
            # and dtypes); a checkpoint copied from elsewhere never runs code.
            states = load_checkpoint_part(checkpoint / name, map_location="cpu")
            needed = ["random_state", "numpy_random_seed", "torch_manual_seed"]
            if torch.cuda.is_available():
                needed.append("torch_cuda_manual_seed")
            if not isinstance(states, dict) or any(key not in states for key in needed):
                raise ValueError(f"expected the RNG states {needed}, found "
                                 f"{sorted(states) if isinstance(states, dict) else type(states).__name__}")
        except Exception as error:
            raise self._unrestorable(checkpoint, name, error) from error
        return states

    @staticmethod
    def _restore_random_states(states: dict[str, Any]) -> None:
        import random

        import numpy as np

        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])

    def _unreadable_part(self, checkpoint: Path) -> Optional[str]:
        """After a failed ``load_state``: the first file of the checkpoint that cannot be read (None: all can)."""
        from safetensors import safe_open

        for index in range(len(self.names)):
            path = self._model_file(checkpoint, index)
            try:
                if path.suffix == ".safetensors":
                    with safe_open(str(path), framework="pt") as handle:
                        for key in handle.keys():
                            handle.get_tensor(key)
                else:
                    torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                return path.name
        for name in self._expected_files()[:-2]:  # optimizers, schedulers, scaler
            try:
                load_checkpoint_part(checkpoint / name, map_location="cpu")  # weights_only=True, as accelerate
            except Exception:
                return name
        return None

    def _apply_optimizer_options(self) -> None:
        """After a resume with deliberate changes: the restored optimizer and scheduler states carry the checkpoint's
        learning rate, betas and weight decay; set this run's (the schedule's position is kept)."""
        config = self.config
        for name in self.names:
            optimizer, scheduler = self.optimizers[name], self.schedulers[name]
            inner = getattr(scheduler, "scheduler", scheduler)
            module = self.accelerator.unwrap_model(self.modules[name])
            fresh = _optimizer(module, config).param_groups  # this run's hyperparameters, group by group
            for group, reference in zip(optimizer.param_groups, fresh):
                group["betas"] = reference["betas"]
                group["weight_decay"] = reference["weight_decay"]
                group["initial_lr"] = reference["lr"]
            if hasattr(inner, "base_lrs"):
                inner.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
                for group, base, fn in zip(optimizer.param_groups, inner.base_lrs, getattr(inner, "lr_lambdas", [])):
                    group["lr"] = base * fn(inner.last_epoch)
                inner._last_lr = [group["lr"] for group in optimizer.param_groups]

    # -- logging ----------------------------------------------------------------------------------------------------
    def _truncate_metrics(self) -> None:
        """On resume, drop metric lines written after the checkpoint (they will be written again)."""
        path = self.output_dir / "metrics.jsonl"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and _parse_step(line) is not None and _parse_step(line) <= self.step]
        write_text_atomically(path, "".join(line + "\n" for line in kept))

    def _log(self, window: dict[str, list[float]], elapsed: float, images: int, extra: dict[str, float]) -> dict:
        names = sorted(window)
        means = torch.tensor([sum(window[n]) / len(window[n]) for n in names], device=self.accelerator.device)
        means = self.accelerator.reduce(means, reduction="mean") if self.accelerator.num_processes > 1 else means
        images_per_s = images / max(elapsed, 1e-9)  # images: trained on by all processes
        record = {"step": self.step, **{n: float(v) for n, v in zip(names, means.tolist())},
                  "lr": self.schedulers["model"].get_last_lr()[0], "images_per_s": images_per_s,
                  "epoch": self.epoch, **extra}
        self.accelerator.log(record, step=self.step)
        if self.accelerator.is_main_process:
            path = self.output_dir / "metrics.jsonl"
            with reporting_disk_full(path), open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")  # one write per line (a partial one is dropped on resume)
        return record

    def save_samples(self) -> Optional[Path]:
        """A grid of the task's sample images (e.g. inputs above reconstructions), made with the EMA weights."""
        if self.config.num_sample_images == 0 or not self.accelerator.is_main_process:
            return None
        from torchvision.utils import save_image
        from vfmtok.pipelines.data import collate_images

        batch = None
        if self.sample_dataset is not None:
            count = min(self.config.num_sample_images, len(self.sample_dataset))
            batch = collate_images([self.sample_dataset[i] for i in range(count)])
            if len(batch["images"]) == 0:
                return None
            batch = self._to_device(batch)
        self.ema.store(self.ema_parameters)
        self.ema.copy_to(self.ema_parameters)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                samples = self.task.sample_images(self.model, batch, self.config.num_sample_images)
        finally:
            self.model.train(was_training)
            self.ema.restore(self.ema_parameters)
        if samples is None:
            return None
        images, per_row = samples
        path = self.output_dir / "samples" / f"step-{self.step:08d}.png"
        with atomic_file(path) as temporary:
            save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, str(temporary), nrow=per_row, format="png")
        return path

    def export(self) -> Path:
        """Save the EMA weights of the model with ``save_pretrained`` into ``output_dir/<export_name>``."""
        target = self.output_dir / self.task.export_name
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.ema.store(self.ema_parameters)
            self.ema.copy_to(self.ema_parameters)
            try:
                if target.exists():
                    shutil.rmtree(target)
                self.task.export(self.model, target)
            finally:
                self.ema.restore(self.ema_parameters)
        self.accelerator.wait_for_everyone()
        return target

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _stream_batches(self) -> Iterator[dict[str, Any]]:
        """Batches of a streamed dataset from its stored position onwards (the dataset shards itself by rank)."""
        config = self.config
        loader = build_dataloader(self.dataset, None, batch_size=config.batch_size, num_workers=config.num_workers,
                                  pin_memory=self.accelerator.device.type == "cuda")
        while True:
            if self.dataset.epoch != self.epoch:
                self.dataset.set_epoch(self.epoch)
            yield from self._epoch_pass(loader, UNREADABLE_CHECK_AFTER)

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the stored data position onwards, epoch after epoch."""
        if isinstance(self.dataset, StreamingImageDataset):
            yield from self._stream_batches()
            return
        accelerator, config = self.accelerator, self.config
        sampler = ResumableBatchSampler(len(self.dataset), config.batch_size, seed=config.seed, shuffle=True,
                                        drop_last=True, num_replicas=accelerator.num_processes,
                                        rank=accelerator.process_index)
        if len(sampler) == 0:
            raise InvalidValueError(f"the dataset has {len(self.dataset)} images: too few for one batch of "
                             f"{config.batch_size} on each of {accelerator.num_processes} process(es)")
        loader = build_dataloader(self.dataset, sampler, batch_size=config.batch_size, num_workers=config.num_workers,
                                  pin_memory=accelerator.device.type == "cuda")
        epoch_images = len(sampler) * config.batch_size * accelerator.num_processes  # drawn by all processes
        if self.batch_in_epoch > len(sampler):
            raise InvalidValueError(
                f"the stored data position (batch {self.batch_in_epoch} of epoch {self.epoch}) is past the "
                f"{len(sampler)} batches of {config.batch_size} that an epoch of this dataset has: the checkpoint was "
                f"written with another batch size or dataset")
        while True:
            sampler.set_epoch(self.epoch)
            sampler.set_start_batch(self.batch_in_epoch)
            yield from self._epoch_pass(loader, min(epoch_images, UNREADABLE_CHECK_AFTER))

    def _dataset_name(self) -> str:
        data = self.run_config.get("data")
        return repr(str(data)) if data is not None else f"the {type(self.dataset).__name__}"

    def _sum_over_processes(self, values: list[int]) -> list[int]:
        """``values`` summed over all processes (a collective under DDP: every process calls it at the same
        point); the values themselves with one process."""
        if self.accelerator.num_processes == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.long, device=self.accelerator.device)
        return [int(v) for v in self.accelerator.reduce(tensor, reduction="sum").tolist()]

    def _epoch_pass(self, loader: Iterator[dict[str, Any]], check_after: int) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch from ``loader``, then the next epoch's position. Unreadable images are
        counted over all processes (each micro-batch's counts are summed, so every process sees the same numbers
        and decides alike): a whole epoch without one readable image is an error (it would never make a step), and
        so is an unreadable fraction above ``max_unreadable_fraction`` once ``check_after`` images were drawn (or at
        the end of the epoch); any unreadable image is reported at the end of the epoch. Each batch gets
        ``global_counts``: (readable, unreadable, processes whose micro-batch has no readable image)."""
        from_start = self.batch_in_epoch == 0
        drawn = unreadable = 0
        for batch in loader:
            self.batch_in_epoch += 1
            examples, skipped = len(batch["indices"]), int(batch.get("num_skipped", 0))
            examples, skipped, empty = self._sum_over_processes([examples, skipped, int(examples == 0)])
            batch["global_counts"] = (examples, skipped, empty)
            drawn += examples + skipped
            unreadable += skipped
            if skipped and drawn >= check_after:
                self._check_unreadable(drawn, unreadable, batch)
            yield batch
        name, limit = self._dataset_name(), self.config.max_unreadable_fraction
        if from_start and drawn == 0:
            raise InvalidValueError(f"dataset {name} gave no image in a whole epoch (epoch {self.epoch})")
        if from_start and unreadable == drawn:
            raise InvalidValueError(
                f"no image of dataset {name} could be read in a whole epoch (epoch {self.epoch}): all {unreadable} "
                f"drawn image(s) were skipped as unreadable ({self.skipped_images} in this run), e.g. "
                f"{self.skipped_examples[:3]}")
        if unreadable:
            self._check_unreadable(drawn, unreadable, None)
            fraction = unreadable / drawn
            logger.warning("%s%d of %d images (%.1f%%) drawn from dataset %s in epoch %d were unreadable and "
                           "skipped (limit: training.max_unreadable_fraction = %g), e.g. %s",
                           "MOST IMAGES ARE UNREADABLE: " if fraction > 0.5 else "", unreadable, drawn,
                           100 * fraction, name, self.epoch, limit, self.skipped_examples[:3])
        self.epoch += 1
        self.batch_in_epoch = 0

    def _check_unreadable(self, drawn: int, unreadable: int, batch: Optional[dict[str, Any]]) -> None:
        limit = self.config.max_unreadable_fraction
        if unreadable / drawn > limit:
            examples = (batch or {}).get("skipped") or self.skipped_examples
            raise InvalidValueError(
                f"{unreadable} of the {drawn} images drawn from dataset {self._dataset_name()} in epoch {self.epoch} "
                f"were unreadable ({unreadable / drawn:.0%}), more than training.max_unreadable_fraction = {limit:g}; "
                f"e.g. {list(examples[:3])}. Fix or remove those files, or raise max_unreadable_fraction (1.0: "
                f"stop only when no image can be read)")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _count_skipped(self, batch: dict[str, Any]) -> None:
        self.skipped_images += batch["global_counts"][1]  # over all processes
        room = 20 - len(self.skipped_examples)
        if room > 0:
            self.skipped_examples.extend(batch.get("skipped", [])[:room])

    def _update(self, batch: dict[str, Any], window: dict[str, list[float]]) -> None:
        """One micro-batch: every loss the task yields is back-propagated and its optimizer stepped (accelerate skips
        the step and the zeroing while gradients are being accumulated)."""
        accelerator = self.accelerator
        with accelerator.accumulate(*self.modules.values()):
            losses = self.task.losses(batch, self.step)
            while True:
                with accelerator.autocast():
                    item = next(losses, None)
                if item is None:
                    break
                name, loss, logs = item
                if not torch.isfinite(loss.detach()).all():
                    last = latest_checkpoint(self.output_dir)
                    raise TrainingDiverged(
                        f"the {name} loss became {loss.item()} at step {self.step + 1} "
                        f"(terms: {json.dumps(logs)}); nothing was saved after the last good checkpoint "
                        f"{str(last) if last else '(none yet)'}. Lower the learning rate or use bf16/fp32 and "
                        f"resume with --resume.")
                accelerator.backward(loss)
                update = True
                if accelerator.sync_gradients:
                    norm = self._gradient_norm(name)
                    if norm is not None and math.isfinite(norm):
                        logs = {**logs, f"{name}/grad_norm": norm}
                    elif norm is not None:
                        update = self._nonfinite_gradients(name, norm, loss)
                if update:
                    self.optimizers[name].step()
                self.optimizers[name].zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    self.schedulers[name].step()
                for key, value in logs.items():
                    window[key].append(value)

    def _gradient_norm(self, name: str) -> Optional[float]:
        """The total gradient norm of module ``name`` (after unscaling), clipped to ``max_grad_norm`` if set. None
        where accelerate does not report it (DeepSpeed clips internally)."""
        limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        norm = self.accelerator.clip_grad_norm_(self.modules[name].parameters(), limit)
        return None if norm is None else float(norm)

    def _nonfinite_gradients(self, name: str, norm: float, loss: torch.Tensor) -> bool:
        """What to do with a non-finite gradient norm; returns whether the optimizer should still step."""
        if self.accelerator.scaler is not None:
            # fp16 loss scaling: an overflow is how the GradScaler finds its scale; it skips this step itself.
            return True
        if self.config.skip_nonfinite_gradients:
            self.skipped_updates += 1
            logger.warning("skipped the %s update of step %d: its gradient norm is %s (%d update(s) skipped so far)",
                           name, self.step + 1, norm, self.skipped_updates)
            return False
        last = latest_checkpoint(self.output_dir)
        raise TrainingDiverged(
            f"the {name} gradient norm became {norm} at step {self.step + 1} (loss {loss.item():g}); nothing was saved "
            f"after the last good checkpoint {str(last) if last else '(none yet)'}. Lower the learning rate or the "
            f"loss weights, or set training.skip_nonfinite_gradients: true to skip such updates, and resume with "
            f"--resume.")

    def _check_labels(self) -> None:
        """Class-conditional tasks: every label of a map-style dataset in [0, num_classes), checked once."""
        num_classes = self.task.num_classes(self.model)
        if num_classes is not None and hasattr(self.dataset, "check_labels"):
            self.dataset.check_labels(num_classes, allow_unlabeled=False, source=f"dataset {self._dataset_name()}")

    def fit(self, resume: bool = False, allow_changes: tuple[str, ...] = ()) -> Path:
        """Train to ``max_steps`` (resuming from the newest checkpoint if asked) and export the EMA model, holding
        the output directory's lock (:func:`output_lock`) throughout. A resumed checkpoint must come from the same
        run (run config, training options that affect the trajectory, dataset size); ``allow_changes`` names the
        options or run-config keys the user deliberately changed (e.g. ``("learning_rate",)``)."""
        with output_lock(self.output_dir) if self.accelerator.is_main_process else contextlib.nullcontext():
            if self.accelerator.is_main_process:
                for leftover in remove_leftovers(self.output_dir):
                    logger.info("removed %s, left by an interrupted run", leftover)
            self.accelerator.wait_for_everyone()
            return self._fit(resume, tuple(allow_changes or ()))

    def _fit(self, resume: bool, allow_changes: tuple[str, ...] = ()) -> Path:
        accelerator, config = self.accelerator, self.config
        checkpoint = self._check_output_dir(resume)
        self._prepare()
        self._check_labels()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, allow_changes)
            logger.info("resumed from %s at step %d", checkpoint, self.step)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics()
            changes = {"resumed_with_changes": self.resume_changes} if self.resume_changes else {}
            write_text_atomically(self.output_dir / "run_config.json", json.dumps(
                {**self.run_config, "training": config.to_dict(), **changes}, indent=1, default=str))
        accelerator.init_trackers("vfmtok", config={k: v for k, v in config.to_dict().items()
                                                    if isinstance(v, (int, float, str, bool))})
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (logs get the logged lines, not escape codes)
        progress = tqdm(total=config.max_steps, initial=self.step,
                        disable=None if accelerator.is_local_main_process else True,
                        desc=f"train {self.task.export_name}", unit="step", dynamic_ncols=True)
        window: dict[str, list[float]] = defaultdict(list)
        window_start, window_images, last_good = time.perf_counter(), 0, None
        for module in self.modules.values():
            module.train()
        batches = self._batches() if self.step < config.max_steps else iter(())
        for batch in batches:
            self._count_skipped(batch)
            examples, _, empty = batch["global_counts"]
            if empty:
                # Every image of this micro-batch was unreadable (counted above) on this or another process: all
                # processes skip it alike, so that their gradient synchronisations stay paired.
                continue
            batch = self._to_device(batch)
            self._update(batch, window)
            window_images += examples
            self.images_seen += examples
            if not accelerator.sync_gradients:
                continue
            self.step += 1
            self.ema.step(self.ema_parameters)
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                extra = {"skipped_images": float(self.skipped_images)}
                if config.skip_nonfinite_gradients:
                    extra["skipped_updates"] = float(self.skipped_updates)
                record = self._log(window, time.perf_counter() - window_start, window_images, extra)
                progress.set_postfix(loss=f"{record.get('model/loss', float('nan')):.4f}",
                                     img_s=f"{record['images_per_s']:.1f}")
                window, window_start, window_images = defaultdict(list), time.perf_counter(), 0
            if self.step % config.sample_every == 0:
                self.save_samples()
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                last_good = self.save_checkpoint()
            if self.step >= config.max_steps:
                break
        progress.close()
        exported = self.export()
        summary = {"step": self.step, "exported": str(exported), "last_checkpoint": str(last_good or checkpoint),
                   "images_seen": self.images_seen, "skipped_images": self.skipped_images,
                   "skipped_examples": self.skipped_examples[:5], "skipped_updates": self.skipped_updates}
        logger.info("finished: %s", json.dumps(summary))
        accelerator.end_training()
        return exported



def _parse_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None

