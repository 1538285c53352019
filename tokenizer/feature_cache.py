"""A disk cache of the frozen VFM's features for a fixed dataset.

The VFM is frozen, so for a dataset seen many times without random augmentation its features never change. Caching
them once lets every later epoch skip the VFM (for VFMTok-L the DINOv2-L forward is most of a training step).

Layout of a cache directory (written into a staging directory and renamed, so it is complete or absent):

* ``levels.npy``: (N, L, T, C) float16, memory-mapped; the L feature levels, T = grid h*w patch tokens.
* ``cls.npy``: (N, L, C) float16, the CLS token of each level (zeros for VFMs without CLS).
* ``meta.json``: shapes, dtype, the dataset source, image size and a fingerprint of the VFM (architecture, layers,
  resize, and a checksum of its weights) that :meth:`VFMFeatureCache.open` checks against the model.

Disk cost per image: L * (T + 1) * C * 2 bytes. DINOv2-L at 336 px, 4 levels: 4 * 577 * 1024 * 2 = 4.73 MB per image
(6.0 TB for ImageNet-1k train: only worth it for small or medium fixed datasets). VFMAE (224 px, 256 tokens): 2.1 MB.
Random crops and flips change the features, so training from a cache uses the centre crop without flips.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from vfmtok.tokenizer.utils.atomic import allocated_memmap, atomic_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError
from vfmtok.tokenizer.vfm import FrozenVFM, VFMFeatures

__all__ = ["VFMFeatureCache", "vfm_fingerprint", "cache_bytes_per_image"]

_FORMAT = 1


def vfm_fingerprint(vfm: FrozenVFM) -> str:
    """A short hash of what determines the VFM's features: its settings and (a checksum of) its weights."""
    digest = hashlib.sha256(repr((vfm.backend, vfm.image_size, tuple(vfm.feature_layers), vfm.resize,
                                  vfm.grid, vfm.hidden_size)).encode())
    for tensor in vfm.model.state_dict().values():
        if tensor.is_floating_point():
            flat = tensor.detach().float().flatten()
            # Sum, sum of squares and a strided sample: cheap, and any retrained / reloaded weights change them.
            stats = torch.stack([flat.sum(), flat.square().sum(), flat[:: max(1, flat.numel() // 64)].sum()])
            digest.update(stats.cpu().numpy().astype(np.float64).tobytes())
    return digest.hexdigest()[:16]


def cache_bytes_per_image(vfm: FrozenVFM, dtype: np.dtype = np.float16) -> int:
    levels = len(vfm.feature_layers)
    tokens = vfm.grid[0] * vfm.grid[1]
    return levels * (tokens + 1) * vfm.hidden_size * np.dtype(dtype).itemsize


class VFMFeatureCache:
    """Read access to a cache directory; build one with :meth:`build`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise MissingFileError(f"{str(self.path)!r} is not a VFM feature cache (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != _FORMAT:
            raise InvalidValueError(f"feature cache {str(self.path)!r} has format {self.meta.get('format')!r}; "
                             f"this version reads format {_FORMAT}")
        self.levels = np.load(self.path / "levels.npy", mmap_mode="r")
        self.cls = np.load(self.path / "cls.npy", mmap_mode="r")
        expected = (self.meta["num_images"], self.meta["num_levels"], self.meta["num_tokens"], self.meta["hidden_size"])
        if tuple(self.levels.shape) != expected or tuple(self.cls.shape) != (expected[0], expected[1], expected[3]):
            raise InvalidValueError(f"feature cache {str(self.path)!r} is inconsistent: levels {self.levels.shape}, "
                             f"cls {self.cls.shape}, meta {expected}")

    def __len__(self) -> int:
        return int(self.meta["num_images"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    def check_compatible(self, vfm: FrozenVFM, source: Optional[str] = None, image_size: Optional[int] = None,
                         num_images: Optional[int] = None) -> None:
        """Raise ValueError when the cache was not made by this VFM from this dataset."""
        problems = []
        fingerprint = vfm_fingerprint(vfm)
        if self.meta["vfm_fingerprint"] != fingerprint:
            problems.append(f"VFM fingerprint {self.meta['vfm_fingerprint']} != this model's {fingerprint} "
                            f"(different VFM settings or weights)")
        for name, value in (("source", source), ("image_size", image_size), ("num_images", num_images)):
            if value is not None and self.meta[name] != value:
                problems.append(f"{name} {self.meta[name]!r} != {value!r}")
        if problems:
            raise InvalidValueError(f"feature cache {str(self.path)!r} does not match: " + "; ".join(problems))

    def features(self, indices: torch.Tensor | Iterable[int], device: torch.device | str = "cpu") -> VFMFeatures:
        """The cached features of dataset items ``indices`` as float32 :class:`VFMFeatures`."""
        index = np.asarray(torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices).cpu())
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"feature cache index out of range [0, {len(self)}): {index.min()}..{index.max()}")
        levels = torch.from_numpy(np.ascontiguousarray(self.levels[index])).to(device).float()
        cls = torch.from_numpy(np.ascontiguousarray(self.cls[index])).to(device).float()
        has_cls = self.meta["has_cls"]
        return VFMFeatures(levels=list(levels.unbind(1)), cls=list(cls.unbind(1)) if has_cls else
                           [None] * levels.shape[1], grid=self.grid)

    @classmethod
    @torch.no_grad()
    def build(cls, vfm: FrozenVFM, images: Iterable[tuple[torch.Tensor, torch.Tensor]], num_images: int,
              path: str | Path, source: str, image_size: int, device: torch.device | str = "cpu") -> "VFMFeatureCache":
        """Run ``vfm`` over ``images`` (an iterable of (indices, images in [-1, 1]) batches, e.g. a data loader with
        the centre crop) and write the cache to ``path``. Indices never written (images that could not be read, which
        the training data loader skips as well) stay zero and are counted in ``meta.json`` as ``unreadable``."""
        grid = vfm.grid
        shape = (num_images, len(vfm.feature_layers), grid[0] * grid[1], vfm.hidden_size)
        with atomic_directory(path) as staging:
            levels = allocated_memmap(staging / "levels.npy", np.float16, shape)
            cls_tokens = allocated_memmap(staging / "cls.npy", np.float16, (shape[0], shape[1], shape[3]))
            written = np.zeros(num_images, dtype=bool)
            for indices, batch in images:
                features = vfm(batch.to(device))
                index = np.asarray(indices.cpu())
                levels[index] = torch.stack(features.levels, 1).half().cpu().numpy()
                if vfm.has_cls:
                    cls_tokens[index] = torch.stack(features.cls, 1).half().cpu().numpy()
                written[index] = True
            levels.flush()
            cls_tokens.flush()
            del levels, cls_tokens
            meta = {"format": _FORMAT, "num_images": num_images, "num_levels": shape[1], "num_tokens": shape[2],
                    "hidden_size": shape[3], "grid": list(grid), "has_cls": vfm.has_cls, "dtype": "float16",
                    "source": source, "image_size": image_size, "vfm_fingerprint": vfm_fingerprint(vfm),
                    "bytes_per_image": cache_bytes_per_image(vfm),
                    "unreadable": int((~written).sum())}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        return cls(path)
