"""The data layer shared by every training stage: loading image datasets through ``datasets``, ADM-style
augmentation, decoding that survives broken files, and a batch sampler whose order and augmentation are a pure
function of ``(seed, epoch, position)`` so that an interrupted run resumes bit for bit.

Typical use (map-style dataset, the exact-resume path)::

    data = load_image_dataset("../shared/data/imagenet-1k-samples-256")
    dataset = ImageDataset(data, image_size=256, augment="adm", flip=True)
    sampler = ResumableBatchSampler(len(dataset), batch_size=64, seed=0, num_replicas=world, rank=rank)
    loader = build_dataloader(dataset, sampler, batch_size=64, num_workers=8, pin_memory=True)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        sampler.set_start_batch(start_batch if epoch == start_epoch else 0)
        for batch in loader:  # {"images", "labels", "indices", "num_skipped", "skipped"}
            ...

No randomness here draws from the global torch / numpy / python RNGs: every sample carries its own seed.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_image_dataset",
    "class_names",
    "adm_center_crop",
    "adm_random_crop",
    "sample_seed",
    "decode_image",
    "to_rgb",
    "check_image_size",
    "check_labels",
    "ImageDataset",
    "StreamingImageDataset",
    "collate_images",
    "ResumableBatchSampler",
    "build_dataloader",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Column names tried, in this order, when the caller names none.
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "class_index")
# Single-file sources handed to a packaged ``datasets`` builder.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
AUGMENTATIONS = ("adm", "center")
SEED_MASK = (1 << 63) - 1


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def load_image_dataset(source: str, split: str = "train", streaming: bool = False, image_column: str | None = None,
                       label_column: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """Load ``source`` as a dataset with exactly two columns: ``image`` (``datasets.Image(decode=False)``: dicts with
    ``bytes`` / ``path``, so decoding, and its failures, happen in :func:`decode_image`) and ``label`` (int64, or a
    ``ClassLabel`` when class names are known; -1 = unlabeled).

    ``source`` is resolved in this order:

    1. a local directory with ``labels.csv`` (columns ``file,class_index``; others ignored): those files, those labels;
    2. a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``load_from_disk`` (``split``
       picks the split of a ``DatasetDict``);
    3. a local directory with class sub-folders: sorted sub-folder names are classes 0..K-1, kept as the ``ClassLabel``
       names (see :func:`class_names`); images are found recursively inside each class folder;
    4. a flat local directory of images: every label is -1;
    5. a local ``.parquet`` / ``.arrow`` file: ``load_dataset(<format>, data_files=source)``;
    6. anything else (a Hub id such as ``ILSVRC/imagenet-1k``, a builder name, a local directory of data files):
       ``datasets.load_dataset(source, split=split, streaming=streaming)``.

    For the local-folder sources (1, 3, 4) ``split`` is ignored. ``streaming=True`` on a local source returns
    ``to_iterable_dataset()`` of it. Image files: ``IMAGE_EXTENSIONS``, case-insensitive; hidden entries are ignored.
    The image / label columns are auto-detected (``IMAGE_COLUMNS`` / ``LABEL_COLUMNS``, else the first ``Image``
    column) unless named; no label column gives -1 everywhere. Integer labels become int64, a ``ClassLabel`` is kept,
    string labels of a non-streamed dataset become a ``ClassLabel`` of the sorted strings.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        dataset = _load_local_directory(path, split)
        if dataset is None:  # no images and no saved dataset: let datasets' data-file builders read it
            if not any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*")):
                raise InvalidValueError(f"dataset directory {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                        "and no data files")
            dataset = datasets.load_dataset(str(path), split=split, streaming=streaming)
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InvalidValueError(f"dataset source {source!r} is a file; expected a directory, a Hub id or one of "
                             f"{sorted(FILE_BUILDERS)}")
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    elif source.startswith(("/", "./", "../", "~")):
        raise MissingFileError(f"dataset directory {source!r} does not exist")
    else:
        dataset = datasets.load_dataset(source, split=split, streaming=streaming)
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))
    return _standardize_columns(dataset, source, image_column, label_column)


def class_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str] | None:
    """Class names of a dataset from :func:`load_image_dataset`, or None when its labels are plain integers."""
    feature = (dataset.features or {}).get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(directory: Path) -> list[Path]:
    """Image files anywhere below ``directory`` (hidden folders skipped), in sorted order."""
    found = []
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(Path(folder) / f for f in files if _is_image_file(Path(f)))
    return sorted(found)


def _from_files(files: list[Path], labels: list[int], names: list[str] | None) -> datasets.Dataset:
    label_feature = datasets.ClassLabel(names=names) if names is not None else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(decode=False), "label": label_feature})
    images = [{"bytes": None, "path": str(f)} for f in files]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _load_local_directory(path: Path, split: str) -> datasets.Dataset | None:
    labels_csv = path / "labels.csv"
    if labels_csv.is_file():
        return _load_labels_csv(path, labels_csv)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InvalidValueError(f"split {split!r} not in the saved dataset {str(path)!r}; available: {list(loaded)}")
            loaded = loaded[split]
        return loaded
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    top_images = [p for p in entries if p.is_file() and _is_image_file(p)]
    class_files = {d.name: _images_under(d) for d in class_dirs}
    if any(class_files.values()):
        if top_images:
            raise InvalidValueError(f"image directory {str(path)!r} has both images at its top level ({top_images[0].name}, "
                             f"...) and class sub-folders; expected one layout or the other")
        empty = [name for name, files in class_files.items() if not files]
        if empty:
            raise InvalidValueError(f"class folder(s) {empty} in {str(path)!r} hold no image ({', '.join(IMAGE_EXTENSIONS)}); "
                             f"remove them, or every later class id would shift")
        names = list(class_files)
        files = [f for name in names for f in class_files[name]]
        labels = [i for i, name in enumerate(names) for _ in class_files[name]]
        return _from_files(files, labels, names)
    if top_images:
        return _from_files(top_images, [-1] * len(top_images), None)
    return None


def _load_labels_csv(root: Path, labels_csv: Path) -> datasets.Dataset:
    with labels_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "file" not in columns or "class_index" not in columns:
            raise InvalidValueError(f"{str(labels_csv)!r} has columns {columns}; expected at least 'file' and 'class_index'")
        rows = list(reader)
    files, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            labels.append(int(row["class_index"]))
        except (TypeError, ValueError):
            raise InvalidValueError(f"{str(labels_csv)!r} line {line}: class_index {row['class_index']!r} is not an "
                             f"integer") from None
        if not row["file"]:
            raise InvalidValueError(f"{str(labels_csv)!r} line {line}: empty file name")
        files.append(root / row["file"])
    check_labels(labels, repr(str(labels_csv)), row_name=lambda r: f"line {r + 2} ({rows[r]['file']})")
    # One directory listing per folder instead of a stat per file (ImageNet has 1.28M files).
    listed = {parent: set(os.listdir(parent)) if parent.is_dir() else set() for parent in {f.parent for f in files}}
    missing = [str(f) for f in files if f.name not in listed[f.parent]]
    if missing:
        raise MissingFileError(f"{len(missing)} file(s) listed in {str(labels_csv)!r} do not exist, e.g. "
                                f"{missing[:3]}")
    return _from_files(files, labels, None)


def _standardize_columns(dataset: datasets.Dataset | datasets.IterableDataset, source: str, image_column: str | None,
                         label_column: str | None) -> datasets.Dataset | datasets.IterableDataset:
    """Reduce ``dataset`` to the columns ``image`` (undecoded) and ``label``."""
    if isinstance(dataset, datasets.IterableDataset) and dataset.features is None:
        # Some streamed builders only know their columns once an example has been read.
        dataset = dataset._resolve_features()
    features = dataset.features
    columns = list(features)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
        if image_column is None:
            image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        if image_column is None:
            raise InvalidValueError(f"dataset {source!r} has no image column; its columns are {columns}; expected one of "
                             f"{list(IMAGE_COLUMNS)} or an explicit image_column")
    elif image_column not in columns:
        raise InvalidValueError(f"image_column {image_column!r} is not a column of {source!r}; its columns are {columns}")
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in columns and c != image_column), None)
    elif label_column not in columns:
        raise InvalidValueError(f"label_column {label_column!r} is not a column of {source!r}; its columns are {columns}")

    keep = [image_column] + ([label_column] if label_column is not None else [])
    dataset = dataset.select_columns(keep)
    renames = {old: new for old, new in zip(keep, ("image", "label")) if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    # A binary (bytes) or string (path) column casts to Image as well.
    dataset = dataset.cast_column("image", datasets.Image(decode=False))

    if label_column is None:
        if isinstance(dataset, datasets.Dataset):
            dataset = dataset.add_column("label", [-1] * len(dataset), feature=datasets.Value("int64"))
        else:
            features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
            dataset = dataset.map(_unlabeled, features=features)
        return dataset
    label = dataset.features["label"]
    if isinstance(label, datasets.ClassLabel):
        _check_dataset_labels(dataset, source, label.num_classes)
        return dataset
    if isinstance(label, datasets.Value) and label.dtype in INTEGER_DTYPES:
        dataset = dataset if label.dtype == "int64" else dataset.cast_column("label", datasets.Value("int64"))
        _check_dataset_labels(dataset, source, None)
        return dataset
    if isinstance(label, datasets.Value) and label.dtype in ("string", "large_string") \
            and isinstance(dataset, datasets.Dataset):
        return dataset.class_encode_column("label")  # sorted unique strings -> ClassLabel
    raise InvalidValueError(f"label column {label_column!r} of {source!r} has type {label}; expected integers or a "
                     f"ClassLabel (or strings, for a non-streamed dataset)")


def _unlabeled(example: dict[str, Any]) -> dict[str, Any]:
    return {"label": -1}


def _dataset_labels(dataset: datasets.Dataset) -> np.ndarray:
    return np.asarray(dataset.with_format("numpy", columns=["label"])["label"], dtype=np.int64)


def _check_dataset_labels(dataset: datasets.Dataset | datasets.IterableDataset, source: str,
                          num_classes: int | None) -> None:
    """Labels of a non-streamed dataset, checked once at load (a stream is checked batch by batch by its user)."""
    if isinstance(dataset, datasets.Dataset):
        check_labels(_dataset_labels(dataset), f"dataset {source!r}", num_classes)


def check_labels(labels: Any, source: str, num_classes: int | None = None, allow_unlabeled: bool = True,
                 row_name: Any = None) -> None:
    """Refuse class ids that would be read as something else, naming ``source`` and the first offending rows.

    -1 is the "unlabeled" convention of :func:`load_image_dataset` (allowed when ``allow_unlabeled``); any other
    negative id is an error. With ``num_classes``, ids must be below it: the generators reserve the id
    ``num_classes`` for the null (unconditional) class, so such a label would silently train as "no class".
    ``row_name(row)`` describes a row (default ``"row N"``).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = labels < (-1 if allow_unlabeled else 0)
    if num_classes is not None:
        bad |= labels >= num_classes
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    values = labels[rows]
    describe = row_name or (lambda r: f"row {r}")
    examples = ", ".join(f"{describe(int(r))}: {int(labels[r])}" for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
    reasons = []
    if (values < -1).any():
        reasons.append("negative ids other than -1 (= unlabeled) are not class ids")
    if not allow_unlabeled and (values == -1).any():
        reasons.append("-1 marks an unlabeled image, and class-conditional training needs a label for every image")
    if num_classes is not None and (values == num_classes).any():
        reasons.append(f"{num_classes} = num_classes is the generators' null (unconditional) class id")
    if num_classes is not None and (values > num_classes).any():
        reasons.append(f"ids above {num_classes} do not exist")
    expected = (f"[{-1 if allow_unlabeled else 0}, {num_classes})" if num_classes is not None
                else "-1 (unlabeled) or >= 0")
    raise InvalidValueError(f"{source}: {len(rows)} label(s) outside {expected}: {examples} "
                            f"({'; '.join(reasons)})")


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (ADM / LlamaGen center_crop_arr and random_crop_arr, returning PIL images)
# ----------------------------------------------------------------------------------------------------------------

def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise InvalidValueError(f"image size must be a positive integer, got {size!r}")


def _resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Halve with BOX filtering while the short side stays >= 2x the target (ADM's anti-aliasing), then BICUBIC."""
    while min(*image.size) >= 2 * short_side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = short_side / min(*image.size)
    return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM ``center_crop_arr``: short side resized to ``size``, centred ``size`` x ``size`` crop."""
    _check_size(size)
    image = _resize_short_side(image, size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def adm_random_crop(image: Image.Image, size: int, rng: np.random.Generator, min_scale: float = 1.0,
                    max_scale: float = 1.25) -> Image.Image:
    """ADM ``random_crop_arr``: short side resized to an integer drawn uniformly from
    ``[ceil(size * min_scale), ceil(size * max_scale)]``, then a random ``size`` x ``size`` crop.

    ADM writes the range as ``[ceil(size / max_crop_frac), ceil(size / min_crop_frac)]`` with crop fractions
    0.8 / 1.0; ``ceil(size * 1.25) == ceil(size / 0.8)`` (checked for every size below 5000). Draws in ADM order:
    short side, top, left.
    """
    _check_size(size)
    if not 1.0 <= min_scale <= max_scale:
        raise InvalidValueError(f"need 1 <= min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}")
    short_side = int(rng.integers(math.ceil(size * min_scale), math.ceil(size * max_scale) + 1))
    image = _resize_short_side(image, short_side)
    top = int(rng.integers(0, image.height - size + 1))
    left = int(rng.integers(0, image.width - size + 1))
    return image.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------------------------
# Decoding and datasets
# ----------------------------------------------------------------------------------------------------------------

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample, a pure function of ``(seed, epoch, index)``."""
    return _derive_seed(seed, epoch, index)


def _derive_seed(*keys: int) -> int:
    if any(k < 0 for k in keys):
        raise InvalidValueError(f"seed keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]) & SEED_MASK


def decode_image(image: dict[str, Any]) -> Image.Image:
    """Decode an undecoded ``datasets.Image`` value (``bytes`` or ``path``) to an RGB PIL image.

    The whole file is decoded here (``load()``), so a truncated file raises instead of failing later. Before any
    pixel is decoded, an image larger than ``MAX_IMAGE_PIXELS`` or with an aspect ratio above ``MAX_ASPECT_RATIO``
    is refused (the augmenter's work grows with both: a 1 x 100000 strip would be resized to 256 x 25.6M pixels).

    Every mode is converted with its real value range (see :func:`to_rgb`): 8-bit modes by PIL, 16-bit and 32-bit
    integer grayscale scaled from [0, 65535], float grayscale from [0, 1].
    """
    data, path = image.get("bytes"), image.get("path")
    if data is None and not path:
        raise InvalidValueError("image has neither bytes nor a path")
    try:
        opened = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError as error:  # no OSError: would escape the callers' handling of bad files
        raise InvalidValueError(f"{path or 'image'}: {error}") from None
    with opened:
        check_image_size(opened.size)
        opened.load()
        return to_rgb(opened)


# Bounds on the work one image may cost (decode + resize), checked from the header before decoding. Images beyond
# them are treated as unreadable (skipped and counted, with the reason). 1:25 keeps the resized strip of a 256-pixel
# crop under 256 x 8000 pixels; 2**27 pixels (134 megapixels) is well above any photo dataset.
MAX_IMAGE_PIXELS = 2 ** 27
MAX_ASPECT_RATIO = 25.0


def check_image_size(size: tuple[int, int]) -> None:
    """Refuse an empty image, one of more than ``MAX_IMAGE_PIXELS`` pixels or an aspect ratio above
    ``MAX_ASPECT_RATIO``."""
    width, height = size
    if min(width, height) <= 0:
        raise InvalidValueError(f"image has zero size {size}")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidValueError(f"image of {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels "
                                f"(pipelines.data.MAX_IMAGE_PIXELS)")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT_RATIO:
        raise InvalidValueError(f"image of {width}x{height} pixels has an aspect ratio of {aspect:.0f}:1, above the "
                                f"limit of {MAX_ASPECT_RATIO:g}:1 (pipelines.data.MAX_ASPECT_RATIO)")


# Integer modes wider than 8 bits: PIL's RGB conversion clips them at 255 (a 16-bit PNG becomes all white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image of ``image``, each mode read with its real value range.

    * ``I;16*`` (16-bit grayscale, e.g. 16-bit PNG / TIFF): ``round(v * 255 / 65535)``;
    * ``I`` (32-bit integer grayscale; PIL also opens some 16-bit files so): assumed to hold 16-bit data, scaled the
      same way; values outside [0, 65535] are refused (their range is unknown);
    * ``F`` (32-bit float grayscale): assumed to be in [0, 1], ``round(v * 255)``; NaN / inf or values outside
      [0, 1] are refused;
    * every other mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV, ...) is 8 bits per channel and converted
      by PIL (alpha dropped, palettes looked up).

    Refused images raise :class:`InvalidValueError` (the datasets then count them as unreadable, with the reason).
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise InvalidValueError(f"32-bit integer image with values in [{values.min()}, {values.max()}]; only "
                                    f"[0, 65535] (16-bit data) is understood")
        return _gray_to_rgb(values.astype(np.float64) * (255.0 / 65535.0))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InvalidValueError("float image holds NaN or infinite values")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise InvalidValueError(f"float image with values in [{values.min():g}, {values.max():g}]; expected "
                                    f"[0, 1]")
        return _gray_to_rgb(values * 255.0)
    return image.convert("RGB")


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1], computed as ADM does (x / 127.5 - 1)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class _Augmenter:
    """Decode + crop + flip of one example, shared by the map-style and the streaming dataset."""

    def __init__(self, image_size: int, augment: str, flip: bool):
        _check_size(image_size)
        if augment not in AUGMENTATIONS:
            raise InvalidValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.image_size, self.augment, self.flip = image_size, augment, flip

    def __call__(self, example: dict[str, Any], index: int, seed: int) -> dict[str, Any]:
        image = example["image"]
        try:
            decoded = decode_image(image)
        # PIL signals a broken file with many exception types (OSError, SyntaxError, EOFError, struct.error,
        # DecompressionBombError, ...); only decoding is inside this try, so nothing else is swallowed.
        except Exception as error:
            name = image.get("path") or f"index {index}"
            return {"error": f"{name}: {type(error).__name__}: {error}", "index": index, "image_size": self.image_size}
        rng = np.random.default_rng(seed)
        if self.augment == "adm":
            decoded = adm_random_crop(decoded, self.image_size, rng)
        else:
            decoded = adm_center_crop(decoded, self.image_size)
        if self.flip and rng.random() < 0.5:
            decoded = decoded.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": _to_tensor(decoded), "label": int(example["label"]), "index": index}


def _check_columns(features: datasets.Features | None, what: str) -> None:
    if features is None:
        return
    image = features.get("image")
    if not isinstance(image, datasets.Image) or image.decode or "label" not in features:
        raise InvalidValueError(f"{what} needs columns 'image' (datasets.Image(decode=False)) and 'label'; got "
                         f"{dict(features)}; build it with load_image_dataset")


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of augmented images.

    ``dataset[(index, sample_seed)]`` draws all randomness of that sample (crop, flip with p=0.5) from
    ``numpy.random.default_rng(sample_seed)``; ``dataset[index]`` uses ``sample_seed(0, 0, index)``. Returns
    ``{"image": (3, S, S) float32 in [-1, 1], "label", "index"}``, or ``{"error": "<file or index>: <reason>",
    "index", "image_size"}`` for an image that cannot be decoded (never raises for a broken file).
    ``augment="adm"``: ADM random crop (training); ``"center"``: ADM centre crop (evaluation; pass ``flip=False``).
    """

    def __init__(self, dataset: datasets.Dataset, image_size: int, augment: str = "adm", flip: bool = True,
                 num_classes: int | None = None):
        """``num_classes``: check every label once, now (see :meth:`check_labels`)."""
        if not isinstance(dataset, datasets.Dataset):
            raise InvalidValueError(f"ImageDataset needs a datasets.Dataset, got {type(dataset).__name__} (use "
                             f"StreamingImageDataset for a streamed dataset)")
        _check_columns(dataset.features, "ImageDataset")
        self.dataset = dataset
        self.image_size = image_size
        self.augmenter = _Augmenter(image_size, augment, flip)
        if num_classes is not None:
            self.check_labels(num_classes)

    def check_labels(self, num_classes: int, allow_unlabeled: bool = False, source: str = "image dataset") -> None:
        """Refuse (all at once, naming the files) labels outside ``[0, num_classes)`` (``[-1, ...)`` when
        ``allow_unlabeled``); see :func:`check_labels`."""
        def row_name(row: int) -> str:
            path = self.dataset[row]["image"].get("path")
            return f"row {row} ({path})" if path else f"row {row}"

        check_labels(_dataset_labels(self.dataset), source, num_classes, allow_unlabeled, row_name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
        index = int(index)
        if not 0 <= index < len(self.dataset):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.dataset)} images")
        seed = sample_seed(0, 0, index) if seed is None else int(seed)
        return self.augmenter(self.dataset[index], index, seed)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Iterable dataset over a streamed ``datasets.IterableDataset`` (e.g. a Hub dataset with ``streaming=True``).

    The stream is shuffled (shard order + a ``shuffle_buffer``-example buffer, seeded with ``seed`` and re-seeded by
    :meth:`set_epoch`, as ``datasets`` does) and split between ranks with ``split_dataset_by_node``; DataLoader workers
    split it further by shard (``datasets`` does this). Sample ``n`` of worker ``w`` on rank ``r`` is augmented with
    the seed ``(seed, epoch, r, w, n)``; ``index`` in the yielded dicts is that running count ``n``.

    Resume: :meth:`state_dict` / :meth:`load_state_dict` wrap ``datasets``' own ``IterableDataset`` state, so they
    are only as exact as it is: the position in the shards is restored, but ``datasets`` does not save the shuffle
    buffer (it is refilled, so the order right after a resume differs when ``shuffle_buffer > 0``), and with
    DataLoader workers the state of this (main-process) object does not see the workers' progress (use
    ``num_workers=0`` or torchdata's ``StatefulDataLoader``). Bit-exact resume is guaranteed only for
    :class:`ImageDataset` with :class:`ResumableBatchSampler`.
    """

    def __init__(self, dataset: datasets.IterableDataset, image_size: int, seed: int, augment: str = "adm",
                 flip: bool = True, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1):
        if not isinstance(dataset, datasets.IterableDataset):
            raise InvalidValueError(f"StreamingImageDataset needs a datasets.IterableDataset, got {type(dataset).__name__}")
        _check_columns(dataset.features, "StreamingImageDataset")
        if seed < 0 or shuffle_buffer < 0:
            raise InvalidValueError(f"seed and shuffle_buffer must be >= 0, got seed={seed}, shuffle_buffer={shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise InvalidValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_buffer > 0:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.source = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.seed, self.rank = seed, rank
        self.augmenter = _Augmenter(image_size, augment, flip)
        self.num_yielded = 0
        self._resume: tuple[int, int] | None = None  # (epoch, num_yielded) from load_state_dict

    @property
    def epoch(self) -> int:
        # Read from the datasets object: its epoch is shared with persistent DataLoader workers.
        return self.source.epoch

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self.num_yielded = start
        for example in self.source:
            count = self.num_yielded
            sample = self.augmenter(example, count, _derive_seed(self.seed, epoch, self.rank, worker_id, count))
            self.num_yielded = count + 1
            yield sample

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "num_yielded": self.num_yielded, "source": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next iteration of the same epoch (see the class notes)."""
        missing = {"epoch", "num_yielded", "source"} - set(state)
        if missing:
            raise InvalidValueError(f"streaming state is missing {sorted(missing)}; expected the output of state_dict()")
        self.source.set_epoch(state["epoch"])
        self.source.load_state_dict(state["source"])
        self._resume = (state["epoch"], state["num_yielded"])


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the decodable samples; broken ones are dropped and listed (``num_skipped``, ``skipped``).

    ``images`` has shape ``(0, 3, S, S)`` when every sample in the batch failed.
    """
    if not samples:
        raise InvalidValueError("collate_images got an empty list of samples")
    good = [s for s in samples if "error" not in s]
    skipped = [s["error"] for s in samples if "error" in s]
    if good:
        images = torch.stack([s["image"] for s in good])
    else:
        size = samples[0]["image_size"]
        images = torch.empty((0, 3, size, size), dtype=torch.float32)
    return {
        "images": images,
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------------------------------------------
# Sampling and loading
# ----------------------------------------------------------------------------------------------------------------

class ResumableBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, sample_seed)`` for one rank; a pure function of ``(seed, epoch, rank)``.

    Each epoch's permutation comes from a private ``torch.Generator`` seeded from ``(seed, epoch)`` (the global RNG is
    never touched). Rank ``r`` takes ``permutation[r::num_replicas]`` after the permutation is trimmed
    (``drop_last=True``) or padded by wrapping around (``drop_last=False``) to a multiple of ``num_replicas``, so
    every rank has the same number of batches. ``drop_last=True`` also drops a final incomplete batch.

    Resume: call :meth:`set_epoch` and then :meth:`set_start_batch` before iterating; ``set_epoch`` resets the start
    to 0, so a resume offset never leaks into the following epochs. ``len()`` is the full epoch's batch count.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if num_samples < 1 or batch_size < 1 or seed < 0:
            raise InvalidValueError(f"need num_samples >= 1, batch_size >= 1, seed >= 0; got num_samples={num_samples}, "
                             f"batch_size={batch_size}, seed={seed}")
        if not 0 <= rank < num_replicas:
            raise InvalidValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        if drop_last:
            self.samples_per_rank = num_samples // num_replicas
            self.num_batches = self.samples_per_rank // batch_size
        else:
            self.samples_per_rank = math.ceil(num_samples / num_replicas)
            self.num_batches = math.ceil(self.samples_per_rank / batch_size)
        if self.num_batches == 0:
            raise InvalidValueError(f"{num_samples} samples give no full batch of {batch_size} on each of {num_replicas} "
                             f"rank(s); lower batch_size or use drop_last=False")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate, and start it from its first batch."""
        if epoch < 0:
            raise InvalidValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, batch: int) -> None:
        """Skip the first ``batch`` batches of the current epoch on this rank (resume); reset by :meth:`set_epoch`."""
        if not 0 <= batch <= self.num_batches:
            raise InvalidValueError(f"start batch must be in [0, {self.num_batches}], got {batch}")
        self.start_batch = batch

    def __len__(self) -> int:
        return self.num_batches

    def rank_indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order (start batch ignored)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.samples_per_rank * self.num_replicas
        if total > len(order):  # pad by wrapping around (possibly several times for tiny datasets)
            order = (order * math.ceil(total / len(order)))[:total]
        return order[:total][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.rank_indices()
        for batch in range(self.start_batch, self.num_batches):
            chunk = indices[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in chunk]


def build_dataloader(dataset: torch.utils.data.Dataset, batch_sampler: ResumableBatchSampler | None,
                     batch_size: int, num_workers: int, pin_memory: bool,
                     persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader that never draws from the global torch RNG, batching with the dataset's ``collate`` (default
    :func:`collate_images`).

    A map-style dataset (:class:`ImageDataset`, :class:`vfmtok.pipelines.codes.CodesDataset`) needs a ``batch_sampler``
    (whose ``batch_size`` must equal ``batch_size``); an iterable one (:class:`StreamingImageDataset`) takes none.
    ``persistent_workers`` only applies with ``num_workers > 0``; ``pin_memory`` is only useful with CUDA.
    """
    if num_workers < 0 or batch_size < 1:
        raise InvalidValueError(f"need num_workers >= 0 and batch_size >= 1, got num_workers={num_workers}, "
                         f"batch_size={batch_size}")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if batch_sampler is not None:
            raise InvalidValueError(f"an iterable dataset ({type(dataset).__name__}) takes no batch_sampler; pass None")
    elif isinstance(dataset, torch.utils.data.Dataset):
        if batch_sampler is None:
            raise InvalidValueError(f"a map-style dataset ({type(dataset).__name__}) needs a ResumableBatchSampler "
                             f"(batch_sampler=None given)")
        if batch_sampler.batch_size != batch_size:
            raise InvalidValueError(f"batch_size={batch_size} differs from the sampler's batch_size="
                             f"{batch_sampler.batch_size}")
    else:
        raise InvalidValueError(f"dataset must be a torch Dataset, got {type(dataset).__name__}")
    # Creating a DataLoader iterator draws a base seed from `generator` (the global RNG when None), which would shift
    # the model's random stream after a resume.
    generator = torch.Generator()
    generator.manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,  # DataLoader wants the default 1 with a batch_sampler
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=getattr(dataset, "collate", collate_images),
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
    )
