"""Stage one: image tokenizers built on a frozen vision foundation model (VFMTok, VFMAE)."""
from .deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from .vfm import VFM_PRESETS, FrozenVFM, VFMFeatures
from .vfmtok import VectorQuantizer, VFMTokModel, VFMTokOutput

__all__ = ["VFMTokModel", "VFMTokOutput", "VectorQuantizer", "FrozenVFM", "VFMFeatures", "VFM_PRESETS",
           "MultiScaleDeformableAttention", "multi_scale_deformable_attention"]
