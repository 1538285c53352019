"""Tests of the frozen VFM wrapper (tokenizer/vfm.py) on tiny random models; CPU only, no network."""

from __future__ import annotations

import math
import os
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vfmtok.tokenizer.vfm import VFM_PRESETS, FrozenVFM, VFMFeatures, kornia_bicubic_resize
from vfmtok.tokenizer.utils.foreign import reference_vfmtok_package

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, patch_size=14, image_size=56)
HF_ARCHS = {
    "dinov2": dict(model_type="dinov2", **TINY),
    "dinov2_with_registers": dict(model_type="dinov2_with_registers", num_register_tokens=4, **TINY),
    "siglip_vision_model": dict(model_type="siglip_vision_model", intermediate_size=128, **TINY),
}
TIMM_ARCH = dict(model_name="vit_small_patch14_reg4_dinov2", embed_dim=64, depth=6, num_heads=4, img_size=56)
LAYERS = (1, 3, 5)  # the last one is the final block
PREFIX = {"dinov2": 1, "dinov2_with_registers": 5, "siglip_vision_model": 0, "timm": 5}


def make_vfm(kind: str, image_size: int = 56, layers=LAYERS, **kwargs) -> FrozenVFM:
    torch.manual_seed(0)
    if kind == "timm":
        return FrozenVFM("timm", TIMM_ARCH, image_size, layers, **kwargs)
    return FrozenVFM("hf", HF_ARCHS[kind], image_size, layers, **kwargs)


def images(size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2.2 - 1.1  # slightly outside [-1, 1]: tests the clamp


def pixels_for(x: torch.Tensor, size: int) -> torch.Tensor:
    """The documented preprocessing, written out independently of the module."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return ((x.clamp(-1, 1) + 1) / 2 - MEAN) / STD


def expected_states(vfm: FrozenVFM, kind: str, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Full hidden sequences of blocks LAYERS (the last one post-norm), from the libraries' own forward passes."""
    m = vfm.model
    with torch.no_grad():
        if kind == "timm":
            x = m.norm_pre(m._pos_embed(m.patch_embed(pixels)))
            states = []
            for blk in m.blocks:
                x = blk(x)
                states.append(x)
            return [states[i] for i in LAYERS[:-1]] + [m.forward_features(pixels)]
        extra = {"interpolate_pos_encoding": True} if kind == "siglip_vision_model" else {}
        out = m(pixel_values=pixels, output_hidden_states=True, **extra)
        assert len(out.hidden_states) == vfm.num_layers + 1  # index 0 = embeddings
        return [out.hidden_states[i + 1] for i in LAYERS[:-1]] + [out.last_hidden_state]


KINDS = ["dinov2", "dinov2_with_registers", "siglip_vision_model", "timm"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image_size", [56, 84])  # native grid 4x4, and 6x6 (interpolated position table)
def test_levels_match_library_hidden_states(kind, image_size):
    vfm = make_vfm(kind, image_size)
    x = images(64)
    feats = vfm(x)
    n = image_size // 14
    assert isinstance(feats, VFMFeatures) and feats.grid == (n, n) == vfm.grid
    assert vfm.hidden_size == 64 and vfm.num_register_tokens == (4 if PREFIX[kind] == 5 else 0)
    assert vfm.has_cls == (kind != "siglip_vision_model")
    assert len(feats.levels) == len(feats.cls) == len(LAYERS)
    states = expected_states(vfm, kind, pixels_for(x, image_size))
    prefix = PREFIX[kind]
    for level, cls, state in zip(feats.levels, feats.cls, states):
        assert level.shape == (2, n * n, 64) and level.dtype == torch.float32 and level.is_contiguous()
        torch.testing.assert_close(level, state[:, prefix:], atol=1e-5, rtol=1e-5)
        if vfm.has_cls:
            torch.testing.assert_close(cls, state[:, 0], atol=1e-5, rtol=1e-5)
        else:
            assert cls is None


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_and_usable_in_autograd(kind):
    vfm = make_vfm(kind)
    before = {k: v.clone() for k, v in vfm.state_dict().items()}
    assert not any(p.requires_grad for p in vfm.parameters())
    parent = nn.ModuleDict({"vfm": vfm, "head": nn.Linear(64, 3)})
    parent.train()
    assert parent["head"].training and not any(m.training for m in vfm.modules())

    feats = vfm(images(56))
    assert not any(t.is_inference() or t.requires_grad for t in feats.levels)
    head = parent["head"]
    loss = sum(head(level).square().mean() for level in feats.levels)
    if vfm.has_cls:
        loss = loss + sum(head(c).square().mean() for c in feats.cls)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vfm.parameters())
    after = vfm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_outer_cpu_autocast_is_ignored():
    vfm = make_vfm("dinov2_with_registers")
    x = images(56)
    plain = vfm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = vfm(x)
    for a, b in zip(plain.levels, cast.levels):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_no_resize_when_size_matches():
    vfm = make_vfm("dinov2_with_registers")
    x = images(56)
    torch.testing.assert_close(vfm.preprocess(x), pixels_for(x, 56), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast():
    vfm = make_vfm("dinov2_with_registers")
    x = images(64)
    ref = vfm(x)
    feats = vfm.cuda()(x.cuda())
    for a, b in zip(ref.levels, feats.levels):
        assert b.dtype == torch.float32 and b.is_cuda
        assert (a - b.cpu()).abs().max() < 0.1 * a.abs().max()  # bf16, not exact


# ------------------------------------------------------------------------------------------------------------------
# Loading weights
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dinov2_with_registers", "siglip_vision_model"])
def test_load_pretrained_from_saved_hf_directory(kind, tmp_path):
    source = make_vfm(kind)
    torch.manual_seed(123)
    source.model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)  # differ from seed 0
    source.model.save_pretrained(tmp_path)
    target = make_vfm(kind, pretrained=str(tmp_path))
    x = images(64)
    assert not torch.equal(target(x).levels[-1], source(x).levels[-1])
    target.load_pretrained()
    assert not any(p.requires_grad for p in target.parameters())
    for a, b in zip(target(x).levels, source(x).levels):
        assert torch.equal(a, b)


def test_load_pretrained_rejects_other_architecture(tmp_path):
    other = FrozenVFM("hf", dict(HF_ARCHS["dinov2_with_registers"], num_hidden_layers=4), 56, (1, 3))
    other.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        make_vfm("dinov2_with_registers").load_pretrained(str(tmp_path))


def test_load_pretrained_needs_a_source():
    with pytest.raises(ValueError, match="no pretrained source"):
        make_vfm("dinov2").load_pretrained()


def official_state_dict(dim=64, depth=6, patch=14, grid=4, registers=4, swiglu=False, seed=0) -> dict:
    """Random weights in the facebookresearch/dinov2 key layout (as in dinov2_vitl14_reg4_pretrain.pth)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {"cls_token": rnd(1, 1, dim), "pos_embed": rnd(1, 1 + grid * grid, dim), "mask_token": rnd(1, dim),
          "patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=0.05),
          "patch_embed.proj.bias": rnd(dim, scale=0.1)}
    if registers:
        sd["register_tokens"] = rnd(1, registers, dim)
    ffn = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    for i in range(depth):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[b + norm + ".weight"], sd[b + norm + ".bias"] = rnd(dim, scale=0.1, offset=1.0), rnd(dim, scale=0.1)
        sd[b + "attn.qkv.weight"] = rnd(3 * dim, dim, scale=dim ** -0.5)
        sd[b + "attn.qkv.bias"] = rnd(3 * dim, scale=0.1)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(dim, dim, scale=dim ** -0.5), rnd(dim, scale=0.1)
        sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = rnd(dim, scale=0.3, offset=0.5), rnd(dim, scale=0.3, offset=0.5)
        if swiglu:
            sd[b + "mlp.w12.weight"] = rnd(2 * ffn, dim, scale=dim ** -0.5)
            sd[b + "mlp.w12.bias"] = rnd(2 * ffn, scale=0.1)
            sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"] = rnd(dim, ffn, scale=ffn ** -0.5), rnd(dim, scale=0.1)
        else:
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(ffn, dim, scale=dim ** -0.5), rnd(ffn, scale=0.1)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(dim, ffn, scale=ffn ** -0.5), rnd(dim, scale=0.1)
    sd["norm.weight"], sd["norm.bias"] = rnd(dim, scale=0.1, offset=1.0), rnd(dim, scale=0.1)
    return sd


def official_forward(sd, pixels, layers, heads=4, patch=14, registers=4, swiglu=False):
    """The official DINOv2 forward (forward_features_levels of a ``_reg`` model) written out with functional ops."""
    ln = partial(F.layer_norm, eps=1e-6)
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    B, C, n, _ = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos, n0 = sd["pos_embed"], math.isqrt(sd["pos_embed"].shape[1] - 1)
    if n != n0:  # interpolate_offset 0.0, antialias True, scale_factor (not size), as the official _reg models
        table = pos[:, 1:].reshape(1, n0, n0, C).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=(n / n0, n / n0), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, n * n, C)], dim=1)
    x = x + pos
    if registers:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]], dim=1)
    outs = []
    for i in range(max(layers) + 1):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = ln(x, (C,), w["norm1.weight"], w["norm1.bias"])
        q, k, v = F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(B, -1, 3, heads, C // heads) \
            .permute(2, 0, 3, 1, 4)
        a = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + w["ls1.gamma"] * F.linear(a.transpose(1, 2).reshape(B, -1, C), w["attn.proj.weight"],
                                          w["attn.proj.bias"])
        h = ln(x, (C,), w["norm2.weight"], w["norm2.bias"])
        if swiglu:
            h1, h2 = F.linear(h, w["mlp.w12.weight"], w["mlp.w12.bias"]).chunk(2, dim=-1)
            h = F.linear(F.silu(h1) * h2, w["mlp.w3.weight"], w["mlp.w3.bias"])
        else:
            h = F.linear(F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"],
                         w["mlp.fc2.bias"])
        x = x + w["ls2.gamma"] * h
        if i in layers:
            outs.append(x)
    outs[-1] = ln(outs[-1], (C,), sd["norm.weight"], sd["norm.bias"])
    return outs


@pytest.mark.parametrize("backend", ["hf", "timm"])
@pytest.mark.parametrize("image_size", [56, 42, 70])  # native 4x4, downsampled 3x3, upsampled 5x5 position table
def test_load_official_dinov2_checkpoint(backend, image_size, tmp_path):
    sd = official_state_dict()
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(sd, path)
    arch = HF_ARCHS["dinov2_with_registers"] if backend == "hf" else TIMM_ARCH
    vfm = FrozenVFM(backend, arch, image_size, LAYERS, pretrained=str(path))
    vfm.load_pretrained()
    x = images(64)
    feats = vfm(x)
    with torch.no_grad():
        states = official_forward(sd, pixels_for(x, image_size), LAYERS)
    for level, cls, state in zip(feats.levels, feats.cls, states):
        torch.testing.assert_close(level, state[:, 5:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls, state[:, 0], atol=1e-5, rtol=1e-5)


def test_load_official_swiglu_checkpoint_hf(tmp_path):
    sd = official_state_dict(swiglu=True)
    torch.save(sd, tmp_path / "ckpt.pth")
    vfm = FrozenVFM("hf", dict(HF_ARCHS["dinov2_with_registers"], use_swiglu_ffn=True), 56, LAYERS)
    vfm.load_pretrained(str(tmp_path / "ckpt.pth"))
    x = images(56)
    with torch.no_grad():
        states = official_forward(sd, pixels_for(x, 56), LAYERS, swiglu=True)
    for level, state in zip(vfm(x).levels, states):
        torch.testing.assert_close(level, state[:, 5:], atol=1e-5, rtol=1e-5)


def test_official_checkpoint_without_registers(tmp_path):
    sd = official_state_dict(registers=0)
    torch.save(sd, tmp_path / "ckpt.pth")
    vfm = FrozenVFM("hf", HF_ARCHS["dinov2"], 56, LAYERS)
    vfm.load_pretrained(str(tmp_path / "ckpt.pth"))
    x = images(56)
    with torch.no_grad():
        states = official_forward(sd, pixels_for(x, 56), LAYERS, registers=0)
    torch.testing.assert_close(vfm(x).levels[-1], states[-1][:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="interpolate_offset"):  # other resolutions differ from the official code
        FrozenVFM("hf", HF_ARCHS["dinov2"], 70, LAYERS).load_pretrained(str(tmp_path / "ckpt.pth"))


@pytest.mark.parametrize("backend", ["hf", "timm"])
def test_official_checkpoint_errors_name_the_keys(backend, tmp_path):
    arch = HF_ARCHS["dinov2_with_registers"] if backend == "hf" else TIMM_ARCH
    vfm = FrozenVFM(backend, arch, 56, LAYERS)
    sd = official_state_dict()
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing weight\(s\), e\.g\. \['blocks\.1\.ls2\.gamma"):
        vfm.load_pretrained(str(tmp_path / "missing.pth"))
    sd = official_state_dict()
    del sd["register_tokens"]
    torch.save(sd, tmp_path / "no_reg.pth")
    with pytest.raises(ValueError, match="register_tokens"):
        vfm.load_pretrained(str(tmp_path / "no_reg.pth"))
    sd = official_state_dict()
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "unexpected.pth")
    with pytest.raises(ValueError, match=r"unexpected weight\(s\), e\.g\. \['blocks\.0\.attn\.extra\.weight"):
        vfm.load_pretrained(str(tmp_path / "unexpected.pth"))
    torch.save(official_state_dict(grid=5), tmp_path / "grid.pth")
    with pytest.raises(ValueError, match="of the wrong shape"):
        vfm.load_pretrained(str(tmp_path / "grid.pth"))


def test_backend_layout_file_loads_strictly(tmp_path):
    source = make_vfm("timm")
    torch.manual_seed(5)
    source.model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
    torch.save(source.model.state_dict(), tmp_path / "timm.pth")
    target = make_vfm("timm")
    target.load_pretrained(str(tmp_path / "timm.pth"))
    x = images(56)
    assert torch.equal(target(x).levels[0], source(x).levels[0])
    sd = source.model.state_dict()
    sd.pop("norm.bias")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="norm.bias"):
        target.load_pretrained(str(tmp_path / "bad.pth"))


# ------------------------------------------------------------------------------------------------------------------
# Configuration and input errors
# ------------------------------------------------------------------------------------------------------------------
def test_constructor_errors():
    arch = HF_ARCHS["dinov2_with_registers"]
    with pytest.raises(ValueError, match="backend"):
        FrozenVFM("jax", arch, 56, LAYERS)
    with pytest.raises(ValueError, match="model_type"):
        FrozenVFM("hf", dict(arch, model_type="clip_vision_model"), 56, LAYERS)
    with pytest.raises(ValueError, match="num_hiden_layers"):
        FrozenVFM("hf", dict(arch, num_hiden_layers=3), 56, LAYERS)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        FrozenVFM("hf", arch, 60, LAYERS)
    with pytest.raises(ValueError, match="out of range"):
        FrozenVFM("hf", arch, 56, (1, 6))
    with pytest.raises(ValueError, match="increasing"):
        FrozenVFM("hf", arch, 56, (3, 1))
    with pytest.raises(ValueError, match="unknown timm model"):
        FrozenVFM("timm", dict(TIMM_ARCH, model_name="vit_nonexistent"), 56, LAYERS)


def test_bad_images():
    vfm = make_vfm("dinov2_with_registers")
    for bad in (torch.zeros(3, 56, 56), torch.zeros(1, 4, 56, 56), torch.zeros(1, 1, 56, 56)):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            vfm(bad)
    with pytest.raises(ValueError, match="floating point"):
        vfm(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


def test_presets():
    allowed = {"backend", "architecture", "pretrained", "feature_layers", "image_mean", "image_std"}
    for name, spec in VFM_PRESETS.items():
        assert set(spec) <= allowed and {"backend", "architecture", "pretrained"} <= set(spec), name
    arch = VFM_PRESETS["dinov2-vitl14-reg"]["architecture"]
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"], arch["patch_size"],
            arch["image_size"], arch["num_register_tokens"]) == (1024, 24, 16, 14, 518, 4)
    vfm = FrozenVFM.from_preset("dinov2-vits14-reg", image_size=224)
    assert (vfm.hidden_size, vfm.grid, vfm.native_grid, vfm.feature_layers) == (384, (16, 16), (37, 37), (2, 5, 8, 11))
    with pytest.raises(ValueError, match="unknown VFM preset"):
        FrozenVFM.from_preset("dinov3", 224)


# ------------------------------------------------------------------------------------------------------------------
# resize="kornia": kornia.geometry.resize(bicubic, align_corners=True, antialias=True), as the reference code
# ------------------------------------------------------------------------------------------------------------------
def keys_cubic(t: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (the one torch's bicubic uses, a = -0.75)."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_matrix_align_corners(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D bicubic resampling with align_corners=True (source positions
    j (n_in - 1) / (n_out - 1), taps at floor - 1 .. floor + 2, indices clamped to the image), written out."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        pos = j * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        base = math.floor(pos)
        for k in range(base - 1, base + 3):
            m[j, min(max(k, 0), n_in - 1)] += keys_cubic(pos - k)
    return m


def gaussian_matrix_reflect(n: int, sigma: float, size: int) -> torch.Tensor:
    """(n, n) matrix of 1-D correlation with normalised Gaussian taps, reflect padding (mirror without the edge)."""
    taps = [math.exp(-(k - size // 2) ** 2 / (2 * sigma ** 2)) for k in range(size)]
    taps = [t / sum(taps) for t in taps]
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k, t in enumerate(taps):
            src = i + k - size // 2
            src = -src if src < 0 else (2 * (n - 1) - src if src > n - 1 else src)
            m[i, src] += t
    return m


def separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Apply (H_out, H) ``rows`` and (W_out, W) ``cols`` matrices to every plane of ``x``."""
    return torch.einsum("ih,bchw,jw->bcij", rows, x.double(), cols).float()


def test_kornia_resize_equal_size_is_identity():
    x = images(32)
    assert torch.equal(kornia_bicubic_resize(x, (32, 32)), x)


@pytest.mark.parametrize("size", [(7, 7), (9, 5), (4, 11)])
def test_kornia_resize_upscaling_is_plain_align_corners_bicubic(size):
    x = images(4)[:, :, :, :4]
    out = kornia_bicubic_resize(x, size)
    expected = separable(x, bicubic_matrix_align_corners(4, size[0]), bicubic_matrix_align_corners(4, size[1]))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # no blur when upscaling: exactly torch's bicubic with align_corners=True and no antialias
    assert torch.equal(out, F.interpolate(x, size=size, mode="bicubic", align_corners=True))


@pytest.mark.parametrize("shape, size, sigmas, kernel_sizes", [
    ((18, 12), (6, 4), (1.0, 1.0), (5, 5)),  # factor 3: sigma 1, kernel int(max(4, 3)) = 4 -> odd 5
    ((21, 9), (14, 9), (0.25, 0.001), (3, 3)),  # factor 1.5 (336 -> 224): sigma 0.25, kernel 3; W: sigma floor
    ((40, 8), (4, 16), (4.5, 0.001), (19, 3)),  # factor 10: kernel int(18) -> 19; W upscaled (sigma 0.001)
])
def test_kornia_resize_downscaling_closed_form(shape, size, sigmas, kernel_sizes):
    from vfmtok.tokenizer.vfm import kornia_gaussian_kernel1d

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, *shape, generator=g) * 2 - 1
    blur_rows = gaussian_matrix_reflect(shape[0], sigmas[0], kernel_sizes[0])
    blur_cols = gaussian_matrix_reflect(shape[1], sigmas[1], kernel_sizes[1])
    rows = bicubic_matrix_align_corners(shape[0], size[0]) @ blur_rows
    cols = bicubic_matrix_align_corners(shape[1], size[1]) @ blur_cols
    out = kornia_bicubic_resize(x, size)
    assert out.shape == (2, 3, *size)
    torch.testing.assert_close(out, separable(x, rows, cols), atol=2e-6, rtol=1e-5)
    for k, sigma in zip(kernel_sizes, sigmas):
        kernel = kornia_gaussian_kernel1d(k, sigma)
        assert kernel.shape == (k,) and abs(kernel.sum().item() - 1) < 1e-6
        assert torch.equal(kernel, kernel.flip(0)) and kernel.argmax().item() == k // 2
    # weights sum to one: a constant image stays constant
    const = torch.full((1, 3, *shape), 0.3)
    torch.testing.assert_close(kornia_bicubic_resize(const, size), torch.full((1, 3, *size), 0.3))


def test_kornia_resize_is_not_torch_antialias():
    x = images(32)
    a = kornia_bicubic_resize(x, (24, 24))
    b = F.interpolate(x, size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
    assert (a - b).abs().max() > 1e-2


def test_frozen_vfm_resize_modes():
    x = images(64)
    default = make_vfm("dinov2_with_registers")
    assert default.resize == "antialias"
    torch.testing.assert_close(default.preprocess(x), pixels_for(x, 56), atol=0, rtol=0)
    vfm = make_vfm("dinov2_with_registers", resize="kornia")
    expected = ((kornia_bicubic_resize(x, (56, 56)).clamp(-1, 1) + 1) / 2 - MEAN) / STD
    torch.testing.assert_close(vfm.preprocess(x), expected, atol=0, rtol=0)
    assert not torch.allclose(vfm(x).levels[-1], default(x).levels[-1])
    same = images(56)  # at the VFM size both modes are the identity
    torch.testing.assert_close(vfm.preprocess(same), default.preprocess(same), atol=0, rtol=0)
    assert "resize=kornia" in repr(vfm)
    assert FrozenVFM.from_preset("dinov2-vits14-reg", 224, resize="kornia").resize == "kornia"
    with pytest.raises(ValueError, match="'bilinear'"):
        make_vfm("dinov2_with_registers", resize="bilinear")


def test_tokenizer_vfm_spec_accepts_resize():
    from vfmtok.tokenizer.vfmtok import _vfm_spec

    spec = _vfm_spec({"preset": "dinov2-vitl14-reg", "image_size": 224, "resize": "kornia"})
    assert spec["resize"] == "kornia" and spec["backend"] == "hf"


@pytest.mark.reference
@pytest.mark.parametrize("sizes", [(256, 224), (256, 336), (336, 224)])
def test_kornia_resize_matches_kornia(sizes):
    kornia = pytest.importorskip("kornia", reason="kornia (e.g. PYTHONPATH=/tmp/refdeps) to compare with")
    n_in, n_out = sizes
    x = torch.rand(2, 3, n_in, n_in, generator=torch.Generator().manual_seed(n_in + n_out)) * 2 - 1
    expected = kornia.geometry.resize(x, (n_out, n_out), interpolation="bicubic", align_corners=True, antialias=True)
    diff = (kornia_bicubic_resize(x, (n_out, n_out)) - expected).abs().max().item()
    print(f"\nkornia {kornia.__version__} resize {n_in} -> {n_out}: max abs diff {diff:.2e}")
    assert diff < 1e-5


# ------------------------------------------------------------------------------------------------------------------
# Parity with the reference implementation (VFMTOK_REF_REPO=/path/to/VFMTok checkout)
# ------------------------------------------------------------------------------------------------------------------
def reference_vits():
    repo = os.environ.get("VFMTOK_REF_REPO")
    if not repo:
        pytest.skip("set VFMTOK_REF_REPO to a VFMTok checkout to compare with the reference DINOv2 code")
    os.environ.setdefault("XFORMERS_DISABLED", "1")  # xformers attention would not be bit-comparable
    with reference_vfmtok_package(repo):  # the checkout's package is also called `vfmtok`
        import vfmtok.modules.pretrained_enc.dino_v2.vision_transformer as vits
    return vits


def reference_parity(tmp_path, backend, dim, depth, heads, image_size, layers, batch=2):
    """Random reference dinov2_vit*14_reg (native 518 px) saved as an official .pth, loaded into FrozenVFM,
    compared at ``image_size``; returns the max abs difference over all levels and the last CLS."""
    vits = reference_vits()
    torch.manual_seed(0)
    ref = vits.DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4, init_values=1.0,
        block_fn=partial(vits.Block, attn_class=vits.MemEffAttention), block_chunks=0, num_register_tokens=4,
        interpolate_antialias=True, interpolate_offset=0.0).eval()  # = backbones.dinov2_vitl14_reg(...) kwargs
    with torch.no_grad():  # every tensor random (the reference init leaves biases 0, layer scales 1, tokens ~0)
        for name, p in ref.named_parameters():
            gain = dim ** -0.5 if p.ndim == 2 and "tokens" not in name and name != "mask_token" else 0.1
            p.copy_(torch.randn_like(p) * (0.05 if name.startswith("patch_embed.proj.weight") else gain)
                    + (1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0))
            if "pos_embed" in name or "token" in name:
                p.normal_()
    path = tmp_path / "dinov2_ref_reg4_pretrain.pth"
    torch.save(ref.state_dict(), path)

    arch = (dict(model_type="dinov2_with_registers", hidden_size=dim, num_hidden_layers=depth,
                 num_attention_heads=heads, mlp_ratio=4, patch_size=14, image_size=518, num_register_tokens=4)
            if backend == "hf" else
            dict(model_name="vit_large_patch14_reg4_dinov2", embed_dim=dim, depth=depth, num_heads=heads, img_size=518))
    vfm = FrozenVFM(backend, arch, image_size, layers, pretrained=str(path))
    vfm.load_pretrained()
    x = images(image_size, batch=batch)  # at the VFM size the reference's kornia resize is the identity
    feats = vfm(x)
    with torch.no_grad():
        out = ref.forward_features_levels(((x.clamp(-1, 1) + 1) / 2 - MEAN) / STD, levels=list(layers))
    diffs = [(a - b).abs().max().item() for a, b in zip(feats.levels, out["feature_list"])]
    diffs.append((feats.cls[-1] - out["x_norm_clstoken"]).abs().max().item())
    print(f"\nreference parity {backend} dim={dim} depth={depth} {image_size}px: max abs diff per level "
          f"{['%.2e' % d for d in diffs[:-1]]}, last CLS {diffs[-1]:.2e}")
    return max(diffs)


@pytest.mark.reference
@pytest.mark.parametrize("backend", ["hf", "timm"])
@pytest.mark.parametrize("image_size", [224, 336, 518])
def test_reference_parity_tiny(backend, image_size, tmp_path):
    assert reference_parity(tmp_path, backend, dim=64, depth=8, heads=4, image_size=image_size,
                            layers=(1, 3, 5, 7)) < 1e-4


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "timm"])
def test_reference_parity_vitl14_reg_336(backend, tmp_path):
    assert reference_parity(tmp_path, backend, dim=1024, depth=24, heads=16, image_size=336,
                            layers=(5, 11, 17, 23), batch=1) < 1e-4
