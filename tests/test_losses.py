"""Tests of the tokenizer training losses (tokenizer/losses.py): small random networks, CPU only, no network.

Every expected value is computed independently of the code under test: by hand on small tensors, with torchvision's
own VGG16 layers, with functional (F.conv2d ...) re-implementations of the discriminators, or with timm's forward.
"""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

import vfmtok.tokenizer.lpips
from vfmtok.tokenizer import losses as L
from vfmtok.tokenizer.losses import (D_LOSSES, G_LOSSES, LPIPS, DinoDiscriminator, DiscriminatorWeightsUnavailable,
                              PatchGANDiscriminator, PerceptualWeightsUnavailable, TokenizerLoss, adaptive_gan_weight,
                              hinge_d_loss, hinge_g_loss, non_saturating_d_loss, non_saturating_g_loss,
                              vanilla_d_loss)
from vfmtok.tokenizer.vfmtok import VFMTokOutput

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SMALL_VIT = dict(model_name="vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=4)
SMALL_LAYERS = (1, 3)


def images(batch: int = 2, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------------------------
# GAN loss functions
# ----------------------------------------------------------------------------------------------------------------
REAL, FAKE = [2.0, -0.5, 0.25], [0.3, -3.0]


def test_d_losses_hand_values():
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    # hinge: relu(1 - real) = [0, 1.5, 0.75] -> 0.75; relu(1 + fake) = [1.3, 0] -> 0.65
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.75 + 0.65))
    logistic = 0.5 * (sum(softplus(-r) for r in REAL) / 3 + sum(softplus(f) for f in FAKE) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(logistic, rel=1e-6)
    # -log(sigmoid(r)) = softplus(-r); -log(1 - sigmoid(f)) = softplus(f)
    bce = 0.5 * (sum(-math.log(1 / (1 + math.exp(-r))) for r in REAL) / 3
                 + sum(-math.log(1 - 1 / (1 + math.exp(-f))) for f in FAKE) / 2)
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(bce, rel=1e-6)


def test_g_losses_hand_values():
    fake = torch.tensor(FAKE)
    assert hinge_g_loss(fake).item() == pytest.approx(-(0.3 - 3.0) / 2)
    expected = sum(-math.log(1 / (1 + math.exp(-f))) for f in FAKE) / 2  # -log sigmoid(fake)
    assert non_saturating_g_loss(fake).item() == pytest.approx(expected, rel=1e-6)
    # not the reference's swapped-argument BCE (constant ones as logits, the logits as targets)
    swapped = sum(softplus(1.0) - f for f in FAKE) / 2
    assert abs(non_saturating_g_loss(fake).item() - swapped) > 0.1


def test_loss_tables():
    assert D_LOSSES == {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non_saturating": non_saturating_d_loss}
    assert G_LOSSES == {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def test_adaptive_gan_weight_hand_values():
    w = torch.ones(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)  # grads a and b: ||a|| = 5, ||b|| = 1
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    clamped = adaptive_gan_weight((w * a).sum(), (w * 0.0).sum(), w, max_weight=100.0)  # 5 / 1e-4 -> clamp
    assert clamped.item() == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # up to relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def torchvision_vgg16_features() -> torch.nn.Sequential:
    """torchvision's ``vgg16().features`` (the same builder, without the 120M-parameter classifier)."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])


def naive_lpips(features_state: dict, lin_weights: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor):
    """LPIPS v0.1 written out with torchvision's VGG16 slices; features_state: vgg16().features layout."""
    vgg = torchvision_vgg16_features()
    vgg.load_state_dict(features_state)  # strict: the weights must be in torchvision's layout
    vgg.requires_grad_(False)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    xa, xb = (a - shift) / scale, (b - shift) / scale
    total = torch.zeros(a.shape[0])
    for (start, stop), w in zip(VGG_SLICES, lin_weights):
        for k in range(start, stop):
            xa, xb = vgg[k](xa), vgg[k](xb)
        na = xa / (torch.sqrt((xa ** 2).sum(1, keepdim=True)) + 1e-10)
        nb = xb / (torch.sqrt((xb ** 2).sum(1, keepdim=True)) + 1e-10)
        total = total + ((na - nb) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def lpips_weights(model: LPIPS) -> tuple[dict, list[torch.Tensor]]:
    return model.features.state_dict(), [lin.weight.detach().flatten() for lin in model.lins]


def test_lpips_matches_naive():
    torch.manual_seed(0)
    model = LPIPS()
    a, b = images(2, (32, 48), seed=1), images(2, (32, 48), seed=2)
    out = model(a, b)
    assert out.shape == (2,)
    torch.testing.assert_close(out, naive_lpips(*lpips_weights(model), a, b), rtol=1e-5, atol=1e-6)
    assert torch.equal(model(a, a), torch.zeros(2))


def test_lpips_frozen_but_differentiable():
    model = LPIPS()
    model.train()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    a = images(1, seed=3).requires_grad_(True)
    model(a, images(1, seed=4)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and torch.isfinite(a.grad).all()
    assert all(p.grad is None for p in model.parameters())
    # identical images: a zero distance with a finite (zero) gradient
    c = images(1, seed=5).requires_grad_(True)
    model(c, c.detach()).sum().backward()
    assert torch.isfinite(c.grad).all()


def random_vgg_and_lin_files(tmp_path):
    """A torchvision-layout VGG16 file (with its classifier) and an LPIPS-repo-layout lin file, random values."""
    g = torch.Generator().manual_seed(7)
    layout = torchvision_vgg16_features().state_dict()
    features = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in layout.items()}
    vgg_state = {f"features.{k}": v for k, v in features.items()}
    vgg_state["classifier.6.weight"] = torch.randn(10, 4)  # ignored
    lins = [torch.rand(c, generator=g) for c in LPIPS_CHANNELS]
    lin_state = {f"lin{i}.model.1.weight": w.view(1, -1, 1, 1) for i, w in enumerate(lins)}
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    torch.save(lin_state, tmp_path / "vgg.pth")
    return features, lins


def test_lpips_loads_local_files(tmp_path):
    features, lins = random_vgg_and_lin_files(tmp_path)
    model = LPIPS.pretrained(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    for key, value in features.items():
        assert torch.equal(model.features.state_dict()[key], value)
    for lin, w in zip(model.lins, lins):
        assert torch.equal(lin.weight.flatten(), w)
    assert all(not p.requires_grad for p in model.parameters())
    a, b = images(2, seed=8), images(2, seed=9)
    torch.testing.assert_close(model(a, b), naive_lpips(features, lins, a, b), rtol=1e-5, atol=1e-6)

    lin_state = torch.load(tmp_path / "vgg.pth", weights_only=True)
    del lin_state["lin4.model.1.weight"]
    torch.save(lin_state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="linear-layer"):
        LPIPS.pretrained(str(tmp_path / "vgg16.pth"), str(tmp_path / "bad.pth"))


@pytest.fixture
def offline(monkeypatch):
    """No network and no lpips package: every default weight source fails."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(vfmtok.tokenizer.lpips, "_lpips_package_lin_file", lambda: None)


def test_lpips_unavailable_message(offline, tmp_path):
    with pytest.raises(PerceptualWeightsUnavailable) as info:
        LPIPS.pretrained()
    message = str(info.value)
    for needle in ("VGG16", "linear layers", "lpips_vgg_weights", "lpips_lin_weights", "perceptual_weight: 0",
                   "no network"):
        assert needle in message
    assert isinstance(info.value, RuntimeError)

    random_vgg_and_lin_files(tmp_path)
    with pytest.raises(PerceptualWeightsUnavailable) as info:  # only the lin layers are missing
        LPIPS.pretrained(vgg_weights=str(tmp_path / "vgg16.pth"))
    assert "linear layers" in str(info.value) and "VGG16 ImageNet trunk" not in str(info.value)
    with pytest.raises(PerceptualWeightsUnavailable, match="no such file"):
        LPIPS.pretrained(str(tmp_path / "missing.pth"), str(tmp_path / "vgg.pth"))

    with pytest.raises(PerceptualWeightsUnavailable):
        TokenizerLoss(discriminator="none")
    assert TokenizerLoss(perceptual_weight=0.0, discriminator="none").perceptual_loss is None


def test_lpips_matches_lpips_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    theirs = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()  # random trunk
    vgg_state = {}
    for key, value in theirs.net.state_dict().items():  # slice{k}.{torchvision index}.{param}
        _, index, param = key.split(".")
        vgg_state[f"features.{index}.{param}"] = value
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    ours = LPIPS.pretrained(str(tmp_path / "vgg16.pth"))  # lin layers from the file shipped with lpips
    a, b = images(2, seed=10), images(2, seed=11)
    with torch.no_grad():
        expected = theirs(a, b).flatten()
    torch.testing.assert_close(ours(a, b), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN
# ----------------------------------------------------------------------------------------------------------------
def naive_patchgan(d: PatchGANDiscriminator, x: torch.Tensor) -> torch.Tensor:
    """The 3-layer NLayerDiscriminator written out: conv(s2)-lrelu, 2x conv(s2)-BN-lrelu, conv(s1)-BN-lrelu,
    conv(s1) to 1 channel; BN with batch statistics (training mode)."""
    p = dict(d.named_parameters())

    def bn(h, i):
        mean = h.mean((0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * p[f"main.{i}.weight"].view(1, -1, 1, 1) + \
            p[f"main.{i}.bias"].view(1, -1, 1, 1)

    h = F.leaky_relu(F.conv2d(x, p["main.0.weight"], p["main.0.bias"], stride=2, padding=1), 0.2)
    for conv, norm, stride in ((2, 3, 2), (5, 6, 2), (8, 9, 1)):
        h = F.leaky_relu(bn(F.conv2d(h, p[f"main.{conv}.weight"], None, stride=stride, padding=1), norm), 0.2)
    return F.conv2d(h, p["main.11.weight"], p["main.11.bias"], stride=1, padding=1)


def test_patchgan_matches_naive():
    torch.manual_seed(0)
    d = PatchGANDiscriminator(channels=8)
    shapes = {k: tuple(v.shape) for k, v in d.named_parameters() if k.endswith("weight") and v.ndim == 4}
    assert shapes == {"main.0.weight": (8, 3, 4, 4), "main.2.weight": (16, 8, 4, 4), "main.5.weight": (32, 16, 4, 4),
                      "main.8.weight": (64, 32, 4, 4), "main.11.weight": (1, 64, 4, 4)}
    x = images(3, seed=12)
    out = d(x)
    assert out.shape == (3, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    torch.testing.assert_close(out, naive_patchgan(d, x), rtol=1e-5, atol=1e-6)
    big = PatchGANDiscriminator()
    assert big.main[8].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(big.main[9].bias, torch.zeros(512))


# ----------------------------------------------------------------------------------------------------------------
# DINO discriminator
# ----------------------------------------------------------------------------------------------------------------
def small_dino(**kwargs) -> DinoDiscriminator:
    torch.manual_seed(0)
    return DinoDiscriminator(architecture=SMALL_VIT, feature_layers=SMALL_LAYERS, virtual_batch_size=2, **kwargs)


def test_dino_features_match_timm():
    d = small_dino()
    vit = d.vit
    for x, mode in ((images(2, 48, seed=13), "area"), (images(2, 24, seed=14), "bicubic")):
        pixels = F.interpolate(((x + 1) / 2 - MEAN) / STD, size=(32, 32), mode=mode)
        tokens = F.conv2d(pixels, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=8)
        seq = torch.cat([vit.cls_token.expand(2, -1, -1), tokens.flatten(2).transpose(1, 2)], 1) + vit.pos_embed
        expected = [(seq[:, 1:] + seq[:, :1]).transpose(1, 2)]
        with torch.no_grad():
            pairs = vit.forward_intermediates(pixels, indices=list(SMALL_LAYERS), norm=False, output_fmt="NLC",
                                              return_prefix_tokens=True, intermediates_only=True)
            expected += [(patches + prefix[:, :1]).transpose(1, 2) for patches, prefix in pairs]
            got = d.features(x)
        assert len(got) == 3
        for g, e in zip(got, expected):
            assert g.shape == (2, 32, 16)
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def naive_dino_heads(d: DinoDiscriminator, features: list[torch.Tensor], virtual_batch_size: int) -> torch.Tensor:
    """Eval-mode heads written out: spectral norm from the stored u, v; batch norm per group of samples."""
    s = d.state_dict()

    def conv(x, name, k):
        w = s[f"{name}.weight_orig"]
        w = w / torch.dot(s[f"{name}.weight_u"], w.flatten(1) @ s[f"{name}.weight_v"])
        return F.conv1d(F.pad(x, (k // 2, k // 2), mode="circular"), w, s[f"{name}.bias"])

    def norm(x, name):
        out = []
        for start in range(0, x.shape[0], virtual_batch_size):
            chunk = x[start:start + virtual_batch_size]
            mean = chunk.mean((0, 2), keepdim=True)
            var = ((chunk - mean) ** 2).mean((0, 2), keepdim=True)
            out.append((chunk - mean) / torch.sqrt(var + 1e-6))
        return torch.cat(out) * s[f"{name}.weight"].view(1, -1, 1) + s[f"{name}.bias"].view(1, -1, 1)

    logits = []
    for i, x in enumerate(features):
        h = F.leaky_relu(norm(conv(x, f"heads.{i}.0.0", 1), f"heads.{i}.0.1"), 0.2)
        r = F.leaky_relu(norm(conv(h, f"heads.{i}.1.fn.0", 9), f"heads.{i}.1.fn.1"), 0.2)
        h = (r + h) / math.sqrt(2)
        logits.append(conv(h, f"heads.{i}.2", 1).flatten(1))
    return torch.cat(logits, 1)


def test_dino_heads_match_naive():
    d = small_dino().eval()
    x = images(4, seed=15)
    with torch.no_grad():
        out = d(x)
        expected = naive_dino_heads(d, d.features(x), virtual_batch_size=2)
    assert out.shape == (4, 3 * 16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_dino_parameters_gradients_and_checkpoint():
    d = small_dino()
    assert all(k.startswith("heads.") for k in d.state_dict())
    head_params = list(d.heads.parameters())
    assert len(list(d.parameters())) == len(head_params) == len(list(d.trainable_parameters()))
    assert all(not p.requires_grad for p in d.vit.parameters())
    d.train()
    assert not d.vit.training

    x = images(2, seed=16).requires_grad_(True)
    d(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.vit.parameters())
    assert all(p.grad is not None for p in head_params)
    assert not d.features(x.detach())[1].requires_grad  # no graph through the ViT for the D update

    restored = small_dino()
    torch.manual_seed(123)
    for p in restored.heads.parameters():  # make sure the load, not the seed, makes them equal
        p.data.normal_()
    restored.load_state_dict(d.state_dict(), strict=True)
    restored.vit.load_state_dict(d.vit.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), d.eval()(x))
    d.to(torch.float64)
    assert next(d.vit.parameters()).dtype == torch.float64


def test_dino_load_pretrained(tmp_path, offline):
    import timm
    torch.manual_seed(1)
    # the official DINO backbones use timm's key names
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, act_layer="gelu_tanh",
                               **{k: v for k, v in SMALL_VIT.items() if k != "model_name"})
    torch.save(source.state_dict(), tmp_path / "dino.pth")
    d = small_dino(pretrained=str(tmp_path / "dino.pth"))
    d.load_pretrained()
    for key, value in source.state_dict().items():
        assert torch.equal(d.vit.state_dict()[key], value)
    assert all(not p.requires_grad for p in d.vit.parameters())

    state = source.state_dict()
    state["head.weight"] = torch.zeros(3, 32)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="head.weight"):
        d.load_pretrained(str(tmp_path / "extra.pth"))
    with pytest.raises(DiscriminatorWeightsUnavailable, match="discriminator_weights"):
        d.load_pretrained(L.DINO_VITS16_URL)
    with pytest.raises(ValueError, match="not-a-model"):
        d.load_pretrained("not-a-model")
    with pytest.raises(ValueError, match="feature_layers"):
        DinoDiscriminator(architecture=SMALL_VIT, feature_layers=(1, 4))  # the small ViT has blocks 0..3


def test_tokenizer_loss_default_dino_discriminator():
    loss = TokenizerLoss(perceptual_weight=0.0, discriminator_pretrained=False)
    d = loss.discriminator
    assert isinstance(d, DinoDiscriminator)
    assert d.vit.embed_dim == 384 and len(d.vit.blocks) == 12 and d.feature_layers == (2, 5, 8, 11)
    assert d.image_size == (224, 224) and d.pretrained == L.DINO_VITS16_URL
    assert set(map(id, loss.parameters())) == set(map(id, d.heads.parameters()))
    with torch.no_grad():
        assert d(images(1, seed=17)).shape == (1, 5 * 196)


# ----------------------------------------------------------------------------------------------------------------
# TokenizerLoss
# ----------------------------------------------------------------------------------------------------------------
MODEL_TERMS = {"codebook": 0.3, "commitment": 0.07, "entropy": -0.2, "semantic": 0.6}
WEIGHTS = dict(l2_weight=2.0, l1_weight=0.3, perceptual_weight=0.7, codebook_weight=1.5, commitment_weight=0.5,
               entropy_weight=2.0, semantic_weight=0.25)


def fake_output(seed: int = 20, terms: dict | None = None) -> VFMTokOutput:
    reconstruction = images(2, seed=seed).requires_grad_(True)
    losses = {k: torch.tensor(v, requires_grad=True) for k, v in (MODEL_TERMS if terms is None else terms).items()}
    losses["pixel_l2"] = torch.tensor(123.0)  # the model's own MSE: not used (the loss computes its own)
    return VFMTokOutput(reconstruction=reconstruction, target=images(2, seed=seed + 1), losses=losses)


def make_loss(**kwargs) -> TokenizerLoss:
    torch.manual_seed(0)
    args = dict(WEIGHTS, gan_weight=0.5, gan_start_step=10, discriminator="patchgan", lpips_pretrained=False,
                patchgan_channels=8)
    args.update(kwargs)
    return TokenizerLoss(**args)


def expected_reconstruction_terms(loss: TokenizerLoss, out: VFMTokOutput) -> dict[str, torch.Tensor]:
    rec, tgt = out.reconstruction, out.target
    n = rec.numel()
    return {"l2": 2.0 * ((rec - tgt) ** 2).sum() / n, "l1": 0.3 * (rec - tgt).abs().sum() / n,
            "perceptual": 0.7 * naive_lpips(*lpips_weights(loss.perceptual_loss), rec, tgt).mean()}


def test_generator_loss_hand_summed():
    loss = make_loss()
    out = fake_output()
    expected = {k: v.item() for k, v in expected_reconstruction_terms(loss, out).items()}
    expected.update(codebook=1.5 * 0.3, commitment=0.5 * 0.07, entropy=2.0 * -0.2, semantic=0.25 * 0.6)

    total, logs = loss.generator_loss(out, step=9)  # before gan_start_step: no GAN term
    assert total.dtype == torch.float32 and total.ndim == 0
    assert set(logs) == set(expected) | {"total"}
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    assert logs["total"] == pytest.approx(total.item())

    total, logs = loss.generator_loss(out, step=10)
    logits = naive_patchgan(loss.discriminator, out.reconstruction.detach())
    gan = 0.5 * torch.log1p(torch.exp(-logits)).mean().item()
    assert logs["gan"] == pytest.approx(gan, rel=1e-5)
    assert total.item() == pytest.approx(sum(expected.values()) + gan, rel=1e-5)
    assert "adaptive_gan_weight" not in logs

    partial = fake_output(terms={"semantic": 0.6})  # a continuous model has no VQ terms
    _, logs = loss.generator_loss(partial, step=0)
    assert "codebook" not in logs and "entropy" not in logs and logs["semantic"] == pytest.approx(0.15)


def test_generator_loss_leaves_discriminator_grads_alone():
    loss = make_loss()
    out = fake_output()
    total, logs = loss.generator_loss(out, step=100)
    assert "gan" in logs
    total.backward()
    assert out.reconstruction.grad is not None and out.losses["codebook"].grad is not None
    assert all(p.grad is None and p.requires_grad for p in loss.discriminator.parameters())


def test_discriminator_loss():
    loss = make_loss()
    out = fake_output()
    d_loss, logs = loss.discriminator_loss(out, step=10)
    real = naive_patchgan(loss.discriminator, out.target)
    fake = naive_patchgan(loss.discriminator, out.reconstruction.detach())
    hinge = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    assert d_loss.item() == pytest.approx(hinge.item(), rel=1e-5)
    assert logs["discriminator_active"] == 1.0 and logs["d_loss"] == pytest.approx(d_loss.item())
    assert logs["logits_real"] == pytest.approx(real.mean().item(), rel=1e-5, abs=1e-6)
    d_loss.backward()
    assert out.reconstruction.grad is None
    assert all(p.grad is not None for p in loss.discriminator.parameters())

    assert loss.discriminator_active(10) and not loss.discriminator_active(9)
    d_loss, logs = loss.discriminator_loss(out, step=9)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and logs["discriminator_active"] == 0.0
    none = make_loss(discriminator="none")
    assert none.discriminator is None and not none.discriminator_active(10 ** 6)
    d_loss, logs = none.discriminator_loss(out, step=10 ** 6)
    assert d_loss.item() == 0.0 and logs["discriminator_active"] == 0.0
    _, logs = none.generator_loss(out, step=10 ** 6)
    assert "gan" not in logs


def test_adaptive_gan_weight_matches_manual():
    loss = make_loss(adaptive_gan_weight=True, generator_loss="hinge", gan_start_step=0)
    torch.manual_seed(3)
    last_layer = torch.nn.Parameter(torch.randn(3, 4, 1, 1) * 0.3)
    z, target = torch.randn(2, 4, 32, 32), images(2, seed=30)
    out = VFMTokOutput(reconstruction=F.conv2d(z, last_layer), target=target, losses={})
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(out, step=0)
    total, logs = loss.generator_loss(out, step=0, last_layer=last_layer)

    rec = F.conv2d(z, last_layer)
    nll = 2.0 * ((rec - target) ** 2).mean() + 0.3 * (rec - target).abs().mean() + \
        0.7 * naive_lpips(*lpips_weights(loss.perceptual_loss), rec, target).mean()
    g = -naive_patchgan(loss.discriminator, rec).mean()
    grad_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last_layer)[0]
    weight = (grad_nll.norm() / (grad_g.norm() + 1e-4)).item()
    assert logs["adaptive_gan_weight"] == pytest.approx(weight, rel=1e-4)
    assert logs["gan"] == pytest.approx(weight * 0.5 * g.item(), rel=1e-4)
    assert total.item() == pytest.approx(nll.item() + weight * 0.5 * g.item(), rel=1e-5)


def test_state_dict_and_device_moves():
    loss = make_loss()
    assert loss.state_dict() and all(k.startswith("discriminator.") for k in loss.state_dict())
    loss.to(torch.float64)
    assert next(loss.perceptual_loss.parameters()).dtype == torch.float64
    assert make_loss(perceptual_weight=0.0).perceptual_loss is None


@pytest.mark.parametrize("kwargs, needle", [
    (dict(discriminator_loss="hinge2"), "hinge2"),
    (dict(generator_loss="hinge2"), "hinge2"),
    (dict(generator_loss="vanilla"), "vanilla"),
    (dict(discriminator="foo"), "foo"),
    (dict(l2_weight=-1.0), "l2_weight"),
    (dict(gan_weight=float("nan")), "gan_weight"),
    (dict(semantic_weight=-0.5), "-0.5"),
    (dict(gan_start_step=-5), "-5"),
    (dict(discriminator_weights="dino.pth"), "dino.pth"),
    (dict(patchgan_layers=0), "num_layers"),
])
def test_invalid_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        make_loss(perceptual_weight=0.0, **kwargs)
