"""GAN discriminators of the tokenizer loss: taming's PatchGAN (Esser et al. 2021, CompVis/taming-transformers) and
the frozen-DINO discriminator with spectral-norm heads of the VFMTok training code (CVMI-Lab/VFMTok; the design of
StyleGAN-T and VAR's tokenizer).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError, WeightsUnavailableError
from vfmtok.tokenizer.utils.frozen import FrozenModulesMixin
from vfmtok.tokenizer.utils.loading import DOWNLOAD_ERRORS, download_state_dict, load_state_dict_strict, read_state_dict
from vfmtok.tokenizer.vfm import IMAGENET_MEAN, IMAGENET_STD, build_timm_vit

__all__ = ["PatchGANDiscriminator", "DinoDiscriminator", "DiscriminatorWeightsUnavailable", "DINO_VITS16_URL",
           "DINO_VITS16_ARCHITECTURE"]

DINO_VITS16_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"

# The reference discriminator's ViT-S/16 in timm terms. Its MLPs use the tanh approximation of GELU (the reference's
# own ViT code does, although DINO was trained with the exact GELU). The position table is never resampled: images
# are always resized to the native 224 px.
DINO_VITS16_ARCHITECTURE = dict(model_name="vit_small_patch16_224", act_layer="gelu_tanh", dynamic_img_size=False)


class DiscriminatorWeightsUnavailable(WeightsUnavailableError):
    """The frozen DINO ViT weights of :class:`DinoDiscriminator` could not be found or downloaded."""


class PatchGANDiscriminator(nn.Module):
    """pix2pix / taming ``NLayerDiscriminator``: 4x4 convolutions (stride 2, then two stride-1), BatchNorm,
    LeakyReLU(0.2); returns a (B, 1, h, w) map of logits. Same module names (``main.N``) as taming's, and its init:
    conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("num_layers", num_layers)):
            if int(value) < 1:
                raise InvalidValueError(f"PatchGAN {name} must be >= 1, got {value}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


class LocalBatchNorm(nn.Module):
    """Batch norm of (B, C, L) token features with statistics over (samples, tokens) of the current batch only, in
    consecutive groups of ``virtual_batch_size`` samples, in training and eval alike (no running statistics); the
    reference's ``BatchNormLocal`` (norm type 'bn'), which also returns fp32. A batch that does not split evenly is
    split into ``ceil(B / virtual_batch_size)`` near-equal groups (the reference only handles even splits)."""

    def __init__(self, channels: int, virtual_batch_size: int = 8, eps: float = 1e-6):
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        groups = math.ceil(x.shape[0] / self.virtual_batch_size)
        normed = []
        for chunk in x.tensor_split(groups, dim=0):
            mean = chunk.mean(dim=(0, 2), keepdim=True)
            var = chunk.var(dim=(0, 2), unbiased=False, keepdim=True)
            normed.append((chunk - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(normed) * self.weight[None, :, None] + self.bias[None, :, None]

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, virtual_batch_size={self.virtual_batch_size}, eps={self.eps}"


class _ScaledResidual(nn.Module):
    """(fn(x) + x) / sqrt(2)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1.0 / math.sqrt(2.0))


def _spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv1d:
    """Conv1d with circular "same" padding under (classic) spectral norm: keys ``weight_orig/_u/_v`` as the
    reference's ``SpectralConv1d``; one power iteration per training forward."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


def _head_block(channels: int, kernel_size: int, virtual_batch_size: int, eps: float) -> nn.Sequential:
    return nn.Sequential(_spectral_conv1d(channels, channels, kernel_size),
                         LocalBatchNorm(channels, virtual_batch_size, eps), nn.LeakyReLU(0.2))


class DinoDiscriminator(FrozenModulesMixin, nn.Module):
    """The reference's discriminator (StyleGAN-T / VAR style): a frozen DINO ViT with small trainable heads.

    Images in [-1, 1] are mapped to ImageNet-normalised pixels and resized to the ViT's native size (224 px for
    ViT-S/16: area interpolation when shrinking, bicubic when enlarging, as the reference); with probability
    ``random_crop_prob`` an image larger than that is randomly cropped instead (the reference uses 0.5; 0 here by
    default). Features: the token sequence after the patch + position embedding and after each block of
    ``feature_layers`` (no final LayerNorm), each patch token plus the CLS token, as (B, C, L). Each of these
    ``len(feature_layers) + 1`` feature sets goes through its own head

        spectral-norm Conv1d(k=1) -> LocalBatchNorm -> LeakyReLU(0.2)
        -> residual (x + [spectral-norm Conv1d(k=kernel_size, circular) -> LocalBatchNorm -> LeakyReLU]) / sqrt(2)
        -> spectral-norm Conv1d(k=1) to 1 channel

    and the (B, L) logits of all heads are concatenated: (B, (len(feature_layers) + 1) * L).

    The ViT is held outside the module tree (as ``VFMTokModel`` holds its VFM): ``parameters()`` and
    ``state_dict()`` are the heads only, so a discriminator checkpoint loads strictly without the ViT, and the
    optimizer sees only trainable weights. Its parameters never require grad, but gradients flow through it to the
    input images (the generator's adversarial loss). The constructor never loads weights: call
    :meth:`load_pretrained`. ``architecture`` is a timm architecture dict (as ``FrozenVFM(backend="timm")``).
    """

    def __init__(self, architecture: dict | None = None, feature_layers: Sequence[int] = (2, 5, 8, 11),
                 pretrained: str | None = DINO_VITS16_URL, kernel_size: int = 9, virtual_batch_size: int = 8,
                 norm_eps: float = 1e-6, random_crop_prob: float = 0.0):
        super().__init__()
        arch = dict(DINO_VITS16_ARCHITECTURE if architecture is None else architecture)
        arch.setdefault("dynamic_img_size", False)
        vit = build_timm_vit(arch)
        if vit.cls_token is None:
            raise InvalidValueError(f"the DINO discriminator needs a ViT with a CLS token; {arch} has none")
        self.hold_frozen("vit", vit)  # not part of the discriminator's weights
        self.architecture = arch
        self.pretrained = pretrained
        layers = tuple(int(i) for i in feature_layers)
        if not layers or any(not 0 <= i < len(vit.blocks) for i in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise InvalidValueError(f"feature_layers {list(feature_layers)} must be strictly increasing block "
                                    "indices in "
                             f"0..{len(vit.blocks) - 1}")
        self.feature_layers = layers
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise InvalidValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if virtual_batch_size < 1:
            raise InvalidValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        if not 0.0 <= random_crop_prob <= 1.0:
            raise InvalidValueError(f"random_crop_prob must lie in [0, 1], got {random_crop_prob}")
        self.random_crop_prob = float(random_crop_prob)
        self.image_size = tuple(vit.patch_embed.img_size)
        dim = vit.embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(_head_block(dim, 1, virtual_batch_size, norm_eps),
                          _ScaledResidual(_head_block(dim, kernel_size, virtual_batch_size, norm_eps)),
                          _spectral_conv1d(dim, 1, 1))
            for _ in range(len(layers) + 1))
        # [-1, 1] -> ImageNet-normalised: ((x + 1) / 2 - mean) / std = x * (0.5 / std) + (0.5 - mean) / std
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 0.5 / std, persistent=False)
        self.register_buffer("pixel_shift", (0.5 - mean) / std, persistent=False)

    # -- the frozen ViT ------------------------------------------------------------------------------------------
    @property
    def vit(self) -> nn.Module:
        return self.frozen("vit")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters (what the discriminator optimizer should see)."""
        return (p for p in self.parameters() if p.requires_grad)

    def load_pretrained(self, source: str | None = None) -> None:
        """Load the ViT weights (default: ``self.pretrained``), strictly.

        ``source``: a URL of a timm-layout state dict (the official DINO ``*_pretrain.pth`` backbones use timm's key
        names), a local ``.pth`` / ``.safetensors`` state dict in that layout, or a timm model name with pretrained
        weights (e.g. ``vit_small_patch16_224.dino``). The reference zeroes the key biases of the attention on load:
        a no-op (softmax is invariant to the per-query constant they add), not repeated here.
        """
        import timm

        source = source if source is not None else self.pretrained
        if source is None:
            raise InvalidValueError("no pretrained source: pass one or set `pretrained` in the constructor")
        hint = ("; pass a local copy (config key `discriminator_weights`), or use `discriminator: patchgan` / "
                "`discriminator: none`")
        path = Path(source).expanduser()
        if source.startswith(("http://", "https://")):
            try:
                state_dict = download_state_dict(source)
            except DOWNLOAD_ERRORS as err:
                raise DiscriminatorWeightsUnavailable(
                    f"download of the DINO discriminator weights from {source} failed ({type(err).__name__}: {err})"
                    + hint) from err
        elif path.is_file():
            state_dict = read_state_dict(path)
        elif timm.is_model(source):
            arch = {k: v for k, v in self.architecture.items() if k != "model_name"}
            arch.setdefault("num_classes", 0)
            try:
                state_dict = timm.create_model(source, pretrained=True, **arch).state_dict()
            except DOWNLOAD_ERRORS as err:
                raise DiscriminatorWeightsUnavailable(
                    f"timm could not load pretrained {source!r} ({type(err).__name__}: {err})" + hint) from err
        else:
            raise InvalidValueError(f"discriminator weights {source!r} are neither a URL, an existing file nor a timm "
                             "model name")
        load_state_dict_strict(self.vit, state_dict, f"DINO discriminator ViT weights from {source}")
        self.vit.requires_grad_(False)
        self.vit.eval()

    # -- forward -------------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> ImageNet-normalised fp32 pixels at the ViT's size."""
        x = images.float() * self.pixel_scale + self.pixel_shift
        (h, w), size = x.shape[-2:], self.image_size
        if h > size[0] and w > size[1] and self.random_crop_prob > 0 and \
                torch.rand(()).item() < self.random_crop_prob:
            top = int(torch.randint(0, h - size[0] + 1, ()))
            left = int(torch.randint(0, w - size[1] + 1, ()))
            return x[..., top:top + size[0], left:left + size[1]]
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="area" if h > size[0] else "bicubic")
        return x

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The ``len(feature_layers) + 1`` feature sets (B, C, L): patch tokens + CLS token."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], got {tuple(images.shape)}")
        vit = self.vit
        prefix = vit.num_prefix_tokens

        def readout(tokens: torch.Tensor) -> torch.Tensor:
            return (tokens[:, prefix:] + tokens[:, :1]).transpose(1, 2)

        # No graph through the ViT when nothing upstream needs a gradient (the discriminator's own update).
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(self.preprocess(images)))))
            features = [readout(x)]
            for i, block in enumerate(vit.blocks[:self.feature_layers[-1] + 1]):
                x = block(x)
                if i in self.feature_layers:
                    features.append(readout(x))
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> logits (B, (len(feature_layers) + 1) * L)."""
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, self.features(images))], dim=1)

    def extra_repr(self) -> str:
        return (f"vit={self.architecture.get('model_name')}, image_size={self.image_size}, "
                f"feature_layers={list(self.feature_layers)}, pretrained={self.pretrained}")
