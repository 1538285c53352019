"""Checking a value against a type annotation: the one implementation the config files (:mod:`vfmtok.pipelines.config`) and
the ``config.json`` of saved models (:class:`vfmtok.tokenizer.utils.loading.StrictLoadingMixin`) use."""
from __future__ import annotations

import collections.abc
import inspect
import math
import numbers
import types
import typing
from typing import Any, Union

from vfmtok.tokenizer.utils.errors import ConfigError, InvalidValueError

__all__ = ["check_value", "type_name", "finite_number", "positive_int", "class_label_tensor"]


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"a list of {args}" if origin in (tuple, list, collections.abc.Sequence) else str(annotation)
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _wrong(key: str, annotation: Any, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = (" (YAML reads numbers such as 4e-4 without a dot in the mantissa, and quoted numbers, as strings; "
                    "write 4.0e-4)")
        except ValueError:
            pass
    return ConfigError(f"{key}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}{hint}")


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (int, float, bool, str, dict, Optional / unions, tuple / list /
    Sequence of those); returns it with ints widened to floats and lists turned into tuples where annotated so.
    Annotations it does not know accept anything."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(key, value, option)
            except ConfigError:
                continue
        raise _wrong(key, annotation, value)
    if annotation is type(None):
        if value is not None:
            raise _wrong(key, annotation, value)
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise _wrong(key, annotation, value)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(key, annotation, value)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(key, annotation, value)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _wrong(key, annotation, value)
        return value
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _wrong(key, annotation, value)
        return value
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, annotation, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
            items = [check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    return value


type_name = _type_name


# ----------------------------------------------------------------------------------------------------------------------
# Arguments of the samplers (and anything else a user passes as a number)
# ----------------------------------------------------------------------------------------------------------------------
def finite_number(name: str, value: Any) -> float:
    """``value`` as a float: a real number (a Python or NumPy number, or a one-element tensor), not a bool, not NaN
    or infinite; else :class:`InvalidValueError` naming ``name``."""
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a one-element tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidValueError(f"{name} must be a finite number, got {value}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (an integral Python / NumPy integer, not a bool, not a float such as 2.5 or 2.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidValueError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    return int(value)


def class_label_tensor(labels: Any, name: str = "class_labels"):
    """Class labels as a LongTensor: a list / tuple of Python or NumPy integers, or an integer tensor. Floats (even
    ``1.0``: ``torch.as_tensor(..., dtype=long)`` would truncate ``1.5`` to 1) and bools are refused."""
    import torch

    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise InvalidValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
        return labels
    if hasattr(labels, "dtype") and hasattr(labels, "tolist"):  # a NumPy array
        if labels.dtype.kind not in "iu":
            raise InvalidValueError(f"{name} must hold integers, got dtype {labels.dtype}")
        return torch.as_tensor(labels, dtype=torch.long)
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = [labels]
    if not isinstance(labels, (list, tuple)):
        raise InvalidValueError(f"{name} must be an integer tensor or a list of integers, got "
                                f"{type(labels).__name__}")
    bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        raise InvalidValueError(f"{name} must be integers, got {bad[:5]} in {list(labels)[:10]}")
    return torch.as_tensor([int(v) for v in labels], dtype=torch.long)
