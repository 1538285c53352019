"""Opt-in: a converted release gives the reference code's images. Random weights are saved in each release's exact
file layout by the reference code itself; the reference samples and decodes them as its own evaluation does
(VFMTok2 ``test_c2i.py``: ODE Euler, shift 4, 100 grid points, ``x * (var + 1e-5) + mean``, ``decode_to_imgs``;
VFMTok ``test_net.py``: ``generate`` then ``decode_codes_to_img(codes, 256)``); the suite converts the same files
(release protocol by default) and samples with the same noise and labels. uint8 images must agree within 1.

Run with ``-m reference``, ``VFMTOK2_REF_REPO`` (CVMI-Lab/VFMTok2 checkout) / ``VFMTOK_REF_REPO`` (CVMI-Lab/VFMTok
checkout) and the reference's extra packages (torchdiffeq, omegaconf, einops, kornia) on ``PYTHONPATH``.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_reference_parity import VFMAE_REFERENCE_SCRIPT, vfmae_config

pytestmark = [pytest.mark.reference, pytest.mark.slow]  # minutes each: run with -m reference

# The VFMAE part of test_reference_parity's script (shims, the reference AutoencoderAE with random weights, saved in
# the release layout), then a VFMTok2 denoiser and its own sampler. Extra arguments: KIND (ditdh | lightningdit) and
# the CFG scale.
FLOW_REFERENCE_SCRIPT = VFMAE_REFERENCE_SCRIPT.split("images = torch.load")[0] + r"""
import math
import numpy as np
from einops import rearrange
from denoise.models.DDT import DiTwDDTHead
from denoise.models.lightningDiT import LightningDiT
from denoise.transport import Sampler, create_transport

kind, scale = sys.argv[7], float(sys.argv[8])


def denoiser(seed, name):
    torch.manual_seed(seed)
    if kind.startswith("ditdh"):
        den = DiTwDDTHead(input_size=16, patch_size=1, in_channels=embed_dim, hidden_size=[64, 96], depth=[2, 1],
                          num_heads=[4, 4], mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                          use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
                          use_pos_embed=True)
    else:
        den = LightningDiT(input_size=16, patch_size=1, in_channels=embed_dim, hidden_size=64, depth=2, num_heads=4,
                           mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000)
    den.eval()
    with torch.no_grad():  # no zero-initialised layer left
        for pname, p in den.named_parameters():
            if pname not in ("pos_embed", "t_embedder.W"):
                p.normal_(std=0.05) if p.ndim > 1 else p.add_(0.05 * torch.randn_like(p))
    torch.save({"ema": den.state_dict(), "model": {}}, os.path.join(workdir, name))
    return den


den = denoiser(2, "denoiser.pt")
weak = denoiser(3, "weak.pt") if kind == "ditdh-ag" else None
rng = np.random.default_rng(0)  # stats-500.pt's layout: numpy float32 (C, h*w), 'var' a scale
torch.save({"mean": (rng.normal(size=(embed_dim, 256)) * 0.3).astype(np.float32),
            "var": (rng.random(size=(embed_dim, 256)) * 0.3 + 0.2).astype(np.float32)},
           os.path.join(workdir, "stats-500.pt"))

# test_c2i.py
stats = torch.load(os.path.join(workdir, "stats-500.pt"), map_location="cpu", weights_only=False)
mean, var = torch.tensor(stats["mean"]), torch.tensor(stats["var"])
mean = rearrange(mean, "c (h w) -> c h w", h=16, w=16).unsqueeze(0)
var = rearrange(var, "c (h w) -> c h w", h=16, w=16).unsqueeze(0)
transport = create_transport("Linear", "velocity", None, None, None, time_dist_type="uniform",
                             time_dist_shift=math.sqrt(65536 / 4096))
sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=100, atol=1e-6, rtol=1e-3,
                                          reverse=False)
z = torch.load(os.path.join(workdir, "noise.pt"))
y = torch.load(os.path.join(workdir, "labels.pt"))
ref.eval()
with torch.no_grad():
    if weak is not None:  # the _AG sampling config: forward_with_autoguidance on [z; z] with [y; null]
        n = len(y)
        samples = sample_fn(torch.cat([z, z]), den.forward_with_autoguidance, y=torch.cat([y, torch.full((n,), 1000)]),
                            cfg_scale=scale, cfg_interval=(0.0, 1.0), additional_model_forward=weak.forward)[-1]
        samples, _ = samples.chunk(2, dim=0)
    elif scale > 1.0:
        n = len(y)
        samples = sample_fn(torch.cat([z, z]), den.forward_with_cfg, y=torch.cat([y, torch.full((n,), 1000)]),
                            cfg_scale=scale, cfg_interval=(0.0, 1.0))[-1]
        samples, _ = samples.chunk(2, dim=0)
    else:
        samples = sample_fn(z, den.forward, y=y)[-1]
    x = samples * (var.to(samples) + 1e-5) + mean.to(samples)
    images = ref.decode_to_imgs(x)
torch.save(images, os.path.join(workdir, "reference_images.pt"))
"""

DIM, ENCODER_DEPTH, DECODER_DEPTH, EMBED_DIM = 64, 2, 2, 32


def _our_denoiser(kind: str):
    from vfmtok.generators.dit import DiTModel

    common = dict(in_channels=EMBED_DIM, latent_size=16, patch_size=1, num_classes=1000, dim=64, depth=2,
                  num_heads=4, norm="rmsnorm", mlp="swiglu", rope=True, pos_embed="sincos",
                  time_embedding="gaussian_fourier", reverse_time=True)
    if kind.startswith("ditdh"):
        return DiTModel(**common, condition_silu=True, head_width=96, head_depth=1, head_num_heads=4,
                        head_patch_size=1)
    return DiTModel(**common, condition_silu=False)


def _uint8(images: np.ndarray) -> np.ndarray:
    """The suite's conversion (benchmark): round(clip(x, 0, 1) * 255); the reference's clamp(127.5 x + 128) then
    truncation is the same function of the decoder output x in [-1, 1] (up to ties)."""
    return np.round(np.clip(images, 0, 1) * 255).astype(np.int16)


@pytest.mark.parametrize("kind,scale", [("ditdh", 1.0), ("ditdh", 1.5), ("ditdh-ag", 1.37), ("lightningdit", 1.0)])
def test_converted_vfmae_release_gives_the_reference_images(kind, scale, tmp_path):
    from vfmtok.generators.convert_dit import convert_ddt_checkpoint, convert_lightningdit_checkpoint
    from vfmtok.pipelines.convert import assemble_pipeline
    from vfmtok.pipelines.official import apply_protocol
    from vfmtok.tokenizer.convert import convert_reference_checkpoint
    from vfmtok.tokenizer.vfmtok import VFMTokModel

    repo = os.environ.get("VFMTOK2_REF_REPO")
    if not repo:
        pytest.skip("set VFMTOK2_REF_REPO (a CVMI-Lab/VFMTok2 checkout)")
    labels, seed = [3, 207, 999], 11
    noise = torch.randn((3, EMBED_DIM, 16, 16), generator=torch.Generator().manual_seed(seed))  # the pipeline's draw
    torch.save(noise, tmp_path / "noise.pt")
    torch.save(torch.tensor(labels), tmp_path / "labels.pt")
    run = subprocess.run([sys.executable, "-", repo, str(tmp_path), str(DIM), str(ENCODER_DEPTH), str(DECODER_DEPTH),
                          str(EMBED_DIM), kind, str(scale)], input=FLOW_REFERENCE_SCRIPT, text=True,
                         capture_output=True, cwd=repo, timeout=1800)
    assert run.returncode == 0, f"the reference failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    reference = torch.load(tmp_path / "reference_images.pt", weights_only=True).numpy().astype(np.int16)

    tokenizer = VFMTokModel(**vfmae_config(DIM, ENCODER_DEPTH, DECODER_DEPTH, EMBED_DIM))
    assert convert_reference_checkpoint(tmp_path / "vfmae.pt", tokenizer) == []
    convert = convert_ddt_checkpoint if kind.startswith("ditdh") else convert_lightningdit_checkpoint
    denoisers = {}
    for name in ("denoiser", "weak") if kind == "ditdh-ag" else ("denoiser",):
        denoisers[name] = _our_denoiser(kind)
        convert(tmp_path / f"{name}.pt", denoisers[name], latent_stats=tmp_path / "stats-500.pt")  # VFMTok2's convention
    pipe = assemble_pipeline(tokenizer, denoisers["denoiser"], weak_generator=denoisers.get("weak"))
    apply_protocol(pipe, "vfmtok2-flow")  # what convert pipeline / --official do
    images = pipe(labels, guidance_scale=scale, generator=torch.Generator().manual_seed(seed), output_type="np").images
    ours = _uint8(images)
    diff = np.abs(ours - reference)
    print(f"\n{kind} cfg {scale}: uint8 max |ours - reference| {diff.max()}, mean {diff.mean():.4f}, "
          f"pixels differing {(diff > 0).mean():.2e}; reference image std {reference.std():.1f}")
    assert reference.shape == ours.shape == (3, 256, 256, 3) and reference.std() > 5
    assert diff.max() <= 1


# ----------------------------------------------------------------------------------------------------------------------
# GPT over VFMTok (CVMI-Lab/VFMTok): the reference tokenizer built by ../shared/tools/vfmtok_ref.py (see
# test_reference_parity.py; importing it patches .cuda() for the process, so run this file on its own)
# ----------------------------------------------------------------------------------------------------------------------
from test_reference_parity import our_config, reference_module  # noqa: E402,F401  (the fixture)
from vfmtok.tokenizer.utils.foreign import reference_vfmtok_package  # noqa: E402


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_converted_vfmtok_gpt_release_gives_the_reference_images(reference_module, scale, tmp_path, monkeypatch):
    from vfmtok.generators.convert_gpt import convert_llamagen_checkpoint
    from vfmtok.generators.gpt import GPTModel
    from vfmtok.pipelines.convert import assemble_pipeline
    from vfmtok.pipelines.official import apply_protocol
    from vfmtok.tokenizer.convert import convert_reference_checkpoint
    from vfmtok.tokenizer.vfmtok import VFMTokModel

    ref_tool, repo = reference_module
    monkeypatch.chdir(repo)
    torch.manual_seed(0)
    dim, depth = 64, 2
    with reference_vfmtok_package(repo, ref_tool.reference_modules):  # it imports its modules while building
        tokenizer_ref = ref_tool.build("dinov2_vitl14_reg", 1024, 336, dim=dim, depth=depth).eval()
    with torch.no_grad():
        for name, p in tokenizer_ref.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.normal_(0, 0.05)
    torch.save({"ema": {k: v for k, v in tokenizer_ref.state_dict().items() if "backbone" not in k}},
               tmp_path / "vfmtok-tokenizer.pt")
    sys.path.insert(0, repo)
    try:
        from autoregressive.models.generate import generate as reference_generate
        from autoregressive.models.gpt import ModelArgs, Transformer
    finally:
        sys.path.remove(repo)
    gpt_ref = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=16384, block_size=256, num_classes=1000,
                                    cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0,
                                    resid_dropout_p=0.0, ffn_dropout_p=0.0)).eval()
    with torch.no_grad():
        for p in gpt_ref.parameters():
            p.normal_(0, 0.3)
    torch.save({"model": gpt_ref.state_dict()}, tmp_path / "GPT-B-300e.pt")
    labels = torch.tensor([3, 207])
    torch.manual_seed(7)  # test_net.py: generate, then decode_codes_to_img(codes, image_size_eval=256)
    with torch.no_grad():
        codes = reference_generate(gpt_ref, labels, 256, cfg_scale=scale, cfg_interval=-1, temperature=1.0, top_k=0,
                                   top_p=1.0)
        with reference_vfmtok_package(repo, ref_tool.reference_modules):
            reference = tokenizer_ref.decode_codes_to_img(codes, 256).numpy().astype(np.int16)

    tokenizer = VFMTokModel(**our_config(dim, depth))
    convert_reference_checkpoint(tmp_path / "vfmtok-tokenizer.pt", tokenizer)
    gpt = GPTModel(vocab_size=16384, num_tokens=256, num_classes=1000, dim=64, depth=2, num_heads=4,
                   class_token_rope="zero")
    convert_llamagen_checkpoint(tmp_path / "GPT-B-300e.pt", gpt)
    pipe = assemble_pipeline(tokenizer, gpt)
    apply_protocol(pipe, "vfmtok-ar")  # what convert pipeline / --official do: 256 px, plain bicubic
    torch.manual_seed(7)
    ours_codes = pipe(labels.tolist(), guidance_scale=scale, output_type="codes").images
    torch.manual_seed(7)
    images = pipe(labels.tolist(), guidance_scale=scale, output_type="np").images
    ours = _uint8(images)
    diff = np.abs(ours - reference)
    print(f"\nGPT over VFMTok cfg {scale}: codes equal {torch.equal(ours_codes.cpu(), codes.long().cpu())}, uint8 max "
          f"|ours - reference| {diff.max()}, mean {diff.mean():.4f}; reference image std {reference.std():.1f}")
    assert torch.equal(ours_codes.cpu(), codes.long().cpu())
    assert reference.shape == ours.shape == (2, 256, 256, 3) and reference.std() > 5
    assert diff.max() <= 1
