"""FID, sFID, precision / recall and IS of image sets, with the ADM protocol (openai/guided-diffusion's evaluator):
torch-fidelity's port of the TF "inception-2015-12-05" network, pool3 (2048-d) features for FID and precision /
recall (k = 3), the first 7 channels of ``mixed_6/conv`` (17 x 17, flattened in TF's NHWC order: 2023-d) for sFID,
the unbiased logits for IS. Images enter as uint8 RGB; the network resizes them to 299 px itself (TF-compatible
bilinear), as the ADM evaluator does.

Sources (:func:`load_source`):

* an image folder (PNG / JPEG / ..., all of one size) or an ``.npz`` of uint8 images (``arr_0``, NHWC: ADM sample
  batches and the ADM reference batch);
* a dataset (a folder with ``labels.csv`` or class sub-folders, a ``save_to_disk`` folder, or a Hub dataset id, as
  :func:`vfmtok.pipelines.data.load_image_dataset` reads them): every image ADM-centre-cropped to ``dataset_size``
  (256 by default), as the ADM reference batches were made;
* an ADM reference batch such as ``VIRTUAL_imagenet256_labeled.npz``: its precomputed ``mu`` / ``sigma`` (the full
  training set) give FID, ``mu_s`` / ``sigma_s`` sFID, and its 10k images precision / recall;
* a statistics file written by :func:`save_statistics` (``.npz`` with ``mu``, ``sigma``, ``mu_s``, ``sigma_s``,
  ``num_samples``, ``extractor_sha256``): FID and sFID only.

Feature statistics of image sources are cached under their content hash and the extractor's sha256
(``$VFMTOK_CACHE/fid-features``; a folder or dataset by its images' bytes, not their names), so a reference is
measured once and a changed one is measured again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from vfmtok.tokenizer.utils.atomic import atomic_file
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError
from vfmtok.tokenizer.utils.loading import is_hub_id, read_npz
from vfmtok.evaluation.metrics import (GaussianStatistics, feature_statistics, frechet_distance_of, inception_score,
                      precision_recall, warn_if_few)

__all__ = ["InceptionFeatures", "ImageSource", "load_source", "source_features", "compare_sources",
           "check_sample_counts", "save_statistics", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]


def _cache_root() -> Path:
    from vfmtok.evaluation.inception_weights import default_cache_dir

    return default_cache_dir().parent


class InceptionFeatures:
    """pool3, spatial (sFID) and, when the weights have the classification layer, logit features of uint8 images."""

    def __init__(self, inception_weights: Optional[str] = None, device: str | torch.device = "cpu"):
        from vfmtok.evaluation.inception_weights import load_inception, resolve_inception_weights

        self.weights = resolve_inception_weights(inception_weights)
        self.device = torch.device(device)
        # channels-last convolutions: 1.4x the images/s of the default layout on CPU (measured), same results
        self.net = load_inception(self.weights, device=self.device).to(memory_format=torch.channels_last)
        self.has_fc = bool(self.weights.has_fc)
        self._captured: dict[str, torch.Tensor] = {}
        # mixed_6/conv of the TF graph is the 1x1 branch (conv, batch norm, ReLU) of the block after Mixed_6c.
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: self._captured.__setitem__("spatial", out))
        self.net.AvgPool.register_forward_hook(lambda m, i, out: self._captured.__setitem__("pool", out))

    @property
    def sha256(self) -> str:
        return self.weights.sha256

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """uint8 images (B, 3, H, W) -> float64 ``pool`` (B, 2048), ``spatial`` (B, 2023), ``logits`` (B, 1008)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise InvalidValueError(f"expected uint8 RGB images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self._captured.clear()
        self.net(images.to(self.device))
        pool = self._captured["pool"].flatten(1).double()
        spatial = self._captured["spatial"][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).double()
        out = {"pool": pool.cpu().numpy(), "spatial": spatial.cpu().numpy()}
        if self.has_fc:
            out["logits"] = (pool @ self.net.fc.weight.double().T).cpu().numpy()
        return out


@dataclass
class ImageSource:
    """Images (lazily, as uint8 batches) and/or precomputed statistics, with a content hash."""

    path: Path
    kind: str  # "folder" | "npz" | "statistics" | "dataset"
    files: list[Path] = field(default_factory=list)
    dataset: Any = None  # kind "dataset": a datasets.Dataset (undecoded images), centre-cropped to dataset_size
    dataset_size: int = 256
    array: Optional[np.ndarray] = None  # (N, H, W, 3) uint8
    statistics: dict[str, GaussianStatistics] = field(default_factory=dict)  # "pool", "spatial"
    content_hash: str = ""

    @property
    def num_images(self) -> int:
        if self.kind == "dataset":
            return len(self.dataset)
        return len(self.files) if self.kind == "folder" else (0 if self.array is None else len(self.array))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, H, W) batches of every image, in a fixed order."""
        size = None
        for start in range(0, self.num_images, batch_size):
            if self.kind == "dataset":
                chunk = np.stack([_dataset_image(self.dataset[i]["image"], self.dataset_size)
                                  for i in range(start, min(start + batch_size, self.num_images))])
            elif self.kind == "folder":
                arrays = []
                for path in self.files[start:start + batch_size]:
                    arrays.append(_read_rgb(path))
                    if size is None:
                        size = arrays[-1].shape
                    if arrays[-1].shape != size:
                        raise InvalidValueError(f"{path}: image of shape {arrays[-1].shape}; the folder's images "
                                                f"must all have the shape of the first, {size}")
                chunk = np.stack(arrays)
            else:
                chunk = self.array[start:start + batch_size]
            yield torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as error:  # a decompression bomb is no OSError
        raise InvalidValueError(f"cannot read image {str(path)!r}: {error}") from None


def _dataset_image(image: dict[str, Any], size: int) -> np.ndarray:
    from vfmtok.pipelines.data import adm_center_crop, decode_image

    return np.asarray(adm_center_crop(decode_image(image), size), dtype=np.uint8)


def _dataset_source(source: str, size: int) -> ImageSource:
    from vfmtok.pipelines.data import load_image_dataset

    dataset = load_image_dataset(source)
    if not hasattr(dataset, "__len__"):
        raise InvalidValueError(f"{source!r}: a streamed dataset cannot be a reference; download it first")
    return ImageSource(Path(source), "dataset", dataset=dataset, dataset_size=size,
                       content_hash=_hash_dataset(dataset, size))


def _hash_dataset(dataset: Any, size: int) -> str:
    """What determines a dataset source's images: every image's bytes (a file's contents where the dataset holds a
    path, as a local folder's does: not its name), in order, and the crop size. Not datasets' fingerprint, which for
    a local folder follows the file names only."""
    digest = hashlib.sha256(f"dataset/{size}/{len(dataset)}".encode())
    for batch in dataset.select_columns(["image"]).iter(batch_size=256):
        for image in batch["image"]:
            data = image.get("bytes") if isinstance(image, dict) else None
            if data is None and isinstance(image, dict) and image.get("path"):
                try:
                    data = Path(image["path"]).read_bytes()
                except OSError:
                    data = f"unreadable:{image['path']}".encode()  # decoding reports it
            digest.update(hashlib.sha256(data if data is not None else repr(image).encode()).digest())
    return digest.hexdigest()


def _is_dataset_folder(path: Path) -> bool:
    """A labelled image folder or a ``save_to_disk`` dataset, rather than a plain folder of generated images."""
    return (path / "labels.csv").is_file() or (path / "dataset_info.json").is_file() or \
        (path / "state.json").is_file() or any(p.is_dir() for p in path.iterdir())


def _hash_files(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def load_source(path: str | Path, dataset_size: int = 256) -> ImageSource:
    """An image folder, an ``.npz`` of images / ADM reference batch, a statistics file or a dataset (see the module
    docstring). A string that is no local path is read as a Hub dataset id."""
    source, path = str(path), Path(path)
    if not path.exists():
        if is_hub_id(source):
            return _dataset_source(source, dataset_size)
        raise MissingFileError(f"image source {str(path)!r} does not exist")
    if path.is_dir() and _is_dataset_folder(path):
        return _dataset_source(source, dataset_size)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InvalidValueError(f"{str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return ImageSource(path, "folder", files=files, content_hash=_hash_files(files))
    if path.suffix != ".npz":
        raise InvalidValueError(f"{str(path)!r} is neither an image folder nor an .npz file")
    data = read_npz(path, "image source")
    keys = set(data)
    statistics = {}
    for name, (mu, sigma) in {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        if {mu, sigma} <= keys:
            count = _count(path, data["num_samples"]) if "num_samples" in keys else 0
            statistics[name] = _file_statistics(path, mu, sigma, data[mu], data[sigma], count)
    array = data.get("arr_0")
    if array is None and "pool" not in statistics:
        raise InvalidValueError(f"{str(path)!r} has neither images (arr_0) nor statistics (mu, sigma); keys: "
                                f"{sorted(keys)}")
    if array is not None and (array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3):
        raise InvalidValueError(f"{str(path)!r}: arr_0 must be uint8 images (N, H, W, 3), got {array.dtype} "
                                f"{array.shape}")
    if array is not None and not len(array) and "pool" not in statistics:
        raise InvalidValueError(f"{str(path)!r} holds 0 images (arr_0 is empty) and no statistics")
    kind = "npz" if array is not None else "statistics"
    return ImageSource(path, kind, array=array, statistics=statistics,
                       content_hash=hashlib.sha256(path.read_bytes()).hexdigest())


def _count(path: Path, value: np.ndarray) -> int:
    """A statistics file's ``num_samples``: one whole number >= 0."""
    if value.ndim != 0 or value.dtype.kind not in "iu" or int(value) < 0:
        raise InvalidValueError(f"{str(path)!r}: num_samples must be one whole number >= 0, got {value.dtype} "
                                f"{value.tolist()!r:.80}")
    return int(value)


def _file_statistics(path: Path, mu_key: str, sigma_key: str, mu: np.ndarray, sigma: np.ndarray,
                     count: int) -> GaussianStatistics:
    """Statistics read from a file, checked as a covariance must be: finite, symmetric and positive semi-definite
    (up to rounding). A matrix that is not would give a negative or meaningless FID."""
    where = f"{str(path)!r} ({mu_key} / {sigma_key})"
    for key, value in ((mu_key, mu), (sigma_key, sigma)):
        if value.dtype.kind not in "iuf":
            raise InvalidValueError(f"{where}: {key} must hold numbers, got {value.dtype}")
    try:
        statistics = GaussianStatistics(mu, sigma, count)
    except InvalidValueError as error:
        raise InvalidValueError(f"{where}: {error}") from None
    sigma = statistics.sigma
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-9 * scale):
        raise InvalidValueError(f"{where}: the covariance is not symmetric")
    smallest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min())
    if smallest < -1e-9 * scale * len(sigma):
        raise InvalidValueError(f"{where}: the covariance is not positive semi-definite (smallest eigenvalue "
                                f"{smallest:.4g}): not statistics of real features")
    return statistics


def source_features(source: ImageSource, extractor: InceptionFeatures, batch_size: int = 50
                    ) -> dict[str, np.ndarray]:
    """Features of every image of ``source`` (see :meth:`InceptionFeatures.__call__`), concatenated."""
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {}
    for batch in source.batches(batch_size):
        for name, value in extractor(batch).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _cached_features(source: ImageSource, extractor: InceptionFeatures, batch_size: int) -> dict[str, np.ndarray]:
    """Features of an image source, cached under (content hash, extractor sha256)."""
    path = _cache_root() / "fid-features" / f"{source.content_hash[:32]}-{extractor.sha256[:16]}.npz"
    if path.is_file():
        try:
            cached = read_npz(path, "feature cache")
            if "pool" in cached and all(len(v) == source.num_images for v in cached.values()):
                return cached
        except (InvalidValueError, TypeError):  # a truncated or foreign cache file: measure again
            pass
    features = source_features(source, extractor, batch_size)
    with atomic_file(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **features)
    return features


def save_statistics(features: dict[str, np.ndarray], path: str | Path, extractor_sha256: str) -> Path:
    """Write FID / sFID statistics of features as a statistics file (atomically)."""
    pool, spatial = feature_statistics(features["pool"]), feature_statistics(features["spatial"])
    with atomic_file(Path(path)) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma,
                     num_samples=pool.num_samples, extractor_sha256=np.array(extractor_sha256))
    return Path(path)


PRECISION_RECALL_K = 3
INCEPTION_SCORE_SPLITS = 10


def check_sample_counts(num_samples: int, reference: ImageSource, has_fc: bool = False) -> None:
    """Before any work: ``num_samples`` images against ``reference`` are enough for every metric compare_sources
    computes (FID: 2; precision / recall with reference images: more than k in each set; IS: one per split)."""
    needed = 2
    if reference.kind != "statistics":
        needed = PRECISION_RECALL_K + 1
        if reference.num_images <= PRECISION_RECALL_K:
            raise InvalidValueError(f"reference {str(reference.path)!r} holds {reference.num_images} image(s); "
                                    f"precision / recall (k={PRECISION_RECALL_K}) need more than "
                                    f"{PRECISION_RECALL_K}")
    if has_fc:
        needed = max(needed, INCEPTION_SCORE_SPLITS)
    if num_samples < needed:
        raise InvalidValueError(f"{num_samples} sample(s) are too few: against {str(reference.path)!r} the metrics "
                                f"need at least {needed} (FID 2, precision / recall more than "
                                f"{PRECISION_RECALL_K}, the Inception Score {INCEPTION_SCORE_SPLITS} with "
                                "classification weights)")


def compare_sources(samples: ImageSource, reference: ImageSource, extractor: InceptionFeatures,
                    batch_size: int = 50, cache: bool = True) -> dict[str, Any]:
    """Every metric of ``samples`` against ``reference`` that the two allow, with counts, hashes and timing."""
    if samples.kind == "statistics":
        raise InvalidValueError(f"{samples.path}: the samples must be images (a folder or an .npz with arr_0)")
    check_sample_counts(samples.num_images, reference, extractor.has_fc)
    start = time.perf_counter()
    fake = source_features(samples, extractor, batch_size)
    extraction_seconds = time.perf_counter() - start
    real = None
    if reference.kind != "statistics":
        real = _cached_features(reference, extractor, batch_size) if cache else \
            source_features(reference, extractor, batch_size)
    ref_stats = {name: reference.statistics.get(name) or (feature_statistics(real[key]) if real is not None else None)
                 for name, key in (("pool", "pool"), ("spatial", "spatial"))}
    fake_pool, fake_spatial = feature_statistics(fake["pool"]), feature_statistics(fake["spatial"])
    report: dict[str, Any] = {
        "fid": frechet_distance_of(fake_pool, ref_stats["pool"]),
        "sfid": frechet_distance_of(fake_spatial, ref_stats["spatial"]) if ref_stats["spatial"] is not None else None,
        "num_samples": len(fake["pool"]),
        "num_reference": reference.num_images if real is not None else ref_stats["pool"].num_samples,
        "reference_statistics": "precomputed in the reference file" if "pool" in reference.statistics
        else "computed from the reference images",
        "extractor": "torch-fidelity inception-v3-compat (TF inception-2015-12-05), pool3 / mixed_6/conv[:7]",
        "extractor_sha256": extractor.sha256,
        "extractor_weights_source": extractor.weights.source,
        "samples_hash": samples.content_hash, "reference_hash": reference.content_hash,
        "feature_extraction_images_per_s": len(fake["pool"]) / max(extraction_seconds, 1e-9),
        "warnings": [w for w in [warn_if_few(len(fake["pool"]))] if w],
    }
    if real is not None:
        report["precision"], report["recall"] = precision_recall(real["pool"], fake["pool"], k=PRECISION_RECALL_K)
    else:
        report["precision"] = report["recall"] = None
        report["warnings"].append("precision / recall need reference images; the reference holds statistics only")
    if extractor.has_fc and "logits" in fake:
        report["inception_score"], report["inception_score_std"] = inception_score(fake["logits"],
                                                                                   INCEPTION_SCORE_SPLITS)
    else:
        report["inception_score"] = None
        report["inception_score_unavailable"] = ("the Inception weights have no classification layer (fc), so the "
                                                 "Inception Score cannot be computed; it is never computed from "
                                                 "substitute weights")
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    with atomic_file(Path(path)) as temporary:
        temporary.write_text(json.dumps(report, indent=1, default=str))
    return Path(path)
