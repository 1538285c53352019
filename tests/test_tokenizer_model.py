"""VFMTokModel with both bottlenecks, built from the tiny configs (random weights, no download)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vfmtok.pipelines.config import build_model, load_config
from vfmtok.tokenizer import VFMTokModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"


@pytest.fixture(scope="module", params=["vfmtok-tiny", "vfmae-tiny"])
def model(request) -> VFMTokModel:
    torch.manual_seed(0)
    return build_model(CONFIGS / f"{request.param}.yaml")


def images_for(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, model.config.image_size, model.config.image_size, generator=g) * 2 - 1


def test_encode_decode_shapes_and_range(model):
    model.eval()
    images = images_for(model)
    tokens = model.encode(images)
    if model.is_discrete:
        assert tokens.shape == (2, model.num_tokens) and tokens.dtype == torch.long
        assert 0 <= tokens.min() and tokens.max() < model.config.codebook_size
    else:
        assert tokens.shape == (2, *model.latent_shape) and tokens.dtype == torch.float32
    decoded = model.decode(tokens)
    size = model.config.image_size
    assert decoded.shape == (2, 3, size, size)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert model.decode(tokens, output_size=32).shape == (2, 3, 32, 32)


def test_eval_forward_reconstruction_equals_encode_then_decode(model):
    """The training forward (straight-through) and the token path decode to the same image in eval mode."""
    model.eval()
    images = images_for(model)
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(out.reconstruction.clamp(-1, 1), model.decode(model.encode(images)),
                               atol=1e-5, rtol=1e-5)


def test_training_forward_returns_every_loss_and_trains_all_but_the_vfm(model):
    model.train()
    out = model(images_for(model))
    expected = {"pixel_l2", "semantic"} | ({"codebook", "commitment"} if model.is_discrete else set())
    assert set(out.losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    assert out.semantic_prediction.shape == out.semantic_target.shape
    vfm_width = model.vfm.hidden_size
    assert out.semantic_target.shape[-1] == vfm_width
    grid = model.vfm.grid[0] * model.vfm.grid[1]
    assert out.semantic_target.shape[1] == grid + (1 if model.config.semantic_cls else 0)
    model.zero_grad(set_to_none=True)
    sum(out.losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # Registers sit after every other token in a causal decoder: nothing attends to them, so they get no gradient
    # (as in the reference). Every other trainable weight must receive one.
    assert all("register_tokens" in n for n in missing), missing
    assert all(p.grad is None for p in model.vfm.parameters())
    if model.is_discrete:
        assert 0 < out.codebook_usage <= 1


def test_the_vfm_is_frozen_and_not_part_of_the_weights(model):
    vfm_params = list(model.vfm.parameters())
    assert vfm_params and not any(p.requires_grad for p in vfm_params)
    assert not any(k.startswith("vfm") or "_vfm" in k for k in model.state_dict())
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in vfm_params)
    model.train()
    assert not model.vfm.training
    info = model.describe()
    assert info["frozen_params"] == sum(p.numel() for p in vfm_params)
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters())


def test_to_moves_and_casts_the_vfm_too(model):
    model.to(torch.float64)
    try:
        assert all(p.dtype == torch.float64 for p in model.vfm.parameters())
    finally:
        model.to(torch.float32)


def _save_vfm(model, directory: Path) -> str:
    """Save the (random) VFM as a local Hugging Face model directory and return its path."""
    model.vfm.model.save_pretrained(directory)
    return str(directory)


def test_save_load_round_trip_is_bit_identical(model, tmp_path):
    """A tiny config names no VFM weights, so the folder carries the (random) VFM and loads back by itself."""
    model.eval()
    model.save_pretrained(tmp_path / "tok")
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "modeling_vfmtok.py", "vfm.safetensors"]
    saved = load_file(tmp_path / "tok" / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(model.state_dict())  # the tokenizer's weights hold no VFM weight
    assert set(load_file(tmp_path / "tok" / "vfm.safetensors")) == set(model.vfm.model.state_dict())
    images = images_for(model, seed=3)
    tokens = model.encode(images)
    for loaded in (VFMTokModel.from_pretrained(tmp_path / "tok"),  # default arguments: the bundled VFM
                   VFMTokModel.from_pretrained(tmp_path / "tok", vfm_source=_save_vfm(model, tmp_path / "vfm"))):
        loaded.eval()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert torch.equal(loaded.encode(images), tokens)
        assert torch.equal(loaded.decode(tokens), model.decode(tokens))


def test_the_vfm_is_bundled_unless_the_config_names_its_weights_by_hub_id(model, tmp_path):
    vfm_dir = _save_vfm(model, tmp_path / "vfm")
    params = {**dict(model.config), "vfm": {**model.config.vfm, "pretrained": vfm_dir}}
    named = VFMTokModel(**{k: v for k, v in params.items() if not k.startswith("_")})
    named.load_vfm_weights()  # the weights the config names, by a local path: bundled, the path not saved
    named.save_pretrained(tmp_path / "named")
    assert (tmp_path / "named" / "vfm.safetensors").is_file()
    assert json.loads((tmp_path / "named" / "config.json").read_text())["vfm"]["pretrained"] is None
    assert torch.equal(VFMTokModel.from_pretrained(tmp_path / "named").vfm.model.state_dict()["layernorm.weight"],
                       model.vfm.model.state_dict()["layernorm.weight"])
    hub = VFMTokModel(**{**params, "vfm": {**model.config.vfm, "pretrained": "facebook/dinov2-with-registers-small"}})
    hub.save_pretrained(tmp_path / "hub")  # a Hub id the config names (weights not loaded here): not bundled
    assert not (tmp_path / "hub" / "vfm.safetensors").exists()
    other = _save_vfm(model, tmp_path / "other")  # weights from elsewhere (``--vfm-weights``): bundled
    named.load_vfm_weights(other)
    named.save_pretrained(tmp_path / "override")
    assert (tmp_path / "override" / "vfm.safetensors").is_file()
    bare = {k: v for k, v in params.items() if not k.startswith("_")}
    bare["vfm"] = dict(model.config.vfm)  # no pretrained source
    VFMTokModel(**bare).save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "vfm.safetensors").unlink()
    with pytest.raises(ValueError, match="no VFM weights.*vfm.safetensors"):
        VFMTokModel.from_pretrained(tmp_path / "bare")


def test_loading_a_checkpoint_with_a_missing_weight_fails_clearly(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["encoder.queries"]
    save_file(state, weights)
    with pytest.raises(Exception, match=r"encoder\.queries"):
        VFMTokModel.from_pretrained(tmp_path, load_vfm_weights=False)


def test_loading_a_checkpoint_with_an_extra_weight_fails_clearly(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["encoder.typo"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(Exception, match=r"encoder\.typo"):
        VFMTokModel.from_pretrained(tmp_path, load_vfm_weights=False)


def test_decode_rejects_bad_tokens(model):
    if model.is_discrete:
        with pytest.raises(ValueError, match="shape"):
            model.decode(torch.zeros(1, model.num_tokens + 1, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\[0, "):
            model.decode(torch.full((1, model.num_tokens), model.config.codebook_size))
    else:
        with pytest.raises(ValueError, match="latents of shape"):
            model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(2, 1, 64, 64))


def test_invalid_config_values_are_named():
    params = load_config(CONFIGS / "vfmtok-tiny.yaml")["params"]
    with pytest.raises(ValueError, match="bottleneck"):
        VFMTokModel(**{**params, "bottleneck": "kl"})
    with pytest.raises(ValueError, match="image_size"):
        VFMTokModel(**{**params, "image_size": 72})
    with pytest.raises(ValueError, match="preset"):
        VFMTokModel(**{**params, "vfm": {"preset": "no-such-vfm"}})
    with pytest.raises(TypeError):
        VFMTokModel(**{**params, "decoder_dept": 3})


def test_config_typo_is_an_error(tmp_path):
    text = (CONFIGS / "vfmtok-tiny.yaml").read_text().replace("decoder_depth:", "decoder_dept:")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match="decoder_dept"):
        build_model(tmp_path / "bad.yaml")
