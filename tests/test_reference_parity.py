"""Same weights, same outputs as the public reference VFMTok code (opt-in).

Needs a checkout of CVMI-Lab/VFMTok in VFMTOK_REF_REPO, the extra packages the reference imports (omegaconf, kornia,
opencv-python-headless) importable, and ``../shared/tools/vfmtok_ref.py`` (or VFMTOK_REF_TOOL), which builds the
reference model on CPU. Importing that tool patches ``.cuda()`` to a no-op for the rest of the process, so run this
file on its own:  VFMTOK_REF_REPO=/path/to/VFMTok pytest tests/test_reference_parity.py -m "reference" -p no:cacheprovider
The reference semantic head is hard-wired to 1024-d features, so the VFM is a (random) DINOv2-L/14 with registers:
about a minute on a 2-core CPU.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from tokenizer import VFMTokModel

pytestmark = [pytest.mark.reference, pytest.mark.slow]
TOOL = Path(os.environ.get("VFMTOK_REF_TOOL", Path(__file__).resolve().parents[2] / "shared/tools/vfmtok_ref.py"))


@pytest.fixture(scope="module")
def reference_module():
    repo = os.environ.get("VFMTOK_REF_REPO")
    if not repo or not TOOL.is_file():
        pytest.skip("set VFMTOK_REF_REPO (a CVMI-Lab/VFMTok checkout) and provide vfmtok_ref.py to compare")
    sys.path.insert(0, repo)
    spec = importlib.util.spec_from_file_location("vfmtok_ref", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
    from tokenizer.convert import convert_reference_checkpoint

    ref_tool, repo = reference_module
    monkeypatch.chdir(repo)  # the reference reads configs/vit_transformer.yaml relative to its root
    torch.manual_seed(0)
    dim, depth = 64, 2
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
