"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric";
richzhang/PerceptualSimilarity), VGG16 trunk, version 0.1: the perceptual term of the tokenizer loss and a
reconstruction metric.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from vfmtok.tokenizer.utils.errors import InvalidValueError, WeightsUnavailableError
from vfmtok.tokenizer.utils.fast_conv import Conv3x3
from vfmtok.tokenizer.utils.loading import DOWNLOAD_ERRORS, download_state_dict, load_state_dict_strict, read_state_dict

__all__ = ["LPIPS", "PerceptualWeightsUnavailable", "VGG16_URL", "LPIPS_VGG_LIN_URL"]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
LPIPS_VGG_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


class PerceptualWeightsUnavailable(WeightsUnavailableError):
    """The LPIPS weights (VGG16 trunk and/or linear layers) could not be found or downloaded."""


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
        conv = Conv3x3(channels, spec)  # an nn.Conv2d (NNPACK Winograd on the CPU in fp32)
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
        load_state_dict_strict(self.features, _convert_vgg_state_dict(vgg_state),
                               f"LPIPS VGG16 weights from {vgg_weights or VGG16_URL}")
        load_state_dict_strict(self.lins, _convert_lin_state_dict(lin_state),
                               f"LPIPS linear-layer weights from {lin_weights or LPIPS_VGG_LIN_URL}")
        self.requires_grad_(False)
        self.eval()

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> distances (B,)."""
        if input.ndim != 4 or input.shape[1] != 3 or input.shape != target.shape:
            raise InvalidValueError(f"LPIPS needs two (B, 3, H, W) images of the same shape, got {tuple(input.shape)} "
                             f"and {tuple(target.shape)}")
        batch = input.shape[0]
        if input.requires_grad == target.requires_grad:
            x = (torch.cat([input, target]) - self.shift) / self.scale  # one trunk pass for both
            y = None
        else:  # a training loss: separate passes, so that the backward does not run through the target's
            x, y = (input - self.shift) / self.scale, (target - self.shift) / self.scale
        distance = 0.0
        start = 0
        for lin, tap in zip(self.lins, self.taps):
            x = self.features[start:tap + 1](x)
            if y is None:
                a, b = _unit_normalize(x[:batch]), _unit_normalize(x[batch:])
            else:
                y = self.features[start:tap + 1](y)
                a, b = _unit_normalize(x), _unit_normalize(y)
            start = tap + 1
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
            return download_state_dict(url)
        except DOWNLOAD_ERRORS as err:
            raise PerceptualWeightsUnavailable(f"download of {url} failed ({type(err).__name__}: {err})") from err
    path = Path(url).expanduser()
    if not path.is_file():
        raise PerceptualWeightsUnavailable(f"no such file: {path}")
    return read_state_dict(path)


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
