"""Stage one: image tokenizers built on a frozen vision foundation model (VFMTok, VFMAE).

Every family implements :class:`ImageTokenizerMixin` (``tokenizer/interface.py``); :func:`load_tokenizer` loads a
saved tokenizer of any family."""
from .deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from .interface import CodeLayout, ImageTokenizerMixin, load_tokenizer
from .vfm import VFM_PRESETS, FrozenVFM, VFMFeatures
from .vfmtok import VectorQuantizer, VFMTokModel, VFMTokOutput

__all__ = ["VFMTokModel", "VFMTokOutput", "VectorQuantizer", "FrozenVFM", "VFMFeatures", "VFM_PRESETS",
           "MultiScaleDeformableAttention", "multi_scale_deformable_attention", "CodeLayout", "ImageTokenizerMixin",
           "load_tokenizer"]
