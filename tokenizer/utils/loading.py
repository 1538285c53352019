"""Reading weights safely and loading them strictly: the one implementation every model and converter uses.

* :func:`read_state_dict` reads a flat ``name -> tensor`` file (safetensors, or ``torch.load(weights_only=True)``: no
  code in the file is ever executed).
* :func:`read_training_checkpoint` finds the weights inside a checkpoint saved by a training script.
* :func:`load_state_dict_strict` and :class:`StrictLoadingMixin` refuse a missing, unexpected or mis-shaped weight and
  name every one of them, where torch stops at the first and diffusers only warns (and, with
  ``low_cpu_mem_usage=True``, leaves a missing parameter on the meta device).
* :func:`rename_state_dict` is the loop of every checkpoint converter: strip the ``module.`` / ``_orig_mod.`` prefixes
  of training wrappers, rename or drop each key by ``(pattern, replacement)`` rules, and refuse a file with keys no
  rule knows (a mistaken file is never half-converted).
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import re
import typing
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from vfmtok.tokenizer.utils.errors import CheckpointError, ConfigError, InvalidValueError, MissingFileError
from vfmtok.tokenizer.utils.remote_code import AUTO_MAP_KEY, write_auto_model_files
from vfmtok.tokenizer.utils.types import check_value

__all__ = ["read_state_dict", "read_training_checkpoint", "key_mismatch_message", "load_state_dict_strict",
           "StrictLoadingMixin", "strip_wrapper_prefixes", "rename_by_rules", "rename_state_dict", "RenameRules",
           "meta_tensors", "download_state_dict", "DOWNLOAD_ERRORS", "bundled_file", "nonfinite_weights",
           "check_finite_weights", "read_npz", "is_hub_id", "numpy_array_globals",
           "read_saved_config"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# (pattern, replacement) applied in order; the first match wins. ``None`` drops the key.
RenameRules = Sequence[tuple[str, Optional[str]]]


def numpy_array_globals() -> list:
    """What ``torch.load(weights_only=True)`` must additionally allow to rebuild plain numpy arrays of floats: exactly
    numpy's array reconstruction (``_reconstruct``, under the name numpy 1.x pickles it with and under numpy 2's),
    the ``ndarray`` and ``dtype`` classes and the float dtype classes. Nothing that runs code: ``_reconstruct`` is
    ``ndarray.__new__``, and an object dtype (whose items could be anything) is not allowed."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"),
               (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += [type(np.dtype(kind)) for kind in ("f2", "f4", "f8")]
    return allowed


def read_state_dict(path: Union[str, Path], allow_numpy: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` file: ``.safetensors``, or a torch file read with ``weights_only=True``.

    ``allow_numpy``: the torch file may also hold numpy float arrays (VFMTok2 saves its latent statistics so), read
    through :func:`numpy_array_globals` and returned as tensors."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        elif allow_numpy:
            with torch.serialization.safe_globals(numpy_array_globals()):
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a foreign format, a pickle weights_only refuses
        raise CheckpointError(f"cannot read weights from {str(path)!r}: {type(error).__name__}: {error}") from error
    if allow_numpy and isinstance(state_dict, dict):
        state_dict = {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
                      for k, v in state_dict.items()}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{str(path)!r} is not a flat state dict (name -> tensor)")
    return state_dict


def read_npz(path: Union[str, Path], what: str = "file") -> dict:
    """Every array of an ``.npz`` file (``allow_pickle=False``: an object array is refused, never unpickled). A file
    that is missing, empty, truncated, no zip, a plain ``.npy`` or holds objects is an :class:`InvalidValueError`
    naming it (``what``: how the error names its role, e.g. "reference")."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {str(path)!r} does not exist or is no file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single array (.npy), not an .npz archive of named arrays")
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, KeyError, AttributeError, TypeError, zipfile.BadZipFile) as error:
        raise InvalidValueError(f"{what} {str(path)!r} is no readable .npz of plain arrays: "
                                f"{type(error).__name__}: {str(error)[:200]}") from None


def is_hub_id(source: str) -> bool:
    """Whether ``source``, which is no existing local path, reads as a Hub repository id (``org/name``) rather than a
    local path that does not exist (absolute, relative with ``./``, ``~``, or with a file suffix)."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).suffix


def read_saved_config(loader, pretrained_model_name_or_path, subfolder: Optional[str] = None, **hub) -> dict:
    """The ``config.json`` of a saved model folder or Hub repo, through diffusers' ``loader.load_config`` (any
    ``ConfigMixin`` class). A local folder that does not exist is a :class:`MissingFileError` (never a download
    attempt); a missing, unreadable or non-object config is a :class:`CheckpointError` naming the file."""
    source = str(pretrained_model_name_or_path)
    local = Path(source).expanduser()
    if not local.exists() and not is_hub_id(source):
        raise MissingFileError(f"model folder {source!r} does not exist (and is no Hub id 'org/name')")
    where = str(local / (subfolder or "") / loader.config_name) if local.exists() else source
    try:
        config = loader.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub)
    except (OSError, ValueError) as error:  # diffusers: no config.json, invalid JSON, a failed download
        raise CheckpointError(f"{where}: cannot read the model's config: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(config).__name__}")
    return config


def _loading_failure(error: BaseException) -> bool:
    """Whether an error raised by diffusers' ``from_pretrained`` is about the folder's files (an unreadable, missing
    or mis-shaped weights file, a config it cannot use) rather than a bug or the machine (out of memory)."""
    from safetensors import SafetensorError

    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, (OSError, ValueError, SafetensorError)):
        return True
    return isinstance(error, RuntimeError) and "state_dict" in str(error)


def read_training_checkpoint(path: Union[str, Path], prefer: str = "ema",
                             containers: Sequence[str] = ("ema", "model", "state_dict"),
                             what: str = "tokenizer") -> dict[str, torch.Tensor]:
    """Read a checkpoint saved by a training script safely and return the state dict in it.

    Uses ``torch.load(weights_only=True)``: no code in the file is executed. The one non-tensor class the official
    training scripts (VFMTok's, LlamaGen's ``train_c2i.py``) store, the ``argparse.Namespace`` of their arguments
    under ``"args"``, is allowed through torch's safe-globals mechanism (it holds plain values and runs nothing);
    anything else that is not a tensor or a container is refused. The weights are looked up under
    ``prefer`` (``"ema"`` or ``"model"``, when the file holds both), then under each of ``containers``, else the file
    must itself be a flat dict of tensors. ``what`` names the weights in error messages.
    """
    if prefer not in ("ema", "model"):
        raise CheckpointError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's message names the offending global
        raise CheckpointError(
            f"torch.load(weights_only=True) refused {str(path)!r}: {error}\n"
            "The file contains Python objects besides tensors and training arguments. Only if you trust where the file comes from, re-save just its tensors with\n"
            "  python -c \"import torch; c = torch.load('IN', map_location='cpu', weights_only=False); "
            "torch.save({k: c[k] for k in ('ema', 'model') if k in c}, 'OUT')\"\n"
            "and convert OUT instead; or allow the specific class with torch.serialization.add_safe_globals."
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    for key in (prefer, *containers):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(f"{str(path)!r} has no {what} weights: expected one of {list(containers)} or a flat "
                          f"state dict, found keys {sorted(checkpoint)[:10]}")


def key_mismatch_message(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = (),
                         hint: str = "", limit: int = 10) -> str:
    """What is missing, unexpected or mis-shaped (with counts and examples), and ``hint`` on what to do."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing weight(s), e.g. {list(missing)[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {list(unexpected)[:limit]}")
    if mismatched:
        parts.append(f"{len(mismatched)} weight(s) of the wrong shape, e.g. {list(mismatched)[:limit]}")
    return "checkpoint does not match the model: " + "; ".join(parts) + (f". {hint}" if hint else "")


def _shape_mismatches(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    return [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            for key, value in state_dict.items() if key in own and tuple(value.shape) != tuple(own[key].shape)]


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "",
                           hint: str = "", describe_missing: Callable[[str], str] = str,
                           assign: bool = False) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` that raises :class:`CheckpointError` naming every missing
    (through ``describe_missing``, e.g. with its name in the original file), unexpected or mis-shaped key, with
    ``source`` (where the weights come from) and ``hint`` (what to do) in the message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = _shape_mismatches(own, state_dict)
    if missing or unexpected or mismatched:
        prefix = f"cannot load {source}: " if source else ""
        raise CheckpointError(prefix + key_mismatch_message([describe_missing(k) for k in missing], unexpected,
                                                            mismatched, hint))
    nn.Module.load_state_dict(module, dict(state_dict), strict=True, assign=assign)


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (never given a value)."""
    return [name for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
            if tensor.is_meta]


def nonfinite_weights(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [name for name, tensor in state_dict.items()
            if torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex())
            and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())]


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming every weight of ``state_dict`` that holds a NaN or an infinity."""
    bad = nonfinite_weights(state_dict)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight(s) hold NaN or infinite values, e.g. {bad[:10]} (a "
                              "diverged or corrupted run); pass allow_nonfinite=True to load them anyway")


def _subclass_names(cls: type) -> set[str]:
    """The names of ``cls`` and of every subclass of it defined so far."""
    names, pending = set(), [cls]
    while pending:
        current = pending.pop()
        names.add(current.__name__)
        pending += current.__subclasses__()
    return names


class StrictLoadingMixin:
    """For diffusers ``ModelMixin`` subclasses (list it first among the bases): ``from_pretrained`` and
    ``load_state_dict`` raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped weight, where
    diffusers and torch would only warn or fail on the first. ``from_pretrained`` accepts diffusers' pipeline-loader
    arguments (``low_cpu_mem_usage=True`` included) and refuses a model left with any tensor on the meta device.
    ``converter`` names the module that converts official checkpoints (shown in the error)."""

    converter = "vfmtok.tokenizer.convert"

    @classmethod
    def _loading_hint(cls) -> str:
        return (f"Check that the config matches the checkpoint (or convert an official checkpoint with "
                f"`{cls.converter}`).")

    # from_pretrained arguments that say where config.json is (passed on to ``load_config``).
    _HUB_KWARGS = ("subfolder", "cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")

    @classmethod
    def check_saved_config(cls, pretrained_model_name_or_path, **kwargs) -> dict:
        """The ``config.json`` of a saved model, checked against the constructor: an unknown (e.g. misspelt) key,
        which diffusers would only warn about, and a value of the wrong type raise :class:`CheckpointError` naming
        the key (and the expected type and the value). Keys starting with ``_`` (diffusers' own) are ignored."""
        hub = {k: kwargs[k] for k in cls._HUB_KWARGS if kwargs.get(k) is not None}
        config = read_saved_config(cls, pretrained_model_name_or_path, **hub)
        where = f"{pretrained_model_name_or_path}: {cls.config_name}"
        saved_class = config.get("_class_name")
        accepted = _subclass_names(cls)
        if saved_class is not None and saved_class not in accepted:
            raise CheckpointError(f"{where}: the folder holds a {saved_class!r} (_class_name), not a {cls.__name__} "
                                  f"(accepted: {sorted(accepted)}); load it with its own class")
        target = cls.__init__
        parameters = {name: p for name, p in inspect.signature(target).parameters.items()
                      if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # an annotation that cannot be resolved here: check names only
            hints = {}
        unknown = sorted(k for k in config if not k.startswith("_") and k != AUTO_MAP_KEY and k not in parameters)
        if unknown:
            raise CheckpointError(f"{where}: unknown parameter(s) {unknown} for {cls.__name__}; accepted: "
                                  f"{sorted(parameters)}")
        for key, value in config.items():
            if key.startswith("_") or key == AUTO_MAP_KEY:
                continue
            try:
                check_value(key, value, hints.get(key, typing.Any))
            except ConfigError as error:
                raise CheckpointError(f"{where}: {error}") from None
        missing = sorted(name for name, p in parameters.items() if p.default is inspect.Parameter.empty
                         and name not in config)
        if missing:
            raise CheckpointError(f"{where}: missing required parameter(s) {missing} for {cls.__name__}")
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_nonfinite: bool = False, **kwargs):
        """diffusers' ``from_pretrained``, strictly (see the class). A weight that is NaN or infinite raises
        :class:`CheckpointError` naming it; ``allow_nonfinite=True`` loads it anyway (for inspecting a broken run)."""
        cls.check_saved_config(pretrained_model_name_or_path, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("use_safetensors") is None:  # never diffusers' fallback to a pickled .bin file
            kwargs["use_safetensors"] = True
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except Exception as error:
            if not _loading_failure(error):
                raise
            raise CheckpointError(f"{pretrained_model_name_or_path}: cannot load the {cls.__name__} weights: "
                                  f"{type(error).__name__}: {str(error)[:300]}. " + cls._loading_hint()) from error
        mismatched = [f"{key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in info["mismatched_keys"]]
        if info["missing_keys"] or info["unexpected_keys"] or mismatched:
            raise CheckpointError(f"{pretrained_model_name_or_path}: " + key_mismatch_message(
                info["missing_keys"], info["unexpected_keys"], mismatched, cls._loading_hint()))
        left_on_meta = meta_tensors(model)
        if left_on_meta:
            raise CheckpointError(f"{pretrained_model_name_or_path}: no value for {len(left_on_meta)} weight(s), "
                                  f"e.g. {left_on_meta[:10]}. " + cls._loading_hint())
        if not allow_nonfinite:
            check_finite_weights(model.state_dict(), str(pretrained_model_name_or_path))
        return (model, info) if want_info else model

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # ``auto_map`` points diffusers' AutoModel at modeling_vfmtok.py; it is no constructor argument
        config_dict = {k: v for k, v in config_dict.items() if k != AUTO_MAP_KEY}
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """diffusers' ``save_pretrained`` plus what ``diffusers.AutoModel`` needs to load the folder
        (``trust_remote_code=True``; see :mod:`vfmtok.tokenizer.utils.remote_code`)."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process and not kwargs.get("push_to_hub"):  # with push_to_hub: written before the upload
            write_auto_model_files(save_directory, type(self))

    def _upload_folder(self, working_dir, *args, **kwargs):
        write_auto_model_files(working_dir, type(self))
        return super()._upload_folder(working_dir, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not strict:
            return nn.Module.load_state_dict(self, state_dict, strict=False, assign=assign)
        load_state_dict_strict(self, state_dict, hint=self._loading_hint(), assign=assign)
        return nn.modules.module._IncompatibleKeys([], [])


def strip_wrapper_prefixes(key: str) -> str:
    """Remove the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes training wrappers add to keys."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def rename_by_rules(key: str, rules: RenameRules) -> tuple[bool, Optional[str]]:
    """Apply the first ``(pattern, replacement)`` rule whose pattern matches ``key`` -> (matched, new name, or None
    when the rule drops the key)."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return True, None if replacement is None else re.sub(pattern, replacement, key)
    return False, None


def rename_state_dict(state_dict: Mapping[str, torch.Tensor],
                      rename: Union[RenameRules, Callable[[str], tuple[bool, Optional[str]]]],
                      what: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rename every key of an official state dict -> (converted, dropped: original key -> tensor).

    ``rename`` is a list of rules (see :func:`rename_by_rules`) or a function of the prefix-stripped key returning
    (matched, new name or None to drop). Raises :class:`CheckpointError` listing every key it does not know, saying
    the file is not ``what``.
    """
    rename_fn = rename if callable(rename) else (lambda key: rename_by_rules(key, rename))
    converted: dict[str, torch.Tensor] = {}
    dropped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        matched, new_key = rename_fn(strip_wrapper_prefixes(key))
        if not matched:
            unknown.append(key)
        elif new_key is None:
            dropped[key] = tensor
        else:
            converted[new_key] = tensor
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) of the checkpoint are not {what} weights, e.g. {unknown[:10]}")
    return converted, dropped


# Errors a failed download raises (urllib's URLError / HTTPError and socket / SSL errors are OSErrors).
DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError)


def download_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A state dict from ``url`` through torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), tensors only. Whatever
    the download prints (``Downloading: ...``, progress) goes to stderr: stdout is kept for the commands' JSON."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)


def bundled_file(pretrained_model_name_or_path: Union[str, Path], filename: str,
                 hub_kwargs: Mapping[str, object]) -> Optional[str]:
    """The local path of ``filename`` inside a saved model folder (a directory, or a Hub repo id: downloaded through
    huggingface_hub's cache, honouring ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``
    and ``HF_HUB_OFFLINE``), or None when the folder has no such file."""
    subfolder = hub_kwargs.get("subfolder") or ""
    local = Path(pretrained_model_name_or_path) / subfolder
    if local.is_dir():
        path = local / filename
        return str(path) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(str(pretrained_model_name_or_path), filename, subfolder=subfolder or None,
                               revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"),
                               cache_dir=hub_kwargs.get("cache_dir"),
                               local_files_only=bool(hub_kwargs.get("local_files_only", False)))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
