"""Pre-extracted tokenizer outputs for stage-two training: discrete codes (AR) or continuous latents (flow).

``vfmtok extract --tokenizer T --data D --output-dir O [--ten-crop]`` runs a trained tokenizer once over a dataset
and stores, for every image, several augmented *views*:

* default: the ADM centre crop and its horizontal flip (2 views);
* ``--ten-crop`` (LlamaGen's extraction): the centre crop at 1.1 x the size, then the four corner crops and the centre
  crop of the target size and their flips (10 views).

Training draws one view per image and epoch, from the sample's seed (so resumed runs see the same views).

Files (written to a staging directory and renamed):

* ``codes.npy`` (N, V, T) int32, or ``latents.npy`` (N, V, C, h, w) float16, memory-mapped;
* ``labels.npy`` (N,) int64 and ``valid.npy`` (N,) bool (False for images that could not be read);
* ``meta.json``: kind, views, shapes, vocabulary size, image size, the dataset and the tokenizer's config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vfmtok.pipelines.data import ImageDataset, check_labels, collate_images, load_image_dataset
from vfmtok.tokenizer.interface import load_tokenizer as load_tokenizer_folder
from vfmtok.tokenizer.utils.atomic import allocated_memmap, atomic_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError

__all__ = ["extract_tokens", "CodesDataset", "augmented_views", "load_tokenizer"]

_FORMAT = 1


def load_tokenizer(path: str, vfm_weights: Optional[str] = None, random_vfm: bool = False):
    """A trained tokenizer (``save_pretrained`` folder or Hub id, any family) with its frozen encoder: the weights the
    folder names or carries, ``vfm_weights`` instead, or a random one (``random_vfm``, tests of tiny tokenizers)."""
    if random_vfm:
        return load_tokenizer_folder(path, load_vfm_weights=False)
    return load_tokenizer_folder(path, vfm_source=vfm_weights)


def augmented_views(images: torch.Tensor, size: int, ten_crop: bool, flip: bool = True) -> torch.Tensor:
    """(B, 3, S', S') -> (B, V, 3, size, size): centre crop + flip, or LlamaGen's ten crops (5 crops and flips);
    without ``flip`` (data that is not mirror-symmetric, such as digits or text) only the unflipped views."""
    from torchvision.transforms.v2 import functional as TF

    if not ten_crop:
        return torch.stack([images, images.flip(-1)] if flip else [images], dim=1)
    crops = TF.ten_crop(images, [size, size]) if flip else TF.five_crop(images, [size, size])
    return torch.stack(list(crops), dim=1)  # 4 corners, centre (then the same of the flipped image)


def extract_tokens(tokenizer, data: str, output_dir: str | Path, ten_crop: bool = False, batch_size: int = 32,
                   num_workers: int = 2, device: str | torch.device = "cpu",
                   limit: Optional[int] = None, flip: bool = True) -> Path:
    """Encode every image of ``data`` with ``tokenizer`` (any :class:`vfmtok.tokenizer.ImageTokenizerMixin`) into
    ``output_dir``; ``flip=False`` stores no mirrored views."""
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidValueError(f"limit must be a positive number of images (or none for all), got {limit!r}")
    device = torch.device(device)
    tokenizer = tokenizer.to(device).eval()
    size = tokenizer.input_size
    source = load_image_dataset(data)
    if limit is not None:
        source = source.select(range(min(limit, len(source))))
    # LlamaGen's ten-crop: the ADM centre crop at 1.1 x, then crops of the target size inside it.
    dataset = ImageDataset(source, int(size * 1.1) if ten_crop else size, augment="center", flip=False)
    num_views = (10 if ten_crop else 2) if flip else (5 if ten_crop else 1)
    discrete = tokenizer.is_discrete
    count = len(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_images, generator=torch.Generator())
    with atomic_directory(output_dir) as staging:
        shape = (count, num_views, *tokenizer.token_shape())
        if discrete:
            store = allocated_memmap(staging / "codes.npy", np.int32, shape)
        else:
            store = allocated_memmap(staging / "latents.npy", np.float16, shape)
        labels = np.full(count, -1, dtype=np.int64)
        valid = np.zeros(count, dtype=bool)
        skipped: list[str] = []
        with torch.no_grad():
            for batch in loader:
                skipped.extend(batch["skipped"])
                if len(batch["images"]) == 0:
                    continue
                views = augmented_views(batch["images"].to(device), size, ten_crop, flip)
                encoded = tokenizer.encode(views.flatten(0, 1))
                encoded = encoded.reshape(len(views), num_views, *encoded.shape[1:])
                index = batch["indices"].numpy()
                store[index] = encoded.cpu().numpy().astype(store.dtype)
                labels[index] = batch["labels"].numpy()
                valid[index] = True
        store.flush()
        del store
        np.save(staging / "labels.npy", labels)
        np.save(staging / "valid.npy", valid)
        meta = {"format": _FORMAT, "kind": "codes" if discrete else "latents", "num_images": count,
                "num_views": num_views, "ten_crop": ten_crop, "flip": flip, "shape": list(shape[2:]),
                "vocab_size": tokenizer.code_layout.vocab_size if discrete else None, "image_size": size,
                "source": str(data), "unreadable": int((~valid).sum()), "unreadable_examples": skipped[:20],
                "tokenizer": tokenizer.tokenizer_summary(),
                "tokenizer_config": dict(tokenizer.config)}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return Path(output_dir)


class CodesDataset(torch.utils.data.Dataset):
    """Map-style dataset over an extraction directory; keys are ``index`` or ``(index, sample_seed)`` as for
    :class:`vfmtok.pipelines.data.ImageDataset`. Unreadable source images are left out."""

    def __init__(self, path: str | Path, rows: Optional[Sequence[int]] = None, num_classes: Optional[int] = None):
        """``rows``: use only these images (e.g. a train / validation split); unreadable ones are still left out.
        The labels are checked once, here: -1 (unlabeled) or >= 0, and below ``num_classes`` when given (see
        :meth:`check_labels`)."""
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise MissingFileError(f"{str(self.path)!r} is not an extraction directory (no meta.json); create one "
                                    f"with `vfmtok extract`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != _FORMAT:
            raise InvalidValueError(f"{str(self.path)!r} has format {self.meta.get('format')!r}; expected {_FORMAT}")
        self.kind = self.meta["kind"]
        self.values = np.load(self.path / f"{self.kind}.npy", mmap_mode="r")
        self.labels = np.load(self.path / "labels.npy")
        valid = np.load(self.path / "valid.npy")
        if rows is not None:
            chosen = np.zeros_like(valid)
            chosen[np.asarray(rows, dtype=np.int64)] = True
            valid = valid & chosen
        self.rows = np.flatnonzero(valid)
        if len(self.values) != self.meta["num_images"] or len(self.labels) != len(self.values):
            raise InvalidValueError(f"{str(self.path)!r} is inconsistent: {len(self.values)} {self.kind}, "
                             f"{len(self.labels)} labels, meta {self.meta['num_images']}")
        self.check_labels(num_classes, allow_unlabeled=True)

    def check_labels(self, num_classes: Optional[int], allow_unlabeled: bool = False,
                     source: Optional[str] = None) -> None:
        """Refuse labels (of the rows in use) outside ``[0, num_classes)`` (-1 allowed when ``allow_unlabeled``),
        naming ``labels.npy`` and the rows; see :func:`vfmtok.pipelines.data.check_labels`."""
        where = repr(str(self.path / "labels.npy")) + (f" (of {source})" if source else "")
        check_labels(self.labels[self.rows], where, num_classes, allow_unlabeled,
                     row_name=lambda r: f"row {int(self.rows[r])}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        row = int(self.rows[int(index)])
        view = int(np.random.default_rng(int(seed)).integers(self.meta["num_views"]))
        value = torch.from_numpy(np.array(self.values[row, view]))
        value = value.long() if self.kind == "codes" else value.float()
        return {"values": value, "label": int(self.labels[row]), "index": int(index)}

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"values": torch.stack([s["values"] for s in samples]),
                "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
                "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long)}
