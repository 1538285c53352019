"""Same weights, same outputs as the public reference VFMTok / VFMAE code (opt-in).

Discrete VFMTok: needs a checkout of CVMI-Lab/VFMTok in VFMTOK_REF_REPO, the extra packages the reference imports
(omegaconf, kornia, opencv-python-headless) importable, and ``../shared/tools/vfmtok_ref.py`` (or VFMTOK_REF_TOOL),
which builds the reference model on CPU. Importing that tool patches ``.cuda()`` to a no-op for the rest of the
process, so run this file on its own.

Continuous VFMAE: needs a checkout of CVMI-Lab/VFMTok2 in VFMTOK2_REF_REPO (and the same extra packages). Its
top-level package is also called ``tokenizer``, so the reference runs in a subprocess (``VFMAE_REFERENCE_SCRIPT``,
with its CPU shims) that saves its weights and outputs for this process to compare with.

  PYTHONPATH=<omegaconf, kornia, cv2> VFMTOK_REF_REPO=/path/to/VFMTok VFMTOK2_REF_REPO=/path/to/VFMTok2 \
      pytest tests/test_reference_parity.py -m reference -p no:cacheprovider

The reference semantic heads are hard-wired to 1024-d features, so the VFM is a (random) DINOv2-L/14 with registers:
a few minutes on a 2-core CPU.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmtok.tokenizer import VFMTokModel
from vfmtok.tokenizer.utils.foreign import reference_vfmtok_package

pytestmark = [pytest.mark.reference, pytest.mark.slow]
TOOL = Path(os.environ.get("VFMTOK_REF_TOOL", Path(__file__).resolve().parents[2] / "shared/tools/vfmtok_ref.py"))


@pytest.fixture(scope="module")
def reference_module():
    repo = os.environ.get("VFMTOK_REF_REPO")
    if not repo or not TOOL.is_file():
        pytest.skip("set VFMTOK_REF_REPO (a CVMI-Lab/VFMTok checkout) and provide vfmtok_ref.py to compare")
    spec = importlib.util.spec_from_file_location("vfmtok_ref", TOOL)
    module = importlib.util.module_from_spec(spec)
    # timm registers torch ops on its first import, reading its caller's source through inspect, which fails on the
    # checkout's namespace package ``vfmtok`` (no __file__) in sys.modules: import it before the block
    import timm.models.layers  # noqa: F401
    import timm.models.registry  # noqa: F401
    import timm.models.vision_transformer  # noqa: F401
    with reference_vfmtok_package(repo) as modules:  # the checkout's package is also called `vfmtok`
        spec.loader.exec_module(module)
    module.reference_modules = modules  # the shimmed modules: later blocks that build the reference reuse them
    return module, repo


def our_config(dim: int, depth: int) -> dict:
    return dict(
        vfm={"preset": "dinov2-vitl14-reg", "image_size": 336, "feature_layers": [5, 11, 17, 23]},
        image_size=336, bottleneck="vq", dim=dim, query_grid=16, encoder_depth=depth, encoder_heads=8,
        encoder_points=4, encoder_ffn_dim=min(4 * dim, 1024), encoder_causal=True, codebook_size=16384, code_dim=12,
        decoder_depth=depth, decoder_heads=8, decoder_ffn_dim=(int(2048 * 2 / 3) + 7) // 8 * 8, decoder_dropout=0.0,
        decoder_causal=True, decoder_registers=4, semantic_depth=0, semantic_cls=False, pixel_channels=128,
        pixel_channel_mult=[1, 1, 2, 2, 4], pixel_res_blocks=2, upsample_factor=16)


def test_vfmtok_matches_the_reference_code(reference_module, tmp_path, monkeypatch):
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    ref_tool, repo = reference_module
    monkeypatch.chdir(repo)  # the reference reads configs/vit_transformer.yaml relative to its root
    torch.manual_seed(0)
    dim, depth = 64, 2
    with reference_vfmtok_package(repo, ref_tool.reference_modules):  # it imports its modules while building
        ref = ref_tool.build("dinov2_vitl14_reg", 1024, 336, dim=dim, depth=depth)
    for module in ref.modules():  # switch the reference decoder's attention dropout off to compare in train mode
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    with torch.no_grad():  # non-trivial sampling offsets / attention weights (their init is all zeros)
        for name, p in ref.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.normal_(0, 0.05)
    state = ref.state_dict()
    backbone = {k.split("pretrained_encoder.", 1)[1]: v for k, v in state.items() if "pretrained_encoder." in k}
    torch.save({"ema": {k: v for k, v in state.items() if "backbone" not in k}}, tmp_path / "vfmtok.pt")
    torch.save(backbone, tmp_path / "dinov2.pth")

    ours = VFMTokModel(**our_config(dim, depth))
    convert_reference_checkpoint(tmp_path / "vfmtok.pt", ours)
    ours.load_vfm_weights(str(tmp_path / "dinov2.pth"))

    images = torch.rand(2, 3, 336, 336, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref.train()
    ours.train()
    (ref_images, ref_vfm_last, ref_semantic), ref_losses, ref_indices = ref(images)
    out = ours(images)
    assert torch.equal(out.tokens.flatten(), ref_indices)
    torch.testing.assert_close(out.semantic_target, ref_vfm_last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.reconstruction, ref_images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.semantic_prediction, ref_semantic, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.losses["codebook"], ref_losses[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.losses["commitment"], ref_losses[1], atol=1e-6, rtol=1e-5)
    ref_semantic_loss = (1 - torch.nn.functional.cosine_similarity(ref_semantic, ref_vfm_last, dim=2, eps=1e-6)).mean()
    torch.testing.assert_close(out.losses["semantic"], ref_semantic_loss, atol=1e-5, rtol=1e-5)

    # Evaluation path: the reference decodes from the indices.
    ref.eval()
    ours.eval()
    with torch.no_grad():
        (ref_eval_images, _, _), _, ref_eval_indices = ref(images)
    tokens = ours.encode(images)
    assert torch.equal(tokens.flatten(), ref_eval_indices)
    torch.testing.assert_close(ours.decode(tokens), ref_eval_images.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    print("max |reconstruction - reference|:", (out.reconstruction - ref_images).abs().max().item(),
          "max |semantic - reference|:", (out.semantic_prediction - ref_semantic).abs().max().item())


# ----------------------------------------------------------------------------------------------------------------------
# VFMAE (continuous) against CVMI-Lab/VFMTok2
# ----------------------------------------------------------------------------------------------------------------------
# Run as ``python - REPO WORKDIR DIM ENCODER_DEPTH DECODER_DEPTH EMBED_DIM``: builds the reference AutoencoderAE
# ('AE-16', configs/vfmae/vfmae_config.yaml with small dims) on CPU with random weights, reads WORKDIR/images.pt and
# writes the weights (vfmae.pt as {"ema": ...} without the backbone, dinov2.pth in the official DINOv2 layout) and
# its outputs (outputs.pt). CPU shims: .cuda() is a no-op, the compiled MultiScaleDeformableAttention op is replaced
# by the repo's own pure-PyTorch core, the DINOv2 checkpoint load is skipped and the internal ``refile`` is stubbed.
VFMAE_REFERENCE_SCRIPT = r"""
import os, sys, types
repo, workdir = sys.argv[1], sys.argv[2]
dim, encoder_depth, decoder_depth, embed_dim = (int(v) for v in sys.argv[3:7])
os.environ["XFORMERS_DISABLED"] = "1"
sys.path.insert(0, repo)
import torch
from torch import nn

torch.Tensor.cuda = lambda self, *a, **k: self
nn.Module.cuda = lambda self, *a, **k: self
sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
refile = types.ModuleType("refile")
refile.smart_open = open
sys.modules["refile"] = refile
# The reference's top-level ``tokenizer`` is a namespace package: pin it, or an installed ``tokenizer`` shadows it.
package = types.ModuleType("tokenizer")
package.__path__ = [os.path.join(repo, "tokenizer")]
sys.modules["tokenizer"] = package

import commons.modules.ops.functions.ms_deform_attn_func as msf
import commons.modules.ops.modules.ms_deform_attn as msm
import commons.modules.pretrained_enc.models_pretrained_enc as mpe


class Core:
    @staticmethod
    def apply(value, shapes, level_start, sampling_locations, attention_weights, im2col_step):
        return msf.ms_deform_attn_core_pytorch(value, shapes, sampling_locations, attention_weights)


msf.MSDeformAttnFunction = msm.MSDeformAttnFunction = Core
mpe.load_pretrained_dino_v2 = lambda model, path: model

from omegaconf import OmegaConf
try:  # the checkout's layout: tokenizer/vfmae/vfmae.py (the importing process may have this suite's vfmtok)
    from tokenizer.vfmae.vfmae import AE_models
except ImportError:
    from vfmtok.tokenizer.vfmae.vfmae import AE_models

cfg = OmegaConf.load(os.path.join(repo, "configs/vfmae/vfmae_config.yaml"))
cfg.encoder_config.params.dim = dim
cfg.encoder_config.params.depth = encoder_depth
cfg.decoder_config.params.depth = decoder_depth
torch.manual_seed(0)
ref = AE_models["AE-16"](embed_dim=embed_dim, transformer_config=cfg, z_channels=dim, dropout_p=0.0)
for module in ref.modules():  # no dropout, to compare in train mode
    if isinstance(module, nn.Dropout):
        module.p = 0.0
    if isinstance(getattr(module, "dropout", None), float):
        module.dropout = 0.0
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # no weight keeps a value that would hide a mix-up (zero biases, identity norms, zero offsets)
    for name, p in ref.named_parameters():
        if "sampling_offsets" in name or "attention_weights" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        elif name.endswith(("cls_token", "register_tokens", "pos_embed")) and "pretrained_encoder" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.ndim == 1:  # biases, norm and layer-scale weights
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
state = ref.state_dict()
torch.save({"ema": {k: v for k, v in state.items() if "backbone" not in k}}, os.path.join(workdir, "vfmae.pt"))
torch.save({k.split("pretrained_encoder.", 1)[1]: v for k, v in state.items() if "pretrained_encoder." in k},
           os.path.join(workdir, "dinov2.pth"))

images = torch.load(os.path.join(workdir, "images.pt"))
ref.train()
(reconstruction, semantic_target, semantic_prediction), posterior = ref(images)
ref.eval()
with torch.no_grad():
    latents = ref.encode_imgs(images)
    decoded, eval_semantic = ref.decode(latents)
assert eval_semantic is None
torch.save({"reconstruction": reconstruction.detach(), "semantic_target": semantic_target.detach(),
            "semantic_prediction": semantic_prediction.detach(), "posterior": posterior.detach(),
            "latents": latents, "decoded": decoded}, os.path.join(workdir, "outputs.pt"))
"""


def vfmae_config(dim: int, encoder_depth: int, decoder_depth: int, embed_dim: int) -> dict:
    """configs/tokenizer/vfmae-l.yaml with the small dims of the reference built by VFMAE_REFERENCE_SCRIPT."""
    return dict(
        vfm={"preset": "dinov2-vitl14-reg", "image_size": 224, "feature_layers": [5, 11, 17, 23], "resize": "kornia"},
        image_size=256, bottleneck="continuous", dim=dim, query_grid=16, encoder_depth=encoder_depth, encoder_heads=8,
        encoder_points=4, encoder_ffn_dim=min(4 * dim, 1024), encoder_causal=False, add_cls_to_levels=True,
        latent_channels=embed_dim, decoder_depth=decoder_depth, decoder_heads=8,
        decoder_ffn_dim=(int(2048 * 2 / 3) + 7) // 8 * 8, decoder_dropout=0.0, decoder_causal=False,
        decoder_registers=0, semantic_depth=1, semantic_cls=True, pixel_channels=128,
        pixel_channel_mult=[1, 1, 2, 2, 4], pixel_res_blocks=3, upsample_factor=16)


def test_vfmae_matches_the_reference_code(tmp_path):
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    repo = os.environ.get("VFMTOK2_REF_REPO")
    if not repo:
        pytest.skip("set VFMTOK2_REF_REPO (a CVMI-Lab/VFMTok2 checkout) to compare the VFMAE with its reference code")
    dim, encoder_depth, decoder_depth, embed_dim = 64, 2, 2, 32
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.save(images, tmp_path / "images.pt")
    run = subprocess.run([sys.executable, "-", repo, str(tmp_path), str(dim), str(encoder_depth), str(decoder_depth),
                          str(embed_dim)], input=VFMAE_REFERENCE_SCRIPT, text=True, capture_output=True, cwd=repo,
                         timeout=1200)
    assert run.returncode == 0, f"the reference VFMAE failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    ref = torch.load(tmp_path / "outputs.pt", weights_only=True)

    ours = VFMTokModel(**vfmae_config(dim, encoder_depth, decoder_depth, embed_dim))
    dropped = convert_reference_checkpoint(tmp_path / "vfmae.pt", ours)
    assert dropped == []
    ours.load_vfm_weights(str(tmp_path / "dinov2.pth"))

    ours.train()
    out = ours(images)
    diffs = {}

    def check(name, actual, expected, tol=1e-4):
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        diffs[name] = (actual - expected).abs().max().item()
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")

    check("semantic target", out.semantic_target, ref["semantic_target"])
    check("latent (train)", out.tokens, ref["posterior"].reshape(out.tokens.shape))
    check("reconstruction", out.reconstruction, ref["reconstruction"])
    check("semantic prediction", out.semantic_prediction, ref["semantic_prediction"])

    ours.eval()
    check("latent (encode)", ours.encode(images), ref["latents"])
    check("decode", ours.decode(ref["latents"]), ref["decoded"].clamp(-1, 1))
    print("\nVFMAE vs reference, max abs diff:", ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


# ----------------------------------------------------------------------------------------------------------------------
# RAR over VFMTok (CVMI-Lab/VFMTok-RAR): the converted pipeline against test_net.py's path
# ----------------------------------------------------------------------------------------------------------------------
def test_rar_pipeline_images_match_the_reference_test_net_path(reference_module, tmp_path, monkeypatch):
    """VFMTOK_REF_REPO must be a CVMI-Lab/VFMTok-RAR checkout (its own vfmtok/tokenizer/vq_model.py and
    modeling/rar.py); with PYTHONPATH pointing at this worktree give the checkout's ``vfmtok/`` an empty
    ``__init__.py`` (a namespace package would lose to ours on the path). Same random weights, labels and greedy decoding (the reference's multinomial draw becomes the
    argmax): test_net.py's ``generator.generate`` + ``tokenizer.decode_tokens`` + uint8, against
    ``convert_rar_release`` + ``pipe(...)`` + the benchmark's uint8 conversion, at the tokenizer's own size."""
    import yaml
    from safetensors.torch import save_file
    from rar_reference import reference_rar
    from vfmtok.pipelines.convert import convert_rar_release

    _, repo = reference_module
    if not (Path(repo) / "modeling" / "rar.py").is_file():
        pytest.skip("VFMTOK_REF_REPO is not a CVMI-Lab/VFMTok-RAR checkout (no modeling/rar.py)")
    monkeypatch.chdir(repo)
    torch.manual_seed(0)
    dim, depth = 64, 2
    with reference_vfmtok_package(repo):  # the reference instantiates its modules by name while building: load the
        spec = importlib.util.spec_from_file_location("vfmtok_ref_rar", TOOL)  # tool (and its CPU shims) again here
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        ref = tool.build("dinov2_vitl14_reg", 1024, 336, dim=dim, depth=depth).eval()
    with torch.no_grad():  # non-trivial sampling offsets / attention weights (their init is all zeros)
        for name, p in ref.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.normal_(0, 0.05)
    state = ref.state_dict()
    backbone = {k.split("pretrained_encoder.", 1)[1]: v for k, v in state.items() if "pretrained_encoder." in k}
    torch.save({"ema": {k: v for k, v in state.items() if "backbone" not in k}}, tmp_path / "vfmtok-tokenizer.pt")
    torch.save(backbone, tmp_path / "dinov2.pth")
    sizes = dict(vocab_size=16384, num_tokens=256, num_classes=1000, dim=64, depth=2, num_heads=4,
                 intermediate_size=256)
    ref_rar = reference_rar(repo, **sizes).eval()
    with torch.no_grad():
        for p in ref_rar.parameters():
            p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in ref_rar.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump({"model": "VFMTokModel", "params": our_config(dim, depth)}))
    (tmp_path / "rar.yaml").write_text(yaml.safe_dump({"model": "RARModel", "params": sizes}))
    pipe = convert_rar_release("RAR-L-ultra", tmp_path / "vfmtok-tokenizer.pt", tmp_path / "model.safetensors",
                               tokenizer_config=str(tmp_path / "tok.yaml"), generator_config=str(tmp_path / "rar.yaml"))
    pipe.vqvae.load_vfm_weights(str(tmp_path / "dinov2.pth"))
    # The RAR repo's own tokenizer (vq_model.py differs from CVMI-Lab/VFMTok's only by added methods): same codes
    # and reconstructions as the converted one.
    images = torch.rand(2, 3, 336, 336, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        (ref_images, _, _), _, ref_indices = ref(images)
        codes = pipe.vqvae.encode(images)
        assert torch.equal(codes.flatten(), ref_indices)
        tokenizer_delta = (pipe.vqvae.decode(codes) - ref_images.clamp(-1, 1)).abs().max().item()
    assert tokenizer_delta < 1e-4
    labels = torch.tensor([207, 3])
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(torch, "multinomial", lambda probs, num_samples, **_: probs.argmax(dim=-1, keepdim=True))
        tokens = ref_rar.generate(labels, guidance_scale=16.0, randomize_temperature=1.0, guidance_scale_pow=2.75)
        # test_net.py: sample_fn -> tokenizer.decode_tokens(tokens) (tgt_size 256), then clamp and uint8
        theirs = torch.clamp(ref.decode_tokens(tokens.view(2, -1)), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
        theirs_336 = torch.clamp(ref.decode_tokens(tokens.view(2, -1), tgt_size=336), 0, 255)
        theirs_336 = theirs_336.permute(0, 2, 3, 1).to(torch.uint8).numpy().astype(int)
    assert pipe.config.resize_antialias is False and pipe.config.default_output_size == 256

    def uint8(images):  # the benchmark's conversion
        return np.round(np.clip(images, 0, 1) * 255).astype(int)

    ours = uint8(pipe(labels.tolist(), top_k=1, output_type="np", output_size=256).images)
    ours_336 = uint8(pipe(labels.tolist(), top_k=1, output_type="np").images)
    delta = np.abs(ours - theirs.numpy().astype(int))
    delta_336 = np.abs(ours_336 - theirs_336).max()
    pipe.set_resize_protocol(antialias=True, output_size=256)
    antialiased = np.abs(uint8(pipe(labels.tolist(), top_k=1, output_type="np", output_size=256).images)
                         - theirs.numpy().astype(int))
    print(f"\nRAR repo tokenizer: max |decode - reference| {tokenizer_delta:.2e}. RAR pipeline vs test_net.py "
          f"path: max |uint8 difference| {delta.max()} at 256 px (mean {delta.mean():.4f}), {delta_336} at 336 px; "
          f"with the tokenizer's antialiased resize instead: max {antialiased.max()}, mean {antialiased.mean():.3f}")
    assert len(tokens.unique()) > 16 and delta.max() <= 1 and delta_336 <= 1
