"""What the class-conditional pipelines share: class labels, argument checks, chunking, output conversion, Hub
loading and the model card.

:class:`VFMTokPipelineBase` is a ``diffusers.DiffusionPipeline``; the concrete pipelines
(:mod:`vfmtok.pipelines.pipeline_vfmtok_ar`, :mod:`vfmtok.pipelines.pipeline_vfmtok_flow`) add their components and the sampling loop.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import inspect
import json
import math
import numbers
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from vfmtok.tokenizer.utils.atomic import atomic_file
from vfmtok.tokenizer.utils.errors import (CheckpointError, InvalidValueError, VFMTokError,
                                           WeightsUnavailableError)
from vfmtok.tokenizer.utils.remote_code import write_remote_code_module

__all__ = ["VFMTokPipelineBase", "ClassLabels", "imagenet_id2label", "load_pipeline", "PIPELINE_CLASSES",
           "captioned_image_grid"]

ClassLabels = Union[int, str, Sequence[int], Sequence[str], torch.Tensor]
OUTPUT_TYPES = ("pil", "np", "pt")
# The Gradio app saved with every pipeline (a Hub Space runs app.py): the installed vfmtok's demo page of the folder
# it lies in. Nothing but imports from vfmtok and pathlib.
DEMO_APP_FILE = "app.py"
DEMO_APP_TEXT = '''"""The demo page of the pipeline in this folder (`vfmtok demo`), e.g. as a Hugging Face Space.
Needs the demo extra: pip install "vfmtok[demo]". Run: python app.py"""
from pathlib import Path

from vfmtok.pipelines.demo import build_demo
from vfmtok.pipelines.pipeline_common import load_pipeline

demo = build_demo(load_pipeline(Path(__file__).resolve().parent))

if __name__ == "__main__":
    demo.launch()
'''

# An unknown class name lists every name when the pipeline has at most this many classes.
MAX_LISTED_CLASS_NAMES = 30

# Pipeline class name in model_index.json -> "module:attribute" (imported on demand).
PIPELINE_CLASSES: dict[str, str] = {
    "VFMTokARPipeline": "vfmtok.pipelines.pipeline_vfmtok_ar:VFMTokARPipeline",
    "VFMTokFlowPipeline": "vfmtok.pipelines.pipeline_vfmtok_flow:VFMTokFlowPipeline",
}


def imagenet_id2label() -> dict[str, str]:
    """The standard 1000 ImageNet class names as torchvision ships them (one name per class, no synonyms)."""
    from torchvision.models import ResNet50_Weights

    return {str(i): name for i, name in enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])}


def default_id2label(num_classes: int) -> dict[str, str]:
    """ImageNet names for a 1000-class generator, else no names (class ids only)."""
    return imagenet_id2label() if num_classes == 1000 else {}


def _check_id2label(id2label: dict, num_classes: int) -> dict[str, str]:
    if not isinstance(id2label, dict):
        raise InvalidValueError(f"id2label must be a dict {{class id: name}}, got {type(id2label).__name__}")
    clean = {}
    for key, name in id2label.items():
        if not (str(key).isdigit() and 0 <= int(key) < num_classes) or not isinstance(name, str) or not name.strip():
            raise InvalidValueError(f"id2label entry {key!r}: {name!r} is not a class id in [0, {num_classes}) with "
                                    f"a non-empty name")
        clean[str(int(key))] = name
    return clean


def _source_text(source: dict) -> str:
    """The model card's section on a converted release."""
    files = "\n".join(f"| {role} | `{entry['file']}` | `{entry['sha256']}` |"
                      for role, entry in source.get("files", {}).items())
    published = "\n".join(f"| {k} | {v} |" for k, v in source.get("published", {}).items())
    return f"""## Source

Converted from the official release `{source.get('release')}` (Hub repo `{source.get('repo_id')}`, revision
`{source.get('revision')}`; code {source.get('code')}).

| role | file | sha256 |
|---|---|---|
{files}

Published (ImageNet 256x256, 50k samples, ADM evaluator):

| | |
|---|---|
{published}

Sampling protocol of those numbers, this pipeline's defaults: {source.get('sampling_protocol')}; default guidance
scale {source.get('default_guidance_scale')}.
"""


def _synonyms(name: str) -> list[str]:
    """A label may list synonyms separated by commas (``"tench, Tinca tinca"``)."""
    return [part.strip().lower() for part in name.split(",") if part.strip()]


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_guidance_scale(value: Any, name: str) -> None:
    if not _is_finite_number(value) or value < 0:
        raise InvalidValueError(f"{name} must be a finite number >= 0 (1 = no guidance), got {value!r}")


def _check_finite(values: torch.Tensor, what: str, settings: Optional[dict]) -> None:
    """Raise :class:`InvalidValueError` when ``values`` (floating point) hold a NaN or an infinity."""
    if not values.is_floating_point() or bool(torch.isfinite(values).all()):
        return
    count = int((~torch.isfinite(values)).sum())
    raise InvalidValueError(
        f"sampling failed: {what} hold {count} NaN or infinite value(s) of {values.numel()}"
        + (f" with {', '.join(f'{k}={v!r}' for k, v in settings.items())}" if settings else "")
        + ": a guidance scale or scheduler setting too large for the arithmetic, or a model with broken weights")


# Modules whose classes a saved pipeline's components may be (diffusers refuses to import modules itself).
_COMPONENT_MODULES = ("vfmtok.tokenizer.", "vfmtok.generators.")
# What folders saved before the package rename (vfmtok 0.1 without the `vfmtok.` prefix) name instead.
_LEGACY_COMPONENT_PACKAGES = ("tokenizer", "generators")


def read_model_index(folder: Path) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json``, checked to be a JSON object."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{str(folder)!r} has no model_index.json: not a saved pipeline")
    try:
        config = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{index}: expected a JSON object, got {type(config).__name__}")
    return config


def pipeline_class_name(index: dict[str, Any]) -> Any:
    """``_class_name`` of a model_index.json: a class name, or ``[module, class]`` where diffusers' remote-code
    route names the folder's module file."""
    name = index.get("_class_name")
    if isinstance(name, list) and len(name) == 2 and all(isinstance(part, str) for part in name):
        return name[1]
    return name


def _normalized_index(index: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """model_index.json as this version's loader reads it: a plain ``_class_name`` (the folder's module file is never
    used) and component modules under ``vfmtok.``. Also returns the legacy module names it renamed."""
    normalized, legacy = dict(index), []
    normalized["_class_name"] = pipeline_class_name(index)
    for key, value in index.items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and \
                value[0].split(".")[0] in _LEGACY_COMPONENT_PACKAGES:
            legacy.append(value[0])
            normalized[key] = [f"vfmtok.{value[0]}", value[1]]
    return normalized, legacy


@contextlib.contextmanager
def _loadable_view(folder: Path) -> Iterator[Path]:
    """A temporary folder holding links to the pipeline's component folders and a normalized ``model_index.json``
    (see :func:`_normalized_index`): what diffusers loads from. No ``.py`` file of the folder is reachable from it,
    so loading through this project's classes never runs code from the folder."""
    normalized, legacy = _normalized_index(read_model_index(folder))
    if legacy:
        warnings.warn(f"{str(folder)!r} was saved before vfmtok's modules moved under `vfmtok.` (its "
                      f"model_index.json names {sorted(set(legacy))}). It loads, but diffusers' own loader cannot "
                      f"read it: re-save it with `vfmtok.load_pipeline(OLD).save_pretrained(NEW)`.", FutureWarning,
                      stacklevel=3)
    with tempfile.TemporaryDirectory(prefix="vfmtok-pipeline-") as staging:
        view = Path(staging)
        for key, value in normalized.items():
            if isinstance(value, list) and (folder / key).is_dir():
                (view / key).symlink_to((folder / key).resolve(), target_is_directory=True)
        (view / "model_index.json").write_text(json.dumps(normalized))
        try:
            yield view
        except VFMTokError as error:  # name the user's folder, not this temporary view
            if staging not in str(error):
                raise
            raise type(error)(str(error).replace(staging, str(folder))) from error


def _import_component_modules(index: dict[str, Any]) -> None:
    """Import this project's modules that ``model_index.json`` names for the components: diffusers only resolves
    classes from modules already imported (in a fresh process, e.g. each rank of ``accelerate launch``, they are not).
    Only modules of this project's own packages are imported; anything else is left to diffusers' checks."""
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and \
                value[0].startswith(_COMPONENT_MODULES):
            importlib.import_module(value[0])


class VFMTokPipelineBase(DiffusionPipeline):
    """Shared behaviour of the class-conditional pipelines. Subclasses set ``_image_tokenizer_name`` (the component
    that decodes), ``_raw_output_type`` ("codes" / "latent") and implement ``_sample_chunk``."""

    _image_tokenizer_name: str = ""
    _raw_output_type: str = ""
    _callback_tensor_inputs: list[str] = []

    # -- construction ---------------------------------------------------------------------------------------------
    def _register_labels(self, id2label: Optional[dict], evaluation: Optional[dict], num_classes: int,
                         default_guidance_scale: Optional[float] = None) -> None:
        id2label = default_id2label(num_classes) if id2label is None else _check_id2label(id2label, num_classes)
        if evaluation is not None and not isinstance(evaluation, dict):
            raise InvalidValueError(f"evaluation must be a dict of results, got {type(evaluation).__name__}")
        if default_guidance_scale is not None:
            _check_guidance_scale(default_guidance_scale, "default_guidance_scale")
        self.register_to_config(id2label=id2label, evaluation=evaluation,
                                default_guidance_scale=None if default_guidance_scale is None
                                else float(default_guidance_scale))
        self._label2id: dict[str, list[int]] = {}
        for key, name in id2label.items():
            for synonym in {name.strip().lower(), *_synonyms(name)}:
                self._label2id.setdefault(synonym, []).append(int(key))

    def set_source(self, source: Optional[dict]) -> None:
        """Where the weights came from (a converted release: its files with their sha256, the published numbers
        and the sampling protocol behind them); saved with the pipeline and shown in its model card."""
        if source is not None and not isinstance(source, dict):
            raise InvalidValueError(f"source must be a dict, got {type(source).__name__}")
        self.register_to_config(source=source)

    def resolve_guidance_scale(self, guidance_scale: Optional[float]) -> float:
        """The scale a call uses: the one given, else the pipeline's ``default_guidance_scale`` (the scale its
        evaluation chose, saved with it), else 1 (no guidance)."""
        if guidance_scale is None:
            guidance_scale = self.config.get("default_guidance_scale")
        return 1.0 if guidance_scale is None else guidance_scale

    def set_default_guidance_scale(self, scale: Optional[float]) -> None:
        """The scale ``pipe(...)`` uses when given none (saved with the pipeline); None: no guidance."""
        if scale is not None:
            _check_guidance_scale(scale, "default_guidance_scale")
        self.register_to_config(default_guidance_scale=None if scale is None else float(scale))

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name (from the pipeline's config)."""
        return {int(k): v for k, v in self.config.id2label.items()}

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    # -- class labels ---------------------------------------------------------------------------------------------
    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list[int]:
        """Class name(s) -> ids, case-insensitively against every synonym; unknown names suggest close matches."""
        names = [label] if isinstance(label, str) else list(label)
        ids = []
        for name in names:
            if not isinstance(name, str):
                raise InvalidValueError(f"class names must be strings, got {name!r}")
            found = self._label2id.get(name.strip().lower())
            if found is None:
                if not self._label2id:
                    raise InvalidValueError(f"unknown class name {name!r}: this pipeline has no class names "
                                            f"(id2label is empty); pass class ids in [0, {self.num_classes})")
                close = difflib.get_close_matches(name.strip().lower(), list(self._label2id), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                if len(self.id2label) <= MAX_LISTED_CLASS_NAMES:  # few classes: the whole list is the best hint
                    names = ", ".join(repr(n) for _, n in sorted(self.id2label.items()))
                    hint += f"{' T' if close else '; t'}he {len(self.id2label)} class names: {names}"
                raise InvalidValueError(f"unknown class name {name!r}{hint}")
            if len(found) > 1:
                raise InvalidValueError(f"class name {name!r} is ambiguous: classes {sorted(found)}; pass an id")
            ids.append(found[0])
        return ids

    def resolve_class_labels(self, class_labels: ClassLabels) -> list[int]:
        """An int, a list of ints, a 0-/1-D integer tensor, a class name or a list of names -> a list of class ids."""
        if isinstance(class_labels, torch.Tensor):
            if (class_labels.dtype.is_floating_point or class_labels.dtype.is_complex
                    or class_labels.dtype == torch.bool or class_labels.ndim > 1):
                raise InvalidValueError(f"a class-label tensor must be 0-D or 1-D integers, got dtype "
                                        f"{class_labels.dtype} and shape {tuple(class_labels.shape)}")
            ids = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, str):
            ids = self.get_label_ids(class_labels)
        elif isinstance(class_labels, (bool, np.bool_)) or class_labels is None:
            raise InvalidValueError(f"class labels must be ids or names, got {class_labels!r}")
        elif isinstance(class_labels, (numbers.Integral, np.integer)):
            ids = [int(class_labels)]
        elif isinstance(class_labels, (list, tuple)):
            if all(isinstance(x, str) for x in class_labels) and class_labels:
                ids = self.get_label_ids(class_labels)
            elif all(isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, bool) for x in class_labels):
                ids = [int(x) for x in class_labels]
            else:
                raise InvalidValueError(f"a list of class labels must hold only ints or only names, got "
                                        f"{[type(x).__name__ for x in class_labels][:5]}")
        else:
            raise InvalidValueError(f"class labels must be an int, a str, a list of them or an integer tensor, got "
                                    f"{type(class_labels).__name__}")
        if not ids:
            raise InvalidValueError("class labels are empty: pass at least one class id or name")
        bad = sorted({i for i in ids if not 0 <= i < self.num_classes})
        if bad:
            raise InvalidValueError(f"class ids {bad[:10]} are outside [0, {self.num_classes})")
        return ids

    # -- argument checks ------------------------------------------------------------------------------------------
    def _check_call(self, guidance_scale: float, num_images_per_class: int, batch_size: Optional[int],
                    output_type: str, output_size: Optional[int], callback_on_step_end: Optional[Callable],
                    callback_on_step_end_tensor_inputs: Sequence[str]) -> None:
        _check_guidance_scale(guidance_scale, "guidance_scale")
        for name, value in (("num_images_per_class", num_images_per_class), ("batch_size", batch_size),
                            ("output_size", output_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < 1):
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        allowed = (*OUTPUT_TYPES, self._raw_output_type)
        if output_type not in allowed:
            raise InvalidValueError(f"output_type must be one of {allowed}, got {output_type!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InvalidValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise InvalidValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among "
                                    f"{self._callback_tensor_inputs}")

    @staticmethod
    def _run_callback(callback: Optional[Callable], pipe: "VFMTokPipelineBase", step: int, timestep: Any,
                      tensors: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """diffusers' ``callback_on_step_end(pipe, i, t, callback_kwargs)``: returned tensors replace the inputs."""
        if callback is None:
            return tensors
        returned = callback(pipe, step, timestep, {k: tensors[k] for k in names}) or {}
        return {**tensors, **{k: v for k, v in returned.items() if k in tensors}}

    # -- the call ---------------------------------------------------------------------------------------------------
    def _generate(self, class_labels: ClassLabels, num_images_per_class: int, batch_size: Optional[int],
                  output_type: str, output_size: Optional[int], return_dict: bool,
                  sample_chunk: Callable[[torch.Tensor], torch.Tensor], settings: Optional[dict] = None):
        """Resolve labels, sample in chunks of ``batch_size`` with ``sample_chunk(labels) -> codes / latents``,
        decode and convert to ``output_type``. Non-finite latents or images are an error naming ``settings`` (the
        sampling settings that may have caused them), never a result."""
        ids = self.resolve_class_labels(class_labels)
        if output_size is None:
            output_size = self.config.get("default_output_size")
        labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(num_images_per_class)
        size = batch_size or len(labels)
        raw = torch.cat([sample_chunk(chunk.to(self.device)) for chunk in labels.split(size)])
        _check_finite(raw, f"the sampled {self._raw_output_type}", settings)
        if output_type == self._raw_output_type:
            images: Any = raw
        else:
            tokenizer = getattr(self, self._image_tokenizer_name)
            # a pipeline saved with resize_antialias=False (the VFMTok release's evaluation) resizes without
            # antialiasing; only then is the argument passed, so a tokenizer without it keeps working
            resize = {} if self.config.get("resize_antialias", True) else {"antialias": False}
            decoded = torch.cat([tokenizer.decode(chunk, output_size=output_size, **resize)
                                 for chunk in raw.split(size)])
            _check_finite(decoded, "the decoded images", settings)
            images = self._convert(decoded, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _decode_images(self, tokenizer, raw: torch.Tensor, output_size: Optional[int]) -> torch.Tensor:
        """Codes / latents -> images in [-1, 1] at ``output_size`` (the tokenizer's resize)."""
        return tokenizer.decode(raw, output_size=output_size)

    def _convert(self, images: torch.Tensor, output_type: str) -> Any:
        """Decoded images in [-1, 1] -> "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) in [0, 1] or PIL images."""
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images.cpu()
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)

    # -- saving, loading, model card ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any):
        """Load from a ``save_pretrained`` folder or a Hub repo id. A repo id is first downloaded (or found in the
        cache; ``HF_HUB_OFFLINE`` respected) with ``huggingface_hub.snapshot_download`` using ``revision``,
        ``token``, ``cache_dir`` and ``local_files_only``; the rest of ``kwargs`` go to diffusers (e.g.
        ``torch_dtype``). Components that do not fit each other are refused. No file of the folder is executed
        (the ``.py`` files written for diffusers' own loader are skipped); folders saved before the ``vfmtok.``
        package rename load with a warning."""
        path = Path(_local_snapshot(pretrained_model_name_or_path, kwargs))
        with _loadable_view(path) as view:
            _import_component_modules(read_model_index(view))
            pipe = super().from_pretrained(view, **kwargs)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> None:
        """diffusers' folder (model_index.json, one subfolder per component), the module file diffusers' own loader
        reads (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``) and a model card (README.md)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("push_to_hub"):  # with push_to_hub the files are written before the upload
            self._finish_folder(save_directory)

    def _upload_folder(self, working_dir, repo_id, *args: Any, **kwargs: Any):
        # diffusers writes a generic card just before uploading (save_pretrained(push_to_hub=True), push_to_hub):
        # put ours back, with the repo id in its usage example.
        self._finish_folder(working_dir, repo_id=repo_id)
        return super()._upload_folder(working_dir, repo_id, *args, **kwargs)

    @property
    def remote_code_module(self) -> str:
        """The module file (without ``.py``) that ``model_index.json``'s ``_class_name`` names for diffusers."""
        return type(self).__module__.split(".")[-1]

    def _finish_folder(self, directory: Union[str, os.PathLike], repo_id: Optional[str] = None) -> None:
        """What diffusers' ``save_pretrained`` does not write: ``_class_name`` as ``[module, class]`` with that
        module (imports of the installed vfmtok only), and the model card."""
        directory = Path(directory)
        index = read_model_index(directory)
        cls = type(self)
        components = sorted({(value[0], value[1]) for value in index.values() if isinstance(value, list)
                             and len(value) == 2 and isinstance(value[0], str) and value[0].startswith("vfmtok.")})
        write_remote_code_module(directory, self.remote_code_module, [(cls.__module__, cls.__name__), *components],
                                 f"Lets diffusers load this pipeline: DiffusionPipeline.from_pretrained(<folder or "
                                 f"repo id>, trust_remote_code=True).\nThe component classes are imported too: "
                                 f"diffusers resolves them among imported modules.")
        with atomic_file(directory / DEMO_APP_FILE) as tmp:
            tmp.write_text(DEMO_APP_TEXT)
        index["_class_name"] = [self.remote_code_module, cls.__name__]
        index.pop("_name_or_path", None)  # where it was loaded from: a local path means nothing once published
        with atomic_file(directory / "model_index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self._write_model_card(directory, repo_id)

    def record_evaluation(self, evaluation: dict[str, Any], directory: Optional[Union[str, os.PathLike]] = None
                          ) -> None:
        """Attach evaluation results (with a ``protocol`` entry) to the pipeline's config; with ``directory`` (its
        saved folder) also rewrite ``model_index.json`` and the model card there, atomically, weights untouched."""
        if not isinstance(evaluation, dict):
            raise InvalidValueError(f"evaluation must be a dict of results, got {type(evaluation).__name__}")
        self.register_to_config(evaluation=evaluation)
        if directory is not None:
            with tempfile.TemporaryDirectory(dir=directory) as staging:
                self.save_config(staging)
                os.replace(Path(staging) / "model_index.json", Path(directory) / "model_index.json")
            self._finish_folder(directory)

    def _write_model_card(self, directory: Union[str, os.PathLike], repo_id: Optional[str] = None) -> None:
        with atomic_file(Path(directory) / "README.md") as tmp:
            self.model_card(repo_id).save(str(tmp))

    def component_summaries(self) -> dict[str, dict[str, Any]]:
        """One JSON-ready summary per registered component (for the model card)."""
        summaries = {}
        for name, component in self.components.items():
            if component is None:
                continue
            if hasattr(component, "tokenizer_summary"):
                summary = component.tokenizer_summary()
            elif hasattr(component, "describe"):
                summary = component.describe()
            else:
                summary = {"class": type(component).__name__,
                           **{k: v for k, v in dict(getattr(component, "config", {})).items() if not k.startswith("_")}}
            summaries[name] = summary
        return summaries

    def model_card(self, repo_id: Optional[str] = None):
        """A ``huggingface_hub.ModelCard``: Hub metadata (library, pipeline tag, tags, the evaluation as
        ``model-index``), the components, how to load and sample (with this pipeline's own class names; ``repo_id``
        in the snippets when known), the class names, and the evaluation results (or none). Nothing in it is a local
        path."""
        from huggingface_hub import ModelCard, ModelCardData

        name = type(self).__name__
        where = repo_id or "<this folder or repo id>"
        rows = "\n".join(f"| `{component}` | `{summary.get('class') or summary.get('model')}` | "
                         f"`{json.dumps(summary, default=str)}` |"
                         for component, summary in self.component_summaries().items())
        id2label = self.id2label
        default_scale = self.config.get("default_guidance_scale")
        guidance_text = (f"`pipe(...)` samples with classifier-free guidance {default_scale:g} unless given another "
                         f"`guidance_scale` (1 = none)." if default_scale is not None else
                         "`pipe(...)` samples without guidance unless given a `guidance_scale` above 1.")
        example = repr(id2label.get(207) or next(iter(id2label.values()), None) or 0)
        cli_example = (f'--class-names "{id2label.get(207) or next(iter(id2label.values()))}"' if id2label
                       else "--class-ids 0")
        evaluation = self.config.get("evaluation") or {}
        if evaluation:
            protocol = evaluation.get("protocol", "not recorded")
            results = "\n".join(f"| {k} | {v} |" for k, v in evaluation.items() if k != "protocol")
            evaluation_text = f"Protocol: {protocol}\n\n| metric | value |\n|---|---|\n{results}"
        else:
            evaluation_text = "Not evaluated."
        tags = ["vfmtok", "class-conditional", "image-generation", name, *(["imagenet"] if self.num_classes == 1000
                                                                           else [])]
        data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation", tags=tags,
                             model_name=repo_id.split("/")[-1] if repo_id else name,
                             eval_results=self._eval_results() or None)
        classes = "\n".join(f"| {i} | {label} |" for i, label in sorted(id2label.items())) if id2label else ""
        class_text = (f"| id | name |\n|---|---|\n{classes}" if classes else
                      f"This pipeline has no class names: pass class ids in [0, {self.num_classes}).")
        if len(id2label) > 20:
            class_text = f"<details><summary>{len(id2label)} classes</summary>\n\n{class_text}\n\n</details>"
        content = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1] if repo_id else name}

A class-conditional image generator of the vfmtok suite: `{name}`,
{self.num_classes} classes.

## Usage

With the `vfmtok` package installed:

```python
import torch
from vfmtok import {name}

pipe = {name}.from_pretrained("{where}")
image = pipe({example}, generator=torch.Generator().manual_seed(0)).images[0]
```

With diffusers' own loader (`trust_remote_code=True` lets diffusers read `{self.remote_code_module}.py`, a file of
imports from the installed `vfmtok` package and nothing else):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{where}", trust_remote_code=True)
```

On the command line: `vfmtok sample --pipeline {where} {cli_example} --output grid.png`.

A web page to try it (Gradio, `pip install "vfmtok[demo]"`): `vfmtok demo --pipeline {where}`, or `python
{DEMO_APP_FILE}` in this folder (the file a Hugging Face Space runs).

{guidance_text}

## Classes

{class_text}

## Components

| component | class | summary |
|---|---|---|
{rows}

The components were trained with the `vfmtok train` commands; their configs are in each subfolder's `config.json`.

## Evaluation

{evaluation_text}
"""
        source = self.config.get("source")
        if source:
            content += "\n" + _source_text(source)
        return ModelCard(content)

    # what callers other than __call__'s own arguments set for every call (e.g. the benchmark's sampler options)
    _SET_BY_CALLER = ("class_labels", "generator", "output_type", "return_dict", "output_size", "batch_size",
                      "guidance_scale", "num_images_per_class")

    def check_sampler_options(self, options: dict[str, Any]) -> None:
        """Refuse sampler options this pipeline's ``__call__`` does not take (an AR option such as ``temperature``
        given to a flow pipeline, a flow option such as ``num_inference_steps`` to an AR one), naming them and the
        options it does take, before any work."""
        parameters = inspect.signature(type(self).__call__).parameters
        accepted = sorted(name for name, p in parameters.items() if name != "self" and name not in self._SET_BY_CALLER
                          and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise InvalidValueError(f"{type(self).__name__} takes no sampler option(s) {unknown} (they belong to the "
                                    f"other kind of pipeline); its options: {accepted}")

    def weights_fingerprint(self) -> str:
        """sha256 of everything that determines what the pipeline generates: every component's class, config and
        weights (each module's state dict and the frozen modules it holds outside it, e.g. a tokenizer's VFM).
        Equal for the same weights wherever they are loaded from; a benchmark keys its samples by it."""
        digest = hashlib.sha256()
        for name, component in sorted(self.components.items()):
            digest.update(f"{name}:{type(component).__name__}:".encode())
            config = getattr(component, "config", None)
            if config is not None:
                digest.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                                         sort_keys=True, default=str).encode())
            if not isinstance(component, torch.nn.Module):
                continue
            modules = [component, *getattr(component, "_held_frozen", lambda: [])()]
            for index, module in enumerate(modules):
                for key, tensor in module.state_dict().items():
                    tensor = tensor.detach().cpu().contiguous()
                    digest.update(f"{index}/{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()

    def _eval_results(self) -> list:
        """The evaluation's numbers as Hub ``model-index`` entries (metric name: the key, e.g. ``gFID (cfg-1.5)``)."""
        from huggingface_hub import EvalResult

        evaluation = self.config.get("evaluation") or {}
        dataset = "imagenet-1k" if self.num_classes == 1000 else "custom"
        return [EvalResult(task_type="unconditional-image-generation", dataset_type=dataset, dataset_name=dataset,
                           metric_type=key.split(" ")[0].lower(), metric_name=key, metric_value=value)
                for key, value in evaluation.items() if key != "protocol" and _is_finite_number(value)]


def captioned_image_grid(images: list, captions: list[str], columns: int,
                         cell_size: Optional[int] = None) -> "PIL.Image.Image":
    """PIL images in rows of ``columns``, each with its caption below (PIL's default font, clipped to the cell).
    ``cell_size``: each image resized to that side for viewing (nearest neighbour when enlarging, so the pixels the
    model made stay visible as blocks; Lanczos when shrinking)."""
    from PIL import Image, ImageDraw

    if cell_size is not None:
        if isinstance(cell_size, bool) or not isinstance(cell_size, int) or cell_size < 1:
            raise InvalidValueError(f"cell_size must be a positive integer, got {cell_size!r}")
        images = [image.resize((cell_size, cell_size), Image.NEAREST if cell_size >= max(image.size) else
                               Image.LANCZOS) for image in images]
    width, height = images[0].size
    caption_height = 14
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * width, (k // columns) * (height + caption_height)
        grid.paste(image, (x, y))
        while caption and draw.textlength(caption) > width - 2:
            caption = caption[:-1]
        draw.text((x + 1, y + height + 1), caption, fill="black")
    return grid


def _local_snapshot(path_or_id: Union[str, os.PathLike], kwargs: dict[str, Any]) -> str:
    """A local folder as is; a Hub repo id through ``snapshot_download`` (hub keywords are taken out of ``kwargs``)."""
    hub = {k: kwargs.pop(k, None) for k in ("revision", "token", "cache_dir")}
    local_files_only = kwargs.pop("local_files_only", False)
    path = str(path_or_id)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(path, local_files_only=local_files_only, **hub)
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise WeightsUnavailableError(f"{path!r} is neither a local pipeline folder nor a Hub repo that can be "
                                      f"downloaded or found in the cache: {error}") from error


def load_pipeline(path_or_id: Union[str, os.PathLike], **kwargs: Any) -> VFMTokPipelineBase:
    """Load a saved pipeline of any of this project's classes (dispatch on model_index.json's ``_class_name``)."""
    path = _local_snapshot(path_or_id, kwargs)
    name = pipeline_class_name(read_model_index(Path(path)))
    if name not in PIPELINE_CLASSES:
        raise CheckpointError(f"{str(path_or_id)!r} holds a {name!r} pipeline; expected one of {sorted(PIPELINE_CLASSES)}")
    module, attribute = PIPELINE_CLASSES[name].split(":")
    pipe = getattr(importlib.import_module(module), attribute).from_pretrained(path, **kwargs)
    pipe.register_to_config(_name_or_path=str(path_or_id))
    return pipe
