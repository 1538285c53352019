"""Training losses of the VFMTok / VFMAE tokenizers (REFERENCE.md: the paper's tokenizer recipe).

The generator objective (:meth:`TokenizerLoss.generator_loss`) is

    l2_weight * MSE + l1_weight * L1 + perceptual_weight * LPIPS(VGG)
    + codebook_weight * codebook + commitment_weight * commitment + entropy_weight * entropy
    + semantic_weight * semantic + [step >= gan_start_step] * adaptive * gan_weight * G-loss(D(reconstruction))

where codebook / commitment / entropy / semantic are the model's own terms (``VFMTokOutput.losses``, which already
include the quantizer's beta and entropy weight) and ``adaptive`` is 1 unless ``adaptive_gan_weight=True`` (taming's
gradient-norm ratio). The paper recipe (the defaults): 2x MSE, LPIPS 1.0, GAN 0.5 from step 20k with a hinge D loss
and a non-saturating G loss, the discriminator being a frozen DINO ViT-S/16 with trainable spectral-norm heads.

Contents: GAN loss functions on logits (``D_LOSSES``, ``G_LOSSES``), :func:`adaptive_gan_weight`, the :class:`LPIPS`
metric (VGG16, v0.1), :class:`PatchGANDiscriminator`, :class:`DinoDiscriminator` and :class:`TokenizerLoss`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .vfm import IMAGENET_MEAN, IMAGENET_STD, _build_timm, _load_state_dict_strict, _read_state_dict

if TYPE_CHECKING:
    from .vfmtok import VFMTokOutput

__all__ = [
    "hinge_d_loss", "vanilla_d_loss", "non_saturating_d_loss", "hinge_g_loss", "non_saturating_g_loss",
    "D_LOSSES", "G_LOSSES", "adaptive_gan_weight", "LPIPS", "PerceptualWeightsUnavailable",
    "DiscriminatorWeightsUnavailable", "PatchGANDiscriminator", "DinoDiscriminator", "TokenizerLoss",
    "VGG16_URL", "LPIPS_VGG_LIN_URL", "DINO_VITS16_URL", "DINO_VITS16_ARCHITECTURE",
]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
LPIPS_VGG_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
DINO_VITS16_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"

# The reference discriminator's ViT-S/16 in timm terms. Its MLPs use the tanh approximation of GELU (the reference's
# own ViT code does, although DINO was trained with the exact GELU). The position table is never resampled: images
# are always resized to the native 224 px.
DINO_VITS16_ARCHITECTURE = dict(model_name="vit_small_patch16_224", act_layer="gelu_tanh", dynamic_img_size=False)


class PerceptualWeightsUnavailable(RuntimeError):
    """The LPIPS weights (VGG16 trunk and/or linear layers) could not be found or downloaded."""


class DiscriminatorWeightsUnavailable(RuntimeError):
    """The frozen DINO ViT weights of :class:`DinoDiscriminator` could not be found or downloaded."""


def _download_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A state dict from ``url`` through torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), tensors only."""
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)


# Errors a failed download raises (urllib's URLError / HTTPError and socket / SSL errors are OSErrors).
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError)


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# GAN losses on discriminator logits (any shape; every loss is a mean over all logits)
# ----------------------------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-real) + mean softplus(fake)): the logistic (original GAN) discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


# The reference passes (targets, logits) to binary_cross_entropy_with_logits in the two non-saturating losses, i.e.
# it treats constant ones / zeros as logits and the discriminator's logits as targets. The functions below use the
# intended math: BCE(logits, target), which equals vanilla_d_loss for D and mean softplus(-fake) for G.
def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (BCE(real, 1) + BCE(fake, 0)) with logits, each a mean."""
    loss_real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    loss_fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(fake)."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """BCE(fake, 1) with logits = mean softplus(-fake)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """taming's balance ``||d nll / d W|| / (||d g_loss / d W|| + 1e-4)`` at the decoder's last weight ``W``,
    clamped to [0, max_weight] and detached. Both graphs are kept for the caller's backward."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), VGG16 trunk, version 0.1
# ----------------------------------------------------------------------------------------------------------------
# torchvision's VGG16 configuration "D"; "M" is a 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """``torchvision.models.vgg16().features[:30]`` (up to relu5_3): the same modules at the same indices, so that
    torchvision state dicts load by name, without building (and randomly initialising) the 120M-parameter
    classifier. Random init as torchvision's: kaiming-normal (fan_out, relu) conv weights, zero biases."""
    layers: list[nn.Module] = []
    channels = 3
    for spec in _VGG16_LAYOUT:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(channels, spec, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
        channels = spec
    return nn.Sequential(*layers)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """x / (||x||_channels + eps), as lpips' ``normalize_tensor``. ``vector_norm`` has a zero (not NaN) gradient
    where a feature vector is all zero, unlike ``sqrt(sum(x ** 2))``."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance with a VGG16 trunk, LPIPS v0.1; images in [-1, 1], one value per image (B,).

    Features are taken at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (``features`` holds torchvision's
    ``vgg16().features`` modules 0..29 under the same names ``features.N.weight``), unit-normalised over channels;
    the squared differences are weighted per channel by the 1x1 convolutions ``lins.{k}.weight`` of shape
    (1, C_k, 1, 1) (k = 0..4, the LPIPS repo's ``lin{k}.model.1.weight``), averaged over space and summed over the
    five layers.

    All parameters are frozen and the module is always in eval mode, but gradients flow to the input images. The
    constructor builds random weights; :meth:`load_pretrained` / :meth:`pretrained` load the real ones.
    """

    channels = (64, 128, 256, 512, 512)
    taps = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.channels)
        for lin in self.lins:  # random, non-negative like the trained weights
            nn.init.uniform_(lin.weight, 0.0, 1.0 / lin.in_channels)
        # LPIPS' ScalingLayer: maps [-1, 1] images to (roughly) ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval mode."""
        return super().train(False)

    # -- weights -------------------------------------------------------------------------------------------------
    @classmethod
    def pretrained(cls, vgg_weights: str | None = None, lin_weights: str | None = None) -> LPIPS:
        """A new LPIPS with real weights; see :meth:`load_pretrained`."""
        model = cls()
        model.load_pretrained(vgg_weights, lin_weights)
        return model

    def load_pretrained(self, vgg_weights: str | None = None, lin_weights: str | None = None) -> None:
        """Load the VGG16 trunk and the linear layers.

        ``vgg_weights``: a local torchvision-layout VGG16 state dict (``features.N.weight`` ...; ``classifier.*`` is
        ignored) or URL; None downloads torchvision's ImageNet weights (``VGG16_URL``).
        ``lin_weights``: a local LPIPS-repo ``vgg.pth`` (``lin{k}.model.1.weight``) or URL; None uses the file shipped
        in the ``lpips`` pip package when it is installed, else downloads it (``LPIPS_VGG_LIN_URL``).
        Downloads go through torch.hub's cache. Raises :class:`PerceptualWeightsUnavailable` naming every part that
        could not be found or downloaded, ValueError for a file with missing / unexpected / mis-shaped weights.
        """
        failures = []
        vgg_state = lin_state = None
        try:
            vgg_state = _fetch_state_dict(vgg_weights, VGG16_URL)
        except PerceptualWeightsUnavailable as err:
            failures.append(f"VGG16 ImageNet trunk (config key `lpips_vgg_weights`): {err}")
        try:
            lin_state = _fetch_state_dict(lin_weights if lin_weights is not None else _lpips_package_lin_file(),
                                          LPIPS_VGG_LIN_URL)
        except PerceptualWeightsUnavailable as err:
            failures.append(f"LPIPS v0.1 linear layers (config key `lpips_lin_weights`): {err}")
        if failures:
            raise PerceptualWeightsUnavailable(
                "LPIPS weights are unavailable:\n  - " + "\n  - ".join(failures) + "\nPass local files instead "
                "(`lpips_vgg_weights`: a torchvision vgg16 state dict such as vgg16-397923af.pth; `lpips_lin_weights`: "
                "the LPIPS repo's lpips/weights/v0.1/vgg.pth), or set `perceptual_weight: 0` to disable the "
                "perceptual loss.")
        _load_strict(self.features, _convert_vgg_state_dict(vgg_state), "LPIPS VGG16 weights", vgg_weights)
        _load_strict(self.lins, _convert_lin_state_dict(lin_state), "LPIPS linear-layer weights", lin_weights)
        self.requires_grad_(False)
        self.eval()

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> distances (B,)."""
        if input.ndim != 4 or input.shape[1] != 3 or input.shape != target.shape:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) images of the same shape, got {tuple(input.shape)} "
                             f"and {tuple(target.shape)}")
        batch = input.shape[0]
        x = (torch.cat([input, target]) - self.shift) / self.scale  # one trunk pass for both
        distance = 0.0
        start = 0
        for lin, tap in zip(self.lins, self.taps):
            x = self.features[start:tap + 1](x)
            start = tap + 1
            a, b = _unit_normalize(x[:batch]), _unit_normalize(x[batch:])
            distance = distance + lin((a - b) ** 2).mean(dim=(2, 3))[:, 0]
        return distance


def _lpips_package_lin_file() -> Path | None:
    """The v0.1 VGG linear layers shipped inside the ``lpips`` pip package, when it is installed (not imported)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def _fetch_state_dict(source: str | Path | None, default_url: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a local file or URL (None: ``default_url``); PerceptualWeightsUnavailable if absent."""
    url = default_url if source is None else str(source)
    if url.startswith(("http://", "https://")):
        try:
            return _download_state_dict(url)
        except _DOWNLOAD_ERRORS as err:
            raise PerceptualWeightsUnavailable(f"download of {url} failed ({type(err).__name__}: {err})") from err
    path = Path(url).expanduser()
    if not path.is_file():
        raise PerceptualWeightsUnavailable(f"no such file: {path}")
    return _read_state_dict(path)


def _convert_vgg_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG16 layout -> ``LPIPS.features`` keys (the same names; the classifier is dropped)."""
    return {key.removeprefix("features."): value for key, value in state_dict.items()
            if not key.startswith("classifier.")}


_LIN_KEY = re.compile(r"(?:lin(\d)\.model\.\d+|lins\.(\d))\.weight$")


def _convert_lin_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LPIPS repo layout (``lin{k}.model.1.weight``, ``.model.0.`` without dropout) or ours (``lins.{k}.weight``)
    -> ``LPIPS.lins`` keys ``{k}.weight``. The ScalingLayer constants some files carry are dropped; other keys are
    kept so that the strict load reports them."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("scaling_layer."):
            continue
        m = _LIN_KEY.match(key)
        out[f"{m.group(1) or m.group(2)}.weight" if m else key] = value
    return out


def _load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str, source: str | None) -> None:
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"cannot load {what} from {source or 'the default download'}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Discriminators
# ----------------------------------------------------------------------------------------------------------------
class PatchGANDiscriminator(nn.Module):
    """pix2pix / taming ``NLayerDiscriminator``: 4x4 convolutions (stride 2, then two stride-1), BatchNorm,
    LeakyReLU(0.2); returns a (B, 1, h, w) map of logits. Same module names (``main.N``) as taming's, and its init:
    conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("num_layers", num_layers)):
            if int(value) < 1:
                raise ValueError(f"PatchGAN {name} must be >= 1, got {value}")
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


class DinoDiscriminator(nn.Module):
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
        vit = _build_timm(arch)
        if vit.cls_token is None:
            raise ValueError(f"the DINO discriminator needs a ViT with a CLS token; {arch} has none")
        vit.requires_grad_(False)
        vit.eval()
        # Not registered as a submodule on purpose: the frozen ViT is not part of the discriminator's weights.
        self.__dict__["_vit"] = vit
        self.architecture = arch
        self.pretrained = pretrained
        layers = tuple(int(i) for i in feature_layers)
        if not layers or any(not 0 <= i < len(vit.blocks) for i in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"feature_layers {list(feature_layers)} must be strictly increasing block indices in "
                             f"0..{len(vit.blocks) - 1}")
        self.feature_layers = layers
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        if not 0.0 <= random_crop_prob <= 1.0:
            raise ValueError(f"random_crop_prob must lie in [0, 1], got {random_crop_prob}")
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
        return self.__dict__["_vit"]

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() ... reach the ViT although it is not a submodule.
        super()._apply(fn, *args, **kwargs)
        self.vit._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.vit.eval()
        return self

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
            raise ValueError("no pretrained source: pass one or set `pretrained` in the constructor")
        hint = ("; pass a local copy (config key `discriminator_weights`), or use `discriminator: patchgan` / "
                "`discriminator: none`")
        path = Path(source).expanduser()
        if source.startswith(("http://", "https://")):
            try:
                state_dict = _download_state_dict(source)
            except _DOWNLOAD_ERRORS as err:
                raise DiscriminatorWeightsUnavailable(
                    f"download of the DINO discriminator weights from {source} failed ({type(err).__name__}: {err})"
                    + hint) from err
        elif path.is_file():
            state_dict = _read_state_dict(path)
        elif timm.is_model(source):
            arch = {k: v for k, v in self.architecture.items() if k != "model_name"}
            arch.setdefault("num_classes", 0)
            try:
                state_dict = timm.create_model(source, pretrained=True, **arch).state_dict()
            except _DOWNLOAD_ERRORS as err:
                raise DiscriminatorWeightsUnavailable(
                    f"timm could not load pretrained {source!r} ({type(err).__name__}: {err})" + hint) from err
        else:
            raise ValueError(f"discriminator weights {source!r} are neither a URL, an existing file nor a timm "
                             "model name")
        _load_state_dict_strict(self.vit, state_dict, str(source))
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
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], got {tuple(images.shape)}")
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


@contextlib.contextmanager
def _parameters_frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on the module's trainable parameters, so that a graph built inside does
    not reach them (the generator's adversarial loss must not write into the discriminator's .grad)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------------
# The combined loss
# ----------------------------------------------------------------------------------------------------------------
DISCRIMINATORS = ("dino", "patchgan", "none")


class TokenizerLoss(nn.Module):
    """Generator and discriminator objectives of the tokenizer; see the module docstring for the formula.

    ``state_dict()`` / ``parameters()`` hold the discriminator only: the frozen LPIPS network is kept outside the
    module tree (``perceptual_loss``), so a loss checkpoint is the discriminator's. ``lpips_vgg_weights`` /
    ``lpips_lin_weights`` are used when ``lpips_pretrained`` (None: download, see :meth:`LPIPS.load_pretrained`);
    ``discriminator_weights`` is the DINO ViT source (None: ``DINO_VITS16_URL``), loaded when
    ``discriminator_pretrained`` (the PatchGAN is always trained from scratch and takes no weights).
    """

    def __init__(
        self,
        l2_weight: float = 2.0,
        l1_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        commitment_weight: float = 1.0,
        entropy_weight: float = 1.0,
        semantic_weight: float = 1.0,
        gan_weight: float = 0.5,
        gan_start_step: int = 20000,
        discriminator: str = "dino",
        discriminator_loss: str = "hinge",
        generator_loss: str = "non_saturating",
        adaptive_gan_weight: bool = False,
        lpips_vgg_weights: str | None = None,
        lpips_lin_weights: str | None = None,
        lpips_pretrained: bool = True,
        discriminator_pretrained: bool = True,
        discriminator_weights: str | None = None,
        patchgan_channels: int = 64,
        patchgan_layers: int = 3,
    ):
        super().__init__()
        self.l2_weight = _check_weight("l2_weight", l2_weight)
        self.l1_weight = _check_weight("l1_weight", l1_weight)
        self.perceptual_weight = _check_weight("perceptual_weight", perceptual_weight)
        self.model_loss_weights = {name: _check_weight(f"{name}_weight", value) for name, value in (
            ("codebook", codebook_weight), ("commitment", commitment_weight), ("entropy", entropy_weight),
            ("semantic", semantic_weight))}
        self.gan_weight = _check_weight("gan_weight", gan_weight)
        if int(gan_start_step) != gan_start_step or gan_start_step < 0:
            raise ValueError(f"gan_start_step must be an integer >= 0, got {gan_start_step}")
        self.gan_start_step = int(gan_start_step)
        if discriminator not in DISCRIMINATORS:
            raise ValueError(f"unknown discriminator {discriminator!r}; use one of {list(DISCRIMINATORS)}")
        if discriminator_loss not in D_LOSSES:
            raise ValueError(f"unknown discriminator_loss {discriminator_loss!r}; use one of {sorted(D_LOSSES)}")
        if generator_loss not in G_LOSSES:
            raise ValueError(f"unknown generator_loss {generator_loss!r}; use one of {sorted(G_LOSSES)}")
        if discriminator == "patchgan" and discriminator_weights is not None:
            raise ValueError(f"discriminator_weights ({discriminator_weights!r}) applies to the frozen ViT of "
                             "discriminator='dino'; the PatchGAN is trained from scratch")
        self.discriminator_name = discriminator
        self.d_loss_fn = D_LOSSES[discriminator_loss]
        self.g_loss_fn = G_LOSSES[generator_loss]
        self.use_adaptive_weight = bool(adaptive_gan_weight)

        perceptual = None
        if self.perceptual_weight > 0:
            perceptual = LPIPS()
            if lpips_pretrained:
                perceptual.load_pretrained(lpips_vgg_weights, lpips_lin_weights)
        # Not a submodule on purpose: frozen, and not part of the loss's checkpoint.
        self.__dict__["_perceptual"] = perceptual

        if discriminator == "dino":
            self.discriminator = DinoDiscriminator(pretrained=discriminator_weights or DINO_VITS16_URL)
            if discriminator_pretrained:
                self.discriminator.load_pretrained()
        elif discriminator == "patchgan":
            self.discriminator = PatchGANDiscriminator(3, patchgan_channels, patchgan_layers)
        else:
            self.discriminator = None

    @property
    def perceptual_loss(self) -> LPIPS | None:
        return self.__dict__["_perceptual"]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.perceptual_loss is not None:
            self.perceptual_loss._apply(fn, *args, **kwargs)
        return self

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at ``step`` (a discriminator exists and step >= gan_start_step)."""
        return self.discriminator is not None and step >= self.gan_start_step

    @staticmethod
    def _images(output: VFMTokOutput) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction, target = output.reconstruction, output.target
        if reconstruction is None or target is None or reconstruction.shape != target.shape:
            shapes = [None if t is None else tuple(t.shape) for t in (reconstruction, target)]
            raise ValueError(f"output.reconstruction and output.target must be images of the same shape, got {shapes}")
        return reconstruction.float(), target.float()

    def generator_loss(self, output: VFMTokOutput, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator loss (fp32 scalar) and the weighted terms as floats (keys: the terms present among
        l2, l1, perceptual, codebook, commitment, entropy, semantic, gan; total; adaptive_gan_weight when used).

        ``last_layer``: the decoder's last weight (``model.pixel_decoder.last_layer``), needed only with
        ``adaptive_gan_weight``. The discriminator's parameters are switched to requires_grad=False while it scores
        the reconstruction, so backpropagating this loss leaves their ``.grad`` untouched.
        """
        reconstruction, target = self._images(output)
        terms: dict[str, torch.Tensor] = {}
        if self.l2_weight > 0:
            terms["l2"] = self.l2_weight * F.mse_loss(reconstruction, target)
        if self.l1_weight > 0:
            terms["l1"] = self.l1_weight * F.l1_loss(reconstruction, target)
        if self.perceptual_loss is not None:
            terms["perceptual"] = self.perceptual_weight * self.perceptual_loss(reconstruction, target).float().mean()
        nll = sum(terms.values())  # the reconstruction part, balanced against the GAN term by the adaptive weight
        model_losses = output.losses or {}
        for name, weight in self.model_loss_weights.items():
            if name in model_losses and weight > 0:
                terms[name] = weight * model_losses[name].float()
        logs: dict[str, float] = {}
        if self.discriminator_active(step) and self.gan_weight > 0:
            with _parameters_frozen(self.discriminator):
                logits_fake = self.discriminator(reconstruction)
            g_loss = self.g_loss_fn(logits_fake.float())
            if self.use_adaptive_weight:
                if last_layer is None:
                    raise ValueError("adaptive_gan_weight=True needs `last_layer` (model.pixel_decoder.last_layer)")
                if not torch.is_tensor(nll):
                    raise ValueError("adaptive_gan_weight=True needs a reconstruction loss (l2, l1 or perceptual)")
                weight = adaptive_gan_weight(nll, g_loss, last_layer)
                logs["adaptive_gan_weight"] = weight.item()
                terms["gan"] = weight * self.gan_weight * g_loss
            else:
                terms["gan"] = self.gan_weight * g_loss
        total = sum(terms.values()) if terms else reconstruction.new_zeros(())
        logs.update({name: value.item() for name, value in terms.items()})
        logs["total"] = total.item()
        return total, logs

    def discriminator_loss(self, output: VFMTokOutput, step: int, discriminator: Optional[nn.Module] = None
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator loss on the detached reconstruction (fake) and the target (real), fp32 scalar, and logs
        (d_loss, logits_real, logits_fake, discriminator_active). Before ``gan_start_step`` or without a
        discriminator: a zero tensor that needs no grad, with ``discriminator_active`` 0.0 (skip the D step).

        ``discriminator``: the same discriminator wrapped for distributed training (DDP), used instead of the plain
        one so that its gradients are synchronised."""
        reconstruction, target = self._images(output)
        if not self.discriminator_active(step):
            return target.new_zeros(()), {"d_loss": 0.0, "discriminator_active": 0.0}
        discriminator = discriminator if discriminator is not None else self.discriminator
        # Two passes, as the reference: real and fake get their own batch statistics.
        logits_real = discriminator(target.detach()).float()
        logits_fake = discriminator(reconstruction.detach()).float()
        loss = self.d_loss_fn(logits_real, logits_fake)
        return loss, {"d_loss": loss.item(), "logits_real": logits_real.detach().mean().item(),
                      "logits_fake": logits_fake.detach().mean().item(), "discriminator_active": 1.0}

    def extra_repr(self) -> str:
        return (f"l2={self.l2_weight}, l1={self.l1_weight}, perceptual={self.perceptual_weight}, "
                f"model_terms={self.model_loss_weights}, gan={self.gan_weight} from step {self.gan_start_step}, "
                f"discriminator={self.discriminator_name}, adaptive_gan_weight={self.use_adaptive_weight}")
