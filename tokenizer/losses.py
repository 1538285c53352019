"""Training losses of the VFMTok / VFMAE tokenizers (the recipe of the VFMTok training code, CVMI-Lab/VFMTok).

The generator objective (:meth:`TokenizerLoss.generator_loss`) is

    l2_weight * MSE + l1_weight * L1 + perceptual_weight * LPIPS(VGG)
    + codebook_weight * codebook + commitment_weight * commitment + entropy_weight * entropy
    + semantic_weight * semantic + refinement_weight * refinement + histogram_weight * histogram
    + [step >= gan_start_step] * adaptive * gan_weight * G-loss(D(reconstruction))

where codebook / commitment / entropy / semantic are the model's own terms (``VFMTokOutput.losses``, which already
include the quantizer's beta and entropy weight) and ``adaptive`` is 1 unless ``adaptive_gan_weight=True`` (taming's
gradient-norm ratio). The paper recipe (the defaults): 2x MSE, LPIPS 1.0, GAN 0.5 from step 20k with a hinge D loss
and a non-saturating G loss, the discriminator being a frozen DINO ViT-S/16 with trainable spectral-norm heads.

GloTok's terms (only models that produce them, :mod:`vfmtok.tokenizer.glotok`): ``refinement`` is the model's residual
refinement loss (paper weight 0.5, the default); ``histogram`` is the codebook-wise histogram relation loss
``KL(H(teacher) || H(output.semantic_codebook))`` (paper weight 0.01, the default), computed here from the teacher
file ``histogram_teacher`` (``vfmtok glotok-teacher``: ``centroids`` (K, D), and ``histogram`` with the bins /
sharpness it was made with); the teacher histogram is computed once, so no image passes through the pretrained model.

Contents: GAN loss functions on logits (``D_LOSSES``, ``G_LOSSES``), :func:`adaptive_gan_weight` and
:class:`TokenizerLoss`. The perceptual network is in :mod:`vfmtok.tokenizer.lpips`, the discriminators in
:mod:`vfmtok.tokenizer.discriminators`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.discriminators import (DINO_VITS16_ARCHITECTURE, DINO_VITS16_URL, DinoDiscriminator,
                             DiscriminatorWeightsUnavailable, PatchGANDiscriminator)
from vfmtok.tokenizer.lpips import LPIPS, LPIPS_VGG_LIN_URL, VGG16_URL, PerceptualWeightsUnavailable
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.frozen import FrozenModulesMixin

if TYPE_CHECKING:
    from vfmtok.tokenizer.vfmtok import VFMTokOutput

__all__ = [
    "hinge_d_loss", "vanilla_d_loss", "non_saturating_d_loss", "hinge_g_loss", "non_saturating_g_loss",
    "D_LOSSES", "G_LOSSES", "adaptive_gan_weight", "TokenizerLoss",
    # re-exported: the loss's parts, from their own modules
    "LPIPS", "PerceptualWeightsUnavailable", "DiscriminatorWeightsUnavailable", "PatchGANDiscriminator",
    "DinoDiscriminator", "VGG16_URL", "LPIPS_VGG_LIN_URL", "DINO_VITS16_URL", "DINO_VITS16_ARCHITECTURE",
]


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value}")
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


class TokenizerLoss(FrozenModulesMixin, nn.Module):
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
        refinement_weight: float = 0.5,
        histogram_weight: float = 0.01,
        histogram_teacher: str | None = None,
        histogram_bins: int = 40,
        histogram_sharpness: float | None = None,
        histogram_block_elements: int = 1 << 24,
    ):
        super().__init__()
        self.l2_weight = _check_weight("l2_weight", l2_weight)
        self.l1_weight = _check_weight("l1_weight", l1_weight)
        self.perceptual_weight = _check_weight("perceptual_weight", perceptual_weight)
        self.model_loss_weights = {name: _check_weight(f"{name}_weight", value) for name, value in (
            ("codebook", codebook_weight), ("commitment", commitment_weight), ("entropy", entropy_weight),
            ("semantic", semantic_weight), ("refinement", refinement_weight))}
        self.histogram_weight = _check_weight("histogram_weight", histogram_weight)
        if int(histogram_bins) != histogram_bins or histogram_bins < 2:
            raise InvalidValueError(f"histogram_bins must be an integer >= 2, got {histogram_bins}")
        self.histogram_bins = int(histogram_bins)
        self.histogram_sharpness = histogram_sharpness
        self.histogram_block_elements = int(histogram_block_elements)
        self.histogram_teacher = histogram_teacher
        self.register_buffer("teacher_histogram", self._teacher_histogram(histogram_teacher), persistent=False)
        self.gan_weight = _check_weight("gan_weight", gan_weight)
        if int(gan_start_step) != gan_start_step or gan_start_step < 0:
            raise InvalidValueError(f"gan_start_step must be an integer >= 0, got {gan_start_step}")
        self.gan_start_step = int(gan_start_step)
        if discriminator not in DISCRIMINATORS:
            raise InvalidValueError(f"unknown discriminator {discriminator!r}; use one of {list(DISCRIMINATORS)}")
        if discriminator_loss not in D_LOSSES:
            raise InvalidValueError(f"unknown discriminator_loss {discriminator_loss!r}; use one of {sorted(D_LOSSES)}")
        if generator_loss not in G_LOSSES:
            raise InvalidValueError(f"unknown generator_loss {generator_loss!r}; use one of {sorted(G_LOSSES)}")
        if discriminator == "patchgan" and discriminator_weights is not None:
            raise InvalidValueError(f"discriminator_weights ({discriminator_weights!r}) applies to the frozen ViT of "
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
        self.hold_frozen("perceptual", perceptual)  # not part of the loss's checkpoint

        if discriminator == "dino":
            self.discriminator = DinoDiscriminator(pretrained=discriminator_weights or DINO_VITS16_URL)
            if discriminator_pretrained:
                self.discriminator.load_pretrained()
        elif discriminator == "patchgan":
            self.discriminator = PatchGANDiscriminator(3, patchgan_channels, patchgan_layers)
        else:
            self.discriminator = None

    def _teacher_histogram(self, path: str | None) -> torch.Tensor:
        """The teacher's similarity histogram (bins,) from a teacher file, or an empty tensor without one."""
        if path is None:
            return torch.zeros(0)
        from vfmtok.tokenizer.glotok import default_sharpness, similarity_histogram
        from vfmtok.tokenizer.utils.loading import read_state_dict

        teacher = read_state_dict(path)
        sharpness = (default_sharpness(self.histogram_bins) if self.histogram_sharpness is None
                     else float(self.histogram_sharpness))
        stored = teacher.get("histogram")
        made_with = teacher.get("histogram_settings")  # (bins, sharpness) the stored histogram was computed with
        if stored is not None and made_with is not None and int(made_with[0]) == self.histogram_bins and \
                abs(float(made_with[1]) - sharpness) <= 1e-9 * max(1.0, sharpness):
            return stored.float()
        if "centroids" not in teacher:
            raise InvalidValueError(f"histogram_teacher {path!r} holds no 'centroids' (build it with "
                                    f"`vfmtok glotok-teacher`)")
        with torch.no_grad():
            return similarity_histogram(teacher["centroids"].double(), self.histogram_bins, sharpness,
                                        self.histogram_block_elements).float()

    def histogram_loss(self, codebook: torch.Tensor) -> torch.Tensor:
        """``KL(H(teacher) || H(codebook))`` (unweighted)."""
        from vfmtok.tokenizer.glotok import histogram_relation_loss, similarity_histogram

        if self.teacher_histogram.numel() == 0:
            raise InvalidValueError("the model has a semantic codebook and histogram_weight > 0, but the loss has no "
                                    "teacher: set loss.histogram_teacher to a file of `vfmtok glotok-teacher`, or "
                                    "histogram_weight: 0")
        student = similarity_histogram(codebook, self.histogram_bins, self.histogram_sharpness,
                                       self.histogram_block_elements)
        return histogram_relation_loss(student, self.teacher_histogram.to(student.device))

    @property
    def perceptual_loss(self) -> LPIPS | None:
        return self.frozen("perceptual")

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at ``step`` (a discriminator exists and step >= gan_start_step)."""
        return self.discriminator is not None and step >= self.gan_start_step

    @staticmethod
    def _images(output: VFMTokOutput) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction, target = output.reconstruction, output.target
        if reconstruction is None or target is None or reconstruction.shape != target.shape:
            shapes = [None if t is None else tuple(t.shape) for t in (reconstruction, target)]
            raise InvalidValueError(f"output.reconstruction and output.target must be images of the same shape, got "
                                    f"{shapes}")
        return reconstruction.float(), target.float()

    def generator_loss(self, output: VFMTokOutput, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator loss (fp32 scalar) and the weighted terms as floats (keys: the terms present among
        l2, l1, perceptual, codebook, commitment, entropy, semantic, refinement, histogram, gan; total;
        adaptive_gan_weight when used).

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
        codebook = getattr(output, "semantic_codebook", None)
        if codebook is not None and self.histogram_weight > 0:
            terms["histogram"] = self.histogram_weight * self.histogram_loss(codebook)
        logs: dict[str, float] = {}
        if self.discriminator_active(step) and self.gan_weight > 0:
            with _parameters_frozen(self.discriminator):
                logits_fake = self.discriminator(reconstruction)
            g_loss = self.g_loss_fn(logits_fake.float())
            if self.use_adaptive_weight:
                if last_layer is None:
                    raise InvalidValueError("adaptive_gan_weight=True needs `last_layer` "
                                            "(model.pixel_decoder.last_layer)")
                if not torch.is_tensor(nll):
                    raise InvalidValueError("adaptive_gan_weight=True needs a reconstruction loss (l2, l1 or "
                                            "perceptual)")
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
