"""An independent judge of class-conditional samples: a scikit-learn classifier on downsampled grey pixels.

It shares nothing with the suite's models: it is fitted on the training split's images (reduced to their native
resolution, e.g. the digits' 8 x 8), checked on the held-out split, and then labels generated images. The share of
samples it labels as the class that was asked for is the samples' **class accuracy**. A judge whose held-out accuracy
is low says nothing about samples; :attr:`PixelJudge.useful` says whether it may be used.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vfmtok.tokenizer.utils.errors import InvalidValueError

__all__ = ["PixelJudge", "judge_images"]

USEFUL_ACCURACY = 0.8  # held-out accuracy below which the judge's verdicts are not reported


def judge_images(images: Sequence[Any] | np.ndarray, size: int) -> np.ndarray:
    """Images (PIL images, or uint8 arrays (N, H, W[, 3])) -> (N, size * size) grey pixels in [0, 1], each image
    box-filtered down to ``size x size`` (the mean over each cell: the inverse of an upscaling's footprint)."""
    from PIL import Image

    rows = []
    for image in images:
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                raise InvalidValueError(f"judge images must be uint8 (H, W) or (H, W, C) arrays or PIL images, got "
                                        f"{array.dtype} {array.shape}")
            image = Image.fromarray(array)
        grey = image.convert("L").resize((size, size), Image.Resampling.BOX)
        rows.append(np.asarray(grey, dtype=np.float64).reshape(-1) / 255.0)
    return np.stack(rows) if rows else np.zeros((0, size * size))


class PixelJudge:
    """An RBF support-vector classifier on :func:`judge_images` features."""

    def __init__(self, size: int = 8, seed: int = 0):
        if size < 2:
            raise InvalidValueError(f"the judge's resolution must be >= 2 pixels, got {size}")
        self.size = size
        self.seed = seed
        self.held_out_accuracy: float | None = None
        self._model = None

    def fit(self, images, labels) -> "PixelJudge":
        from sklearn.svm import SVC

        labels = np.asarray(labels)
        if len(np.unique(labels)) < 2:
            raise InvalidValueError("the judge needs images of at least two classes")
        self._model = SVC(C=10.0, gamma="scale", random_state=self.seed).fit(judge_images(images, self.size), labels)
        return self

    def predict(self, images) -> np.ndarray:
        if self._model is None:
            raise InvalidValueError("the judge is not fitted yet: call fit(images, labels)")
        return self._model.predict(judge_images(images, self.size))

    def accuracy(self, images, labels) -> float:
        """Share of ``images`` labelled as their ``labels``."""
        labels = np.asarray(labels)
        if len(labels) == 0:
            raise InvalidValueError("no images to judge")
        return float((self.predict(images) == labels).mean())

    def check(self, images, labels) -> float:
        """Held-out accuracy (stored; it decides :attr:`useful`)."""
        self.held_out_accuracy = self.accuracy(images, labels)
        return self.held_out_accuracy

    @property
    def useful(self) -> bool:
        return self.held_out_accuracy is not None and self.held_out_accuracy >= USEFUL_ACCURACY

    def describe(self) -> dict[str, Any]:
        return {"model": "scikit-learn SVC (RBF, C=10) on grey pixels", "resolution": f"{self.size}x{self.size}",
                "held_out_accuracy": self.held_out_accuracy, "useful": self.useful,
                "useful_threshold": USEFUL_ACCURACY}
