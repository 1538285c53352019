"""Stage one: image tokenizers (VFMTok / VFMAE, DINO-Tok, GloTok), most of them on a frozen vision foundation model.

Every family implements :class:`ImageTokenizerMixin` (``tokenizer/interface.py``); :func:`load_tokenizer` loads a
saved tokenizer of any family."""
from vfmtok.tokenizer.deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from vfmtok.tokenizer.interface import CodeLayout, ImageTokenizerMixin, load_tokenizer
from vfmtok.tokenizer.vfm import VFM_PRESETS, FrozenVFM, VFMFeatures
from vfmtok.tokenizer.vfmtok import VectorQuantizer, VFMTokModel, VFMTokOutput
from vfmtok.tokenizer.dinotok import DINOTokModel, DINOTokOutput
from vfmtok.tokenizer.glotok import GloTokModel, GloTokOutput

__all__ = ["VFMTokModel", "VFMTokOutput", "VectorQuantizer", "FrozenVFM", "VFMFeatures", "VFM_PRESETS",
           "MultiScaleDeformableAttention", "multi_scale_deformable_attention", "CodeLayout", "ImageTokenizerMixin",
           "load_tokenizer", "DINOTokModel", "DINOTokOutput", "GloTokModel", "GloTokOutput"]
