"""Config files, validated strictly and in one way.

A config file is a YAML mapping with ``model`` (a class name), ``params`` (its constructor arguments) and the sections
the model's stages read:

==============  =====================================================  ==========================================
section         what                                                   models
==============  =====================================================  ==========================================
``params``      constructor arguments of the model                     all
``training``    :class:`TrainingConfig` (the shared trainer)           all
``loss``        :class:`vfmtok.tokenizer.losses.TokenizerLoss` arguments      tokenizers
``sampling``    :class:`ARSamplingConfig` / :class:`FlowSamplingConfig`  GPTModel / DiTModel
``flow``        :class:`FlowConfig` (flow-matching objective)          DiTModel
==============  =====================================================  ==========================================

:func:`load_config` refuses, before any work starts, an unknown section or key anywhere (naming it and the accepted
ones) and a value of the wrong type (naming the key, the expected type and the value: e.g. ``4e-4``, which YAML reads
as a string). Every section goes through :func:`validate_section`, against a dataclass or a constructor signature;
sections that a model does not have in the file get their defaults, so later code never guesses with ``.get``.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from vfmtok.tokenizer.utils.errors import ConfigError, InvalidValueError, MissingFileError
from vfmtok.tokenizer.utils.types import check_value

__all__ = ["MODEL_CLASSES", "load_config", "config_path", "shipped_configs", "build_model", "model_class", "validate_section", "TrainingConfig",
           "ARSamplingConfig", "FlowSamplingConfig", "FlowConfig", "SECTIONS"]

# Class name in a config file -> "module:attribute". Imported lazily so that `vfmtok describe` on a tokenizer
# config does not import the generators.
MODEL_CLASSES: dict[str, str] = {
    "VFMTokModel": "vfmtok.tokenizer.vfmtok:VFMTokModel",
    "DINOTokModel": "vfmtok.tokenizer.dinotok:DINOTokModel",
    "GloTokModel": "vfmtok.tokenizer.glotok:GloTokModel",
    "GPTModel": "vfmtok.generators.gpt:GPTModel",
    "RARModel": "vfmtok.generators.rar:RARModel",
    "DiTModel": "vfmtok.generators.dit:DiTModel",
}


def _fields_of(schema: Union[type, Callable]) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) of a dataclass's fields or of a callable's keyword parameters."""
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        return {f.name: (hints.get(f.name, Any), f.default if f.default is not dataclasses.MISSING else
                         (f.default_factory() if f.default_factory is not dataclasses.MISSING else
                          inspect.Parameter.empty))
                for f in dataclasses.fields(schema) if not f.name.startswith("_")}
    target = schema.__init__ if isinstance(schema, type) else schema
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that cannot be resolved here: check names only
        hints = {}
    return {name: (hints.get(name, Any), p.default) for name, p in inspect.signature(target).parameters.items()
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def validate_section(values: Optional[dict[str, Any]], schema: Union[type, Callable], source: str,
                     fill_defaults: bool = False) -> dict[str, Any]:
    """The one check of a config section: ``values`` must be a mapping whose keys are fields of ``schema`` (a
    dataclass, or a class / callable whose keyword parameters are the options), each of the annotated type.
    Returns the checked values, with the schema's defaults added when ``fill_defaults``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of options, got {type(values).__name__} {values!r}")
    fields = _fields_of(schema)
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}; accepted: {sorted(fields)}")
    checked = {key: check_value(f"{source}.{key}", value, fields[key][0]) for key, value in values.items()}
    if fill_defaults:
        for name, (_, default) in fields.items():
            if name not in checked and default is not inspect.Parameter.empty:
                checked[name] = default
    return checked


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingConfig:
    """The ``training:`` section of a config file. Every value can be set there; unknown keys are errors."""

    max_steps: int = 400_000
    batch_size: int = 16  # per process and micro-batch; global batch = batch_size * processes * accumulation
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    optimizer: str = "adam"  # adam | adamw (AdamW decays only >= 2-D weights)
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # constant | cosine | linear, after a linear warm-up
    lr_warmup_steps: int = 0
    min_learning_rate: float = 0.0  # cosine / linear schedules end here instead of 0 (RAR: 1e-5)
    max_grad_norm: Optional[float] = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 5000
    keep_last_checkpoints: int = 3
    sample_every: int = 5000
    num_sample_images: int = 8
    num_workers: int = 4
    log_with: tuple[str, ...] = ("tensorboard",)
    augment: str = "adm"  # adm (random resize in [S, 1.25 S] + random crop) | center
    flip: bool = True
    streaming: bool = False  # stream a Hub dataset (resume is exact only with num_workers 0 and no shuffle buffer)
    shuffle_buffer: int = 10000  # streaming only
    feature_cache: Optional[str] = None  # tokenizers: directory of cached frozen-VFM features (see feature_cache.py)
    compile: bool = False  # torch.compile the trained model (and a tokenizer's frozen VFM blocks); for GPUs
    # Unreadable images are skipped and counted; above this fraction of an epoch's images (checked per process after
    # 1000 images and at each epoch's end) the run stops. 1.0: stop only when a whole epoch has no readable image.
    max_unreadable_fraction: float = 0.5
    # A non-finite gradient norm stops the run like a non-finite loss (TrainingDiverged); true: skip that update and
    # count it (``skipped_updates``). fp16 loss-scaling overflows are the GradScaler's and never count.
    skip_nonfinite_gradients: bool = False

    _CHOICES = {"mixed_precision": ("no", "bf16", "fp16"), "optimizer": ("adam", "adamw"),
                "lr_scheduler": ("constant", "cosine", "linear"), "augment": ("adm", "center")}

    @classmethod
    def from_dict(cls, values: Optional[dict[str, Any]], source: str = "training") -> "TrainingConfig":
        values = dict(values or {})
        if isinstance(values.get("log_with"), str) or values.get("log_with", ()) is None:  # one tracker, or none
            values["log_with"] = [values["log_with"]] if values["log_with"] else []
        config = cls(**validate_section(values, cls, source))
        config.validate(source)
        return config

    @classmethod
    def from_run(cls, run: dict[str, Any], overrides: Optional[dict[str, Any]] = None,
                 **flags: Any) -> "TrainingConfig":
        """The ``training:`` section of a loaded config file, then ``overrides``, then the command-line ``flags``
        that were given (None = not given)."""
        values = {**run.get("training", {}), **(overrides or {}),
                  **{name: value for name, value in flags.items() if value is not None}}
        return cls.from_dict(values, source=f"{run['_path']}: training")

    def validate(self, source: str = "training") -> None:
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise InvalidValueError(f"{source}: {name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_every",
                     "keep_last_checkpoints", "sample_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidValueError(f"{source}: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_workers", "lr_warmup_steps", "num_sample_images", "seed", "shuffle_buffer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidValueError(f"{source}: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise InvalidValueError(f"{source}: learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.ema_decay < 1:
            raise InvalidValueError(f"{source}: ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InvalidValueError(f"{source}: betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidValueError(f"{source}: max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise InvalidValueError(f"{source}: min_learning_rate must be in [0, learning_rate], got "
                                    f"{self.min_learning_rate!r}")
        if self.min_learning_rate > 0 and self.lr_scheduler == "constant":
            raise InvalidValueError(f"{source}: min_learning_rate ({self.min_learning_rate!r}) is where a cosine or "
                                    f"linear schedule ends; lr_scheduler is 'constant'")
        if self.weight_decay < 0:
            raise InvalidValueError(f"{source}: weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise InvalidValueError(f"{source}: max_unreadable_fraction must be in [0, 1], got "
                                    f"{self.max_unreadable_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


@dataclasses.dataclass
class ARSamplingConfig:
    """The ``sampling:`` section of an AR generator config (GPT, RAR): the defaults of sample grids and of the AR
    pipeline. Options left null take the generator family's ``default_sampling``."""

    guidance_scale: float = 2.0  # LlamaGen's recommendation for B / L; XL / XXL 1.75, 3B 1.65
    guidance_schedule: Optional[str] = None  # constant | linear | cosine_power | interval
    guidance_power: Optional[float] = None  # cosine_power's exponent
    temperature: Optional[float] = None


@dataclasses.dataclass
class FlowSamplingConfig:
    """The ``sampling:`` section of a denoiser config: the defaults of sample grids and of the flow pipeline."""

    guidance_scale: float = 1.5
    steps: int = 50


@dataclasses.dataclass
class FlowConfig:
    """The ``flow:`` section: the flow-matching objective (see :func:`vfmtok.generators.transport.flow_matching_loss`)."""

    time_schedule: str = "uniform"  # uniform | logit_normal
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale
    shift: float = 1.0  # dimension-dependent time shift (1 = none)
    cosine_weight: float = 0.0  # weight of an extra (1 - cosine) term on the velocity
    repa_weight: float = 0.0  # REPA alignment with the frozen encoder's features (needs repa_layer / repa_dim)


def _tokenizer_loss_class():
    from vfmtok.tokenizer.losses import TokenizerLoss

    return TokenizerLoss


# Model class -> section name -> schema (a dataclass, or a function returning the class whose constructor the section
# holds). ``params`` is always the model's constructor.
SECTIONS: dict[str, dict[str, Callable[[], Any]]] = {
    "VFMTokModel": {"training": lambda: TrainingConfig, "loss": _tokenizer_loss_class},
    "DINOTokModel": {"training": lambda: TrainingConfig, "loss": _tokenizer_loss_class},
    "GloTokModel": {"training": lambda: TrainingConfig, "loss": _tokenizer_loss_class},
    "GPTModel": {"training": lambda: TrainingConfig, "sampling": lambda: ARSamplingConfig},
    "RARModel": {"training": lambda: TrainingConfig, "sampling": lambda: ARSamplingConfig},
    "DiTModel": {"training": lambda: TrainingConfig, "sampling": lambda: FlowSamplingConfig,
                 "flow": lambda: FlowConfig},
}
# Sections checked here but filled with defaults only by the code that reads them (TrainingConfig.from_run applies
# the command-line overrides first).
_FILLED = {"sampling", "flow", "loss"}


def shipped_configs() -> Path:
    """The folder of the configs that ship inside the package (the repository's ``configs/``; package data of a
    regular install)."""
    return Path(str(importlib.resources.files("vfmtok") / "configs"))


def config_path(path: Union[str, Path]) -> Path:
    """A config file: ``path`` itself when it is a file, else the shipped config it names, so that the README's
    ``configs/ar/gpt-b.yaml`` works from any folder: ``configs/ar/gpt-b.yaml``, ``ar/gpt-b.yaml`` or ``ar/gpt-b``."""
    given = Path(path)
    if given.is_file():
        return given
    parts = given.with_suffix(".yaml").parts if given.suffix in ("", ".yaml") else given.parts
    if parts[:1] == ("configs",):
        parts = parts[1:]
    shipped = shipped_configs().joinpath(*parts) if parts and not given.is_absolute() else None
    if shipped is not None and shipped.is_file():
        return shipped
    available = sorted(str(p.relative_to(shipped_configs().parent).with_suffix(""))
                       for p in shipped_configs().glob("*/*.yaml"))
    raise MissingFileError(f"config file {str(path)!r} does not exist, and no shipped config has that name; shipped: "
                           f"{', '.join(available)}")


def load_config(path: Union[str, Path]) -> dict[str, Any]:
    """Read and validate a YAML config file (see the module docstring; a shipped config may be named as in
    :func:`config_path`). The result holds every section of the model, checked (``sampling``, ``flow`` and ``loss``
    with their defaults filled in), and ``_path``."""
    path = config_path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"config file {str(path)!r} must be a mapping with 'model' (one of "
                          f"{sorted(MODEL_CLASSES)}) and 'params' (a mapping of constructor arguments)")
    name = config["model"]
    if name not in MODEL_CLASSES:
        raise ConfigError(f"{path}: unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    sections = SECTIONS[name]
    allowed = {"model", "params", *sections}
    unknown = sorted(set(config) - allowed, key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} for a {name} config; accepted: {sorted(allowed)}")
    checked: dict[str, Any] = {"model": name, "_path": str(path)}
    checked["params"] = validate_section(config.get("params"), model_class(name), f"{path}: params")
    for section, schema in sections.items():
        checked[section] = validate_section(config.get(section), schema(), f"{path}: {section}",
                                            fill_defaults=section in _FILLED)
    return checked


def model_class(name: str) -> type:
    if name not in MODEL_CLASSES:
        raise ConfigError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    module, attribute = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_model(config: Union[dict[str, Any], str, Path]):
    """Build the model a config describes, with random weights (nothing is downloaded)."""
    if not isinstance(config, dict):
        config = load_config(config)
    return model_class(config["model"])(**config["params"])
