"""Stage one: image tokenizers (VFMTok / VFMAE, DINO-Tok, GloTok), most of them on a frozen vision foundation model.

Every family implements :class:`ImageTokenizerMixin` (``tokenizer/interface.py``); :func:`load_tokenizer` loads a
saved tokenizer of any family."""
from .deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from .interface import CodeLayout, ImageTokenizerMixin, load_tokenizer
from .vfm import VFM_PRESETS, FrozenVFM, VFMFeatures
from .vfmtok import VectorQuantizer, VFMTokModel, VFMTokOutput
from .dinotok import DINOTokModel, DINOTokOutput
from .glotok import GloTokModel, GloTokOutput

__all__ = ["VFMTokModel", "VFMTokOutput", "VectorQuantizer", "FrozenVFM", "VFMFeatures", "VFM_PRESETS",
           "MultiScaleDeformableAttention", "multi_scale_deformable_attention", "CodeLayout", "ImageTokenizerMixin",
           "load_tokenizer", "DINOTokModel", "DINOTokOutput", "GloTokModel", "GloTokOutput"]
