"""The frozen vision foundation model (VFM) that feeds the tokenizers (as in the VFMTok code, CVMI-Lab/VFMTok).

``FrozenVFM`` wraps a DINOv2 (with or without registers) or SigLIP vision transformer from transformers
(``backend="hf"``) or a DINOv2 ViT from timm (``backend="timm"``) and returns multi-level patch features:

* images in [-1, 1] are resized to ``image_size`` (bicubic, antialiased), clamped, mapped to [0, 1] and normalised;
  ``resize="antialias"`` (default) is torch's antialiased bicubic (``align_corners=False``), ``resize="kornia"``
  reproduces ``kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=True)``, the
  preprocessing of the reference VFMTok / VFMAE code (and so of their released checkpoints) -- see
  :func:`kornia_bicubic_resize`;
* ``levels[k]`` is the output of block ``feature_layers[k]`` (0-based) without CLS / register tokens; the last
  requested level is taken after the final LayerNorm, the others before it (as the reference's
  ``forward_features_levels``); ``cls[k]`` is the CLS token of the same hidden state (None without CLS);
* blocks after the last requested one are not run, and only the requested hidden states are kept.

The network is always built from ``architecture`` with random weights; ``load_pretrained`` loads real weights from
a Hub id / local directory (hf), a timm model name (timm), a local state-dict file in the backend's own layout, or
an official DINOv2 checkpoint (``dinov2_vitl14_reg4_pretrain.pth``, facebookresearch/dinov2 key layout), whose keys
are converted here.

Position embeddings at other resolutions: the official DINOv2 code interpolates its 37x37 table with
``F.interpolate(scale_factor=n / 37, mode="bicubic", antialias=True)`` for the ``_reg`` models (offset 0.0). Both
transformers' ``Dinov2WithRegistersModel`` and timm (``dynamic_img_size=True``) use ``size=(n, n)`` bicubic with
antialias, which gives bit-identical tables, so features from an official ``_reg`` checkpoint match the official
code at any resolution. The official models WITHOUT registers interpolate with ``interpolate_offset=0.1`` and no
antialias, which neither library reproduces: they match only at the native resolution (a warning says so).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError
from vfmtok.tokenizer.utils.loading import load_state_dict_strict, read_state_dict

__all__ = ["FrozenVFM", "VFMFeatures", "VFM_PRESETS", "convert_official_dinov2", "resize_images",
           "kornia_bicubic_resize", "build_timm_vit", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dinov2_arch(model_type: str, hidden: int, layers: int, heads: int, registers: int) -> dict:
    arch = dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False)
    if registers:
        arch["num_register_tokens"] = registers
    return arch


# Named VFMs for configs (``vfm: {preset: dinov2-vitl14-reg, image_size: 336}``). Keys are FrozenVFM arguments;
# the run resolution (``image_size``) comes from the tokenizer config. ``architecture["image_size"]`` is the
# native resolution of the position table (518 px = 37x37 for DINOv2).
VFM_PRESETS: dict[str, dict] = {
    "dinov2-vitl14-reg": dict(  # the VFM of VFMTok / VFMAE: DINOv2-L/14 with 4 registers
        backend="hf", architecture=_dinov2_arch("dinov2_with_registers", 1024, 24, 16, 4),
        pretrained="facebook/dinov2-with-registers-large", feature_layers=(5, 11, 17, 23)),
    "dinov2-vitb14-reg": dict(
        backend="hf", architecture=_dinov2_arch("dinov2_with_registers", 768, 12, 12, 4),
        pretrained="facebook/dinov2-with-registers-base", feature_layers=(2, 5, 8, 11)),
    "dinov2-vits14-reg": dict(
        backend="hf", architecture=_dinov2_arch("dinov2_with_registers", 384, 12, 6, 4),
        pretrained="facebook/dinov2-with-registers-small", feature_layers=(2, 5, 8, 11)),
    "dinov2-vitl14": dict(
        backend="hf", architecture=_dinov2_arch("dinov2", 1024, 24, 16, 0),
        pretrained="facebook/dinov2-large", feature_layers=(5, 11, 17, 23)),
    "dinov2-vitb14": dict(
        backend="hf", architecture=_dinov2_arch("dinov2", 768, 12, 12, 0),
        pretrained="facebook/dinov2-base", feature_layers=(2, 5, 8, 11)),
    "dinov2-vitl14-reg-timm": dict(  # same network through timm
        backend="timm", architecture=dict(model_name="vit_large_patch14_reg4_dinov2", img_size=518),
        pretrained="vit_large_patch14_reg4_dinov2.lvd142m", feature_layers=(5, 11, 17, 23)),
    "siglip-so400m-patch14-384": dict(  # paper ablation only; SigLIP normalises with mean = std = 0.5, has no CLS
        backend="hf", architecture=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                        num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=384),
        pretrained="google/siglip-so400m-patch14-384", feature_layers=(6, 13, 20, 26),
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}


@dataclass
class VFMFeatures:
    """Multi-level VFM output. All tensors are ordinary float32 tensors (not inference tensors)."""

    levels: list[torch.Tensor]  # per requested layer: (B, h*w, C) patch tokens, row-major, no CLS / registers
    cls: list[torch.Tensor | None]  # per requested layer: CLS token (B, C), None for models without CLS
    grid: tuple[int, int]  # (h, w) patch grid


# ----------------------------------------------------------------------------------------------------------------
# Official DINOv2 checkpoint -> backend key conversion
# ----------------------------------------------------------------------------------------------------------------
# A rule maps one official key template to backend templates; several targets split the tensor into equal chunks
# along dim 0 (fused qkv -> q, k, v; SwiGLU w12 -> gate, up); no target drops the key. ``{i}`` is a block index,
# ``{p}`` is ``weight`` or ``bias``. Rules are also read backwards to name a missing backend key by its official name.
_Rule = tuple[str, tuple[str, ...]]

_HF_DINOV2_RULES: tuple[_Rule, ...] = (
    ("cls_token", ("embeddings.cls_token",)),
    ("mask_token", ("embeddings.mask_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    ("register_tokens", ("embeddings.register_tokens",)),
    ("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",)),
    ("blocks.{i}.norm1.{p}", ("encoder.layer.{i}.norm1.{p}",)),
    ("blocks.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.q_proj.{p}", "encoder.layer.{i}.attention.k_proj.{p}",
                                 "encoder.layer.{i}.attention.v_proj.{p}")),
    ("blocks.{i}.attn.proj.{p}", ("encoder.layer.{i}.attention.o_proj.{p}",)),
    ("blocks.{i}.ls1.gamma", ("encoder.layer.{i}.layer_scale1.lambda1",)),
    ("blocks.{i}.norm2.{p}", ("encoder.layer.{i}.norm2.{p}",)),
    ("blocks.{i}.mlp.fc1.{p}", ("encoder.layer.{i}.mlp.fc1.{p}",)),
    ("blocks.{i}.mlp.fc2.{p}", ("encoder.layer.{i}.mlp.fc2.{p}",)),
    ("blocks.{i}.mlp.w12.{p}", ("encoder.layer.{i}.mlp.gate_proj.{p}", "encoder.layer.{i}.mlp.up_proj.{p}")),
    ("blocks.{i}.mlp.w3.{p}", ("encoder.layer.{i}.mlp.down_proj.{p}",)),
    ("blocks.{i}.ls2.gamma", ("encoder.layer.{i}.layer_scale2.lambda1",)),
    ("norm.{p}", ("layernorm.{p}",)),
)

# timm's DINOv2 ViTs use the official block names; cls/pos folding for ``no_embed_class`` is done separately.
_TIMM_DINOV2_RULES: tuple[_Rule, ...] = (
    ("mask_token", ()),  # timm has no mask token (only used for masked pre-training)
    ("register_tokens", ("reg_token",)),
    ("cls_token", ("cls_token",)),
    ("pos_embed", ("pos_embed",)),
    ("patch_embed.proj.{p}", ("patch_embed.proj.{p}",)),
    ("blocks.{i}.{rest}", ("blocks.{i}.{rest}",)),
    ("norm.{p}", ("norm.{p}",)),
)

_FIELD_PATTERNS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>[\w.]+)"}


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(s) if k % 2 == 0 else _FIELD_PATTERNS[s] for k, s in enumerate(parts)) + "$")


def _match_rule(rules: Sequence[_Rule], key: str, backwards: bool = False) -> tuple[str, ...] | None:
    """Targets of ``key`` under ``rules`` (official -> backend, or backend -> official when ``backwards``)."""
    for official, targets in rules:
        sources, outs = (targets, (official,)) if backwards else ((official,), targets)
        for source in sources:
            m = _template_regex(source).match(key)
            if m:
                return tuple(t.format(**m.groupdict()) for t in outs)
    return None


def _unchunk_key(key: str) -> str:
    """``blocks.<chunk>.<i>.`` (official checkpoints trained with block_chunks > 0) -> ``blocks.<i>.``."""
    return re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)


def is_official_dinov2(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the facebookresearch/dinov2 key layout (timm's is close but has no mask token)."""
    return "patch_embed.proj.weight" in state_dict and "mask_token" in state_dict


def convert_official_dinov2(state_dict: dict[str, torch.Tensor], rules: Sequence[_Rule]) -> dict[str, torch.Tensor]:
    """Rename an official DINOv2 state dict with ``rules`` (``_HF_DINOV2_RULES`` or ``_TIMM_DINOV2_RULES``).

    Keys no rule knows are kept under their own name, so that a strict load reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = _unchunk_key(key)
        targets = _match_rule(rules, key)
        if targets is None:
            out[key] = value
            continue
        chunks = value.chunk(len(targets), dim=0) if len(targets) > 1 else (value,)
        for target, chunk in zip(targets, chunks):
            out[target] = chunk.contiguous()
    return out


def _fold_timm_class_pos(state_dict: dict[str, torch.Tensor]) -> None:
    """timm ``no_embed_class`` models keep no position for the CLS token: add it to the token once (exact: the
    official code adds the same two fp32 tensors at every forward)."""
    if "cls_token" in state_dict and "pos_embed" in state_dict:
        pos = state_dict["pos_embed"]
        state_dict["cls_token"] = state_dict["cls_token"] + pos[:, :1]
        state_dict["pos_embed"] = pos[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------------
RESIZE_MODES = ("antialias", "kornia")


def kornia_gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype = torch.float32,
                             device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``exp(-n^2 / (2 sigma^2))`` at the integer offsets ``n`` of an odd window from
    its centre, computed in ``dtype`` with ``sigma`` rounded to ``dtype`` first (as kornia's kernel)."""
    if size < 1 or size % 2 == 0:
        raise InvalidValueError(f"kernel size must be a positive odd integer, got {size}")
    sigma_t = torch.tensor(float(sigma), dtype=dtype, device=device)
    offsets = torch.arange(size, dtype=dtype, device=device) - float(size // 2)
    gauss = torch.exp(-offsets.pow(2) / (2 * sigma_t.pow(2)))
    return gauss / gauss.sum()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate every (B, C) plane of ``x`` with a 1-D kernel along ``dim`` (-1: W, -2: H), reflect padding."""
    radius = kernel.numel() // 2
    if radius == 0:
        return x * kernel[0]
    b, c, h, w = x.shape
    planes = x.reshape(b * c, 1, h, w)
    if dim == -1:
        padded = F.pad(planes, (radius, radius, 0, 0), mode="reflect")
        weight = kernel.view(1, 1, 1, -1)
    else:
        padded = F.pad(planes, (0, 0, radius, radius), mode="reflect")
        weight = kernel.view(1, 1, -1, 1)
    return F.conv2d(padded, weight.to(x.dtype)).reshape(b, c, h, w)


def kornia_bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=True)`` in torch.

    Same size: ``x`` unchanged. Downscaling along either axis (scale factors ``f = in / out``, ``max(f) > 1``):
    first a separable Gaussian blur with ``sigma = max((f - 1) / 2, 0.001)`` per axis and kernel size
    ``int(max(4 sigma, 3))`` rounded up to odd (1 for an axis of length 1), reflect padding (mirror without the
    edge pixel), along W then H; then, in every case, bicubic interpolation with ``align_corners=True`` and no
    antialias (upscaling is only that interpolation).
    """
    if x.ndim != 4:
        raise InvalidValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return x
    factors = (h / out_h, w / out_w)
    if max(factors) > 1:
        sigmas = tuple(max((f - 1.0) / 2.0, 0.001) for f in factors)
        sizes = [int(max(4.0 * s, 3)) for s in sigmas]
        sizes = [k if k % 2 else k + 1 for k in sizes]
        sizes = [1 if n == 1 else k for n, k in zip((h, w), sizes)]
        kernel_y, kernel_x = (kornia_gaussian_kernel1d(k, s, x.dtype, x.device) for k, s in zip(sizes, sigmas))
        x = _blur_axis(_blur_axis(x, kernel_x, -1), kernel_y, -2)
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=True)


def _ordinary_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy; made outside inference mode it is an ordinary tensor."""
    return t.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------
def _hf_classes(model_type: str):
    """(config class, model class) for a supported transformers ``model_type``."""
    import transformers

    classes = {
        "dinov2": ("Dinov2Config", "Dinov2Model"),
        "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
        "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel"),
    }
    if model_type not in classes:
        raise InvalidValueError(f"unknown hf model_type {model_type!r}; supported: {sorted(classes)}")
    config_name, model_name = classes[model_type]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _build_hf(architecture: dict) -> nn.Module:
    """A randomly initialised transformers model; unknown config keys are errors (configs accept anything)."""
    arch = dict(architecture)
    if "model_type" not in arch:
        raise InvalidValueError("hf architecture needs a 'model_type' (dinov2, dinov2_with_registers, "
                                "siglip_vision_model)")
    config_cls, model_cls = _hf_classes(arch.pop("model_type"))
    unknown = sorted(set(arch) - set(config_cls().to_dict()))
    if unknown:
        raise InvalidValueError(f"unknown {config_cls.__name__} option(s) in architecture: {unknown}")
    return model_cls(config_cls(**arch))


def build_timm_vit(architecture: dict) -> nn.Module:
    """A randomly initialised timm ViT. Defaults: no classifier head (``num_classes=0``, as in the official
    checkpoints) and ``dynamic_img_size=True`` (the position table is resampled to the run resolution)."""
    import timm

    arch = dict(architecture)
    name = arch.pop("model_name", None)
    if name is None:
        raise InvalidValueError("timm architecture needs a 'model_name', e.g. 'vit_large_patch14_reg4_dinov2'")
    if not timm.is_model(name):
        raise InvalidValueError(f"unknown timm model {name!r}")
    arch.setdefault("num_classes", 0)
    arch.setdefault("dynamic_img_size", True)
    model = timm.create_model(name, pretrained=False, **arch)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise InvalidValueError(f"timm model {name!r} is not a plain ViT with forward_intermediates")
    return model


def resize_images(images: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Bicubic resize to ``size x size`` (identity when already that size), antialiased unless ``antialias`` is
    False (plain ``F.interpolate(mode="bicubic")``, what the VFMTok release's evaluation uses for 336 -> 256)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=antialias, align_corners=False)


WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


def looks_like_local_path(source: str) -> bool:
    """Whether a VFM source can only mean a local file or directory (not a Hub id ``org/name`` or a timm name):
    it starts with ``/``, ``.`` or ``~``, has more than one ``/`` or a backslash, or ends with a weights-file
    suffix."""
    text = str(source)
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
            or text.lower().endswith(WEIGHT_FILE_SUFFIXES))


class FrozenVFM(nn.Module):
    """Frozen ViT feature extractor; see the module docstring. The constructor never loads weights."""

    def __init__(self, backend: str, architecture: dict, image_size: int,
                 feature_layers: Sequence[int] = (5, 11, 17, 23), pretrained: str | None = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 resize: str = "antialias"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise InvalidValueError(f"unknown VFM resize mode {resize!r}; use one of {list(RESIZE_MODES)}")
        self.resize = resize
        if backend == "hf":
            self.model = _build_hf(architecture)
        elif backend == "timm":
            self.model = build_timm_vit(architecture)
        else:
            raise InvalidValueError(f"unknown VFM backend {backend!r}; use 'hf' or 'timm'")
        self.backend = backend
        self.architecture = dict(architecture)
        self.pretrained = pretrained
        self.image_size = int(image_size)
        if self.image_size <= 0 or self.image_size % self.patch_size:
            raise InvalidValueError(f"image_size {image_size} must be a positive multiple of the patch size "
                                    f"{self.patch_size}")
        self.feature_layers = self._check_layers(feature_layers)
        if len(image_mean) != 3 or len(image_std) != 3:
            raise InvalidValueError("image_mean and image_std need 3 values (RGB)")
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.eval()

    def reinitialize(self, seed: int = 0) -> None:
        """Fresh random weights, drawn as the constructor draws them, from ``seed``. diffusers builds a model with
        torch's init functions switched off (its weights come from the checkpoint), so a VFM that then loads no
        weights would keep uninitialised memory."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = _build_hf(self.architecture) if self.backend == "hf" else build_timm_vit(self.architecture)
        self.model.load_state_dict(fresh.state_dict())

    @classmethod
    def from_preset(cls, name: str, image_size: int, feature_layers: Sequence[int] | None = None,
                    pretrained: str | None = None, resize: str | None = None) -> FrozenVFM:
        """Build a named VFM (random weights until ``load_pretrained``); None keeps the preset's value."""
        if name not in VFM_PRESETS:
            raise InvalidValueError(f"unknown VFM preset {name!r}; known presets: {sorted(VFM_PRESETS)}")
        spec = dict(VFM_PRESETS[name])
        if feature_layers is not None:
            spec["feature_layers"] = feature_layers
        if pretrained is not None:
            spec["pretrained"] = pretrained
        if resize is not None:
            spec["resize"] = resize
        return cls(image_size=image_size, **spec)

    # -- structure -----------------------------------------------------------------------------------------------
    @property
    def _hf_type(self) -> str | None:
        return self.model.config.model_type if self.backend == "hf" else None

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size if self.backend == "hf" else self.model.embed_dim

    @property
    def patch_size(self) -> int:
        if self.backend == "hf":
            return int(self.model.config.patch_size)
        return int(self.model.patch_embed.patch_size[0])

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers if self.backend == "hf" else len(self.model.blocks)

    @property
    def num_register_tokens(self) -> int:
        if self.backend == "hf":
            return int(getattr(self.model.config, "num_register_tokens", 0))
        return int(self.model.num_reg_tokens)

    @property
    def has_cls(self) -> bool:
        if self.backend == "hf":
            return self._hf_type != "siglip_vision_model"
        return self.model.cls_token is not None

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.has_cls) + self.num_register_tokens

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return (n, n)

    @property
    def native_grid(self) -> tuple[int, int]:
        """Grid of the stored position table (run at another grid, it is interpolated)."""
        if self.backend == "hf":
            n = self.model.config.image_size // self.patch_size
            return (n, n)
        return tuple(self.model.patch_embed.grid_size)

    def _check_layers(self, feature_layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(i) for i in feature_layers)
        if not layers:
            raise InvalidValueError("feature_layers must not be empty")
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise InvalidValueError(f"feature_layers {list(layers)}: {bad} out of range for a "
                                    f"{self.num_layers}-block model "
                             f"(0-based block indices 0..{self.num_layers - 1})")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise InvalidValueError(f"feature_layers must be strictly increasing, got {list(layers)}")
        return layers

    # -- frozen ----------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenVFM:
        """Always eval mode: a parent's ``.train()`` must not enable dropout / drop-path in the frozen VFM."""
        return super().train(False)

    # -- weights -------------------------------------------------------------------------------------------------
    def load_pretrained(self, source: str | None = None) -> None:
        """Load real weights (default: ``self.pretrained``); strict: any missing or unexpected key is a ValueError.

        ``source``: a local ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict (official DINOv2 layout, converted,
        or the backend's own layout); otherwise a Hub id or local directory (hf) or a timm model name (timm).
        """
        source = source if source is not None else self.pretrained
        if source is None:
            raise InvalidValueError("no pretrained source: pass one or set `pretrained` in the constructor / preset")
        path = Path(source).expanduser()
        if not path.exists() and looks_like_local_path(source):
            raise MissingFileError(f"VFM weights: file not found: {str(path)!r} (expected an existing state-dict "
                                   f"file ({', '.join(WEIGHT_FILE_SUFFIXES)}) or directory; a Hub id has the form "
                                   f"'org/name')")
        if path.is_file():
            self._load_file(path)
        elif self.backend == "hf":
            self._load_hf_pretrained(source)
        else:
            self._load_timm_pretrained(source)
        self.requires_grad_(False)
        self.eval()

    def _load_file(self, path: Path) -> None:
        state_dict = read_state_dict(path)
        if not is_official_dinov2(state_dict):
            load_state_dict_strict(self.model, state_dict, f"VFM weights {path}")
            return
        if self._hf_type == "siglip_vision_model":
            raise InvalidValueError(f"{path} is an official DINOv2 checkpoint, but the VFM is a SigLIP model")
        rules = _HF_DINOV2_RULES if self.backend == "hf" else _TIMM_DINOV2_RULES
        converted = convert_official_dinov2(state_dict, rules)
        if self.backend == "timm" and self.model.no_embed_class:
            _fold_timm_class_pos(converted)

        def describe_missing(key: str) -> str:
            official = _match_rule(rules, key, backwards=True)
            return f"{official[0]} (-> {key})" if official and official[0] != key else key

        load_state_dict_strict(self.model, converted, f"official DINOv2 checkpoint {path}",
                               describe_missing=describe_missing)
        if "register_tokens" not in state_dict and self.grid != self.native_grid:
            warnings.warn(
                f"official DINOv2 model without registers run at grid {self.grid} (native {self.native_grid}): the "
                "official code interpolates its position embeddings with interpolate_offset=0.1, which the "
                f"{self.backend} backend does not, so features differ from the official implementation", stacklevel=3)

    def _load_hf_pretrained(self, source: str) -> None:
        """``from_pretrained`` (Hub id or directory), checked against ``architecture``, copied in strictly."""
        _, model_cls = _hf_classes(self._hf_type)
        loaded, info = model_cls.from_pretrained(source, output_loading_info=True, dtype=torch.float32)
        if self._hf_type == "siglip_vision_model":  # full SigLIP checkpoints also hold the text tower
            info["unexpected_keys"] = [k for k in info.get("unexpected_keys", ())
                                       if not k.startswith(("text_model.", "logit_scale", "logit_bias"))]
        problems = {k: sorted(v) for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise InvalidValueError(f"cannot load VFM weights from {source}: {problems}")
        differing = {k: (v, getattr(loaded.config, k, None)) for k, v in self.architecture.items()
                     if k != "model_type" and getattr(loaded.config, k, None) != v}
        if differing:
            raise InvalidValueError(f"the checkpoint at {source} does not match the architecture; "
                             f"(architecture, checkpoint) values: {differing}")
        load_state_dict_strict(self.model, loaded.state_dict(), f"VFM weights {source}")

    def _load_timm_pretrained(self, source: str) -> None:
        import timm

        arch = dict(self.architecture)
        arch.pop("model_name", None)
        arch.setdefault("num_classes", 0)
        arch.setdefault("dynamic_img_size", True)
        loaded = timm.create_model(source, pretrained=True, **arch)
        load_state_dict_strict(self.model, loaded.state_dict(), f"VFM weights {source}")

    # -- forward -------------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise InvalidValueError(f"images must be floating point in [-1, 1], got {images.dtype}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> normalised fp32 pixels at ``image_size`` (resize, clamp, [0, 1], mean/std)."""
        x = images.float()
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            if self.resize == "kornia":
                x = kornia_bicubic_resize(x, size)
            else:
                x = resize_images(x, self.image_size)
        x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
        return (x - self.image_mean) / self.image_std

    def _run_hf(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(prefix tokens, patch tokens) per requested layer, running blocks only up to the last requested one."""
        m = self.model
        if self._hf_type == "siglip_vision_model":
            interpolate = self.grid != self.native_grid
            hidden = m.embeddings(pixels, interpolate_pos_encoding=interpolate)
            layers, final_norm = m.encoder.layers, m.post_layernorm
        else:  # DINOv2 embeddings interpolate the position table themselves when the grid differs
            hidden = m.embeddings(pixels)
            layers, final_norm = m.encoder.layer, m.layernorm
        last, wanted, prefix = self.feature_layers[-1], set(self.feature_layers), self.num_prefix_tokens
        outputs = []
        for i in range(last + 1):
            hidden = layers[i](hidden, None)
            if isinstance(hidden, tuple):  # older transformers layers return tuples
                hidden = hidden[0]
            if i in wanted:
                state = final_norm(hidden) if i == last else hidden
                outputs.append((state[:, :prefix], state[:, prefix:]))
        return outputs

    def _run_timm(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self.model
        pairs = m.forward_intermediates(pixels, indices=list(self.feature_layers), return_prefix_tokens=True,
                                        norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True)
        if self.num_prefix_tokens:  # timm gives (patches, prefix) pairs, or bare tensors without prefix tokens
            pairs = [(prefix, patches) for patches, prefix in pairs]
        else:
            pairs = [(patches[:, :0], patches) for patches in pairs]
        prefix, patches = pairs[-1]
        pairs[-1] = (m.norm(prefix), m.norm(patches))  # LayerNorm is per token: same as norming the whole sequence
        return pairs

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block in place (GPU training; weights and their names unchanged).

        Blocks rather than the whole model, because :meth:`forward` runs the blocks itself to stop early."""
        m = self.model
        if self.backend == "timm":
            blocks = m.blocks
        elif self._hf_type == "siglip_vision_model":
            blocks = m.encoder.layers
        else:
            blocks = m.encoder.layer
        for block in blocks:
            block.compile()

    def _autocast(self, device: torch.device):
        """bf16 on CUDA; elsewhere fp32, also overriding any autocast the caller has enabled."""
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cpu":
            return torch.autocast("cpu", enabled=False)
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> VFMFeatures:
        """images (B, 3, H, W) in [-1, 1] -> :class:`VFMFeatures` at ``self.grid``."""
        self._check_images(images)
        with torch.inference_mode():
            pixels = self.preprocess(images)
            weight_dtype = next(self.model.parameters()).dtype
            with self._autocast(images.device):
                pairs = self._run_hf(pixels.to(weight_dtype)) if self.backend == "hf" else \
                    self._run_timm(pixels.to(weight_dtype))
        # Copies made outside inference mode are ordinary tensors that autograd graphs of the caller may use.
        levels = [_ordinary_copy(patches) for _, patches in pairs]
        cls = [_ordinary_copy(prefix[:, 0]) if self.has_cls else None for prefix, _ in pairs]
        return VFMFeatures(levels=levels, cls=cls, grid=self.grid)

    def extra_repr(self) -> str:
        return (f"backend={self.backend}, image_size={self.image_size}, grid={self.grid}, "
                f"feature_layers={list(self.feature_layers)}, hidden_size={self.hidden_size}, resize={self.resize}")
