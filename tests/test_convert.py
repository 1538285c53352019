"""The converter maps checkpoints laid out like the official VFMTok / VFMAE releases.

The reference key names below are written out by hand from the public reference code (CVMI-Lab/VFMTok
``vfmtok/tokenizer/vq_model.py``, ``vfmtok/core/layers.py``, ``vfmtok/core/deformable_transformer.py``; CVMI-Lab/VFMTok2
``tokenizer/vfmae``), independently of the converter's rules.
"""
import pickle
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from vfmtok.pipelines.config import build_model, load_config
from vfmtok.tokenizer.utils.errors import CheckpointError
from vfmtok.tokenizer.convert import ( convert_reference_checkpoint, convert_reference_state_dict,
                               load_reference_checkpoint)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"
WB = ("weight", "bias")


def _linear(prefix, bias=True):
    return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if bias else [])


def reference_keys(p: dict) -> list[str]:
    """Every key of the reference state dict for the model the config ``p`` describes."""
    discrete = p["bottleneck"] == "vq"
    keys = ["encode_transformer.backbone.pretrained_encoder.cls_token",  # the frozen VFM (a few of its keys)
            "encode_transformer.backbone.pretrained_encoder.blocks.0.attn.qkv.weight",
            "encode_transformer.carrier_tokens", "encode_transformer.slots_pos"]
    keys += [f"encode_transformer.norm_pre1.{s}" for s in WB]
    for i in range(len(p["vfm"]["feature_layers"])):
        keys += [f"encode_transformer.projectors.{i}.mlp.0.weight", f"encode_transformer.projectors.{i}.mlp.1.weight",
                 f"encode_transformer.projectors.{i}.mlp.1.bias", f"encode_transformer.projectors.{i}.mlp.3.weight",
                 f"encode_transformer.projectors.{i}.mlp.4.weight", f"encode_transformer.projectors.{i}.mlp.4.bias"]
        keys += [f"encode_transformer.norm_layers.{i}.{s}" for s in WB]
    for k in range(p["encoder_depth"]):
        layer = f"encode_transformer.transformer.layers.{k}"
        for name in ("cross_attn.sampling_offsets", "cross_attn.attention_weights", "cross_attn.value_proj",
                     "cross_attn.output_proj", "norm1", "norm2", "norm3", "linear1", "linear2",
                     "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            keys += _linear(f"{layer}.{name}")
    if discrete:
        keys += ["slot_quantize.codebook_used", "slot_quantize.embedding.weight"]
        keys += _linear("pre_slots_quant")
    else:
        keys += _linear("slots_quant.norm_out") + _linear("slots_quant.conv_out")
    keys += _linear("post_slots_quant")
    d = "decode_transformer"
    keys += [f"{d}.position_embedding", f"{d}.slot_position_embedding", f"{d}.mask_embedding", f"{d}.cls_token",
             f"{d}.mask_dino" if discrete else f"{d}.dino_mask"]
    if p["decoder_registers"]:
        keys.append(f"{d}.register_tokens")
    stacks = [("transformer", p["decoder_depth"])] + ([("dino_transformer", p["semantic_depth"])]
                                                      if p["semantic_depth"] else [])
    for stack, depth in stacks:
        for k in range(depth):
            for name in ("norm1", "norm2", "attn1.q_proj", "attn1.k_proj", "attn1.v_proj", "attn1.out_proj",
                         "ffnet.w12", "ffnet.w3"):
                keys += _linear(f"{d}.{stack}.layers.{k}.{name}")
    keys += _linear(f"{d}.norm_post1") + _linear(f"{d}.norm_post2") + _linear(f"{d}.proj")
    # The CNN decoder (taming / LlamaGen layout).
    keys += _linear("decoder.conv_in") + _linear("decoder.norm_out") + _linear("decoder.conv_out")
    for m in (0, 2):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            keys += _linear(f"decoder.mid.{m}.{name}")
    for name in ("norm", "q", "k", "v", "proj_out"):
        keys += _linear(f"decoder.mid.1.{name}")
    mult = list(reversed(p["pixel_channel_mult"]))
    block_in = p["pixel_channels"] * mult[0]
    for i, m in enumerate(mult):
        for j in range(p["pixel_res_blocks"]):
            block_out = p["pixel_channels"] * m
            for name in ("norm1", "conv1", "norm2", "conv2"):
                keys += _linear(f"decoder.conv_blocks.{i}.res.{j}.{name}")
            if block_in != block_out:
                keys += _linear(f"decoder.conv_blocks.{i}.res.{j}.nin_shortcut")
            block_in = block_out
        if i != len(mult) - 1:
            keys += _linear(f"decoder.conv_blocks.{i}.upsample.conv")
    return keys


def reference_state_dict(model, params, seed=0):
    """Random tensors under the reference key names, shaped like the weights they convert to."""
    g = torch.Generator().manual_seed(seed)
    names = reference_keys(params)
    converted, dropped = convert_reference_state_dict({k: torch.zeros(1) for k in names})
    target = model.state_dict()
    ours = dict(zip([k for k in names if k not in dropped], converted))
    state = {}
    for key in names:
        shape = target[ours[key]].shape if key in ours else (3,)
        state[key] = torch.randn(shape, generator=g)
    return state


@pytest.mark.parametrize("config", ["vfmtok-tiny", "vfmae-tiny"])
def test_reference_layout_converts_without_missing_or_unexpected_keys(config, tmp_path):
    params = load_config(CONFIGS / f"{config}.yaml")["params"]
    model = build_model(CONFIGS / f"{config}.yaml")
    ema = reference_state_dict(model, params, seed=1)
    checkpoint = {"model": reference_state_dict(model, params, seed=2), "ema": ema,
                  "optimizer": {"state": {}, "param_groups": []}, "steps": 100}
    torch.save(checkpoint, tmp_path / "ref.pt")
    dropped = convert_reference_checkpoint(tmp_path / "ref.pt", model)
    assert all("backbone" in k or "codebook_used" in k for k in dropped)
    # The EMA weights were loaded, renamed as documented.
    state = model.state_dict()
    assert torch.equal(state["encoder.queries"], ema["encode_transformer.carrier_tokens"])
    assert torch.equal(state["pixel_decoder.conv_out.weight"], ema["decoder.conv_out.weight"])
    assert torch.equal(state["decoder.pixel_norm.weight"], ema["decode_transformer.norm_post1.weight"])
    assert torch.equal(state["encoder.layers.0.cross_attn.sampling_offsets.weight"],
                       ema["encode_transformer.transformer.layers.0.cross_attn.sampling_offsets.weight"])
    mask_key = "decode_transformer.mask_dino" if model.is_discrete else "decode_transformer.dino_mask"
    assert torch.equal(state["decoder.semantic_mask_embedding"], ema[mask_key])
    model.load_state_dict(model.state_dict())  # everything present, strict


def test_the_model_weights_can_be_chosen_and_wrappers_are_stripped(tmp_path):
    params = load_config(CONFIGS / "vfmtok-tiny.yaml")["params"]
    model = build_model(CONFIGS / "vfmtok-tiny.yaml")
    raw = reference_state_dict(model, params, seed=5)
    wrapped = {f"module._orig_mod.{k}": v for k, v in raw.items()}
    torch.save({"model": wrapped, "ema": reference_state_dict(model, params, seed=6)}, tmp_path / "ref.pt")
    convert_reference_checkpoint(tmp_path / "ref.pt", model, prefer="model")
    assert torch.equal(model.state_dict()["encoder.queries"], raw["encode_transformer.carrier_tokens"])


def test_unpacked_xformers_swiglu_is_fused():
    w1, w2 = torch.randn(6, 4), torch.randn(6, 4)
    converted, _ = convert_reference_state_dict({
        "decode_transformer.transformer.layers.0.ffnet.w1.weight": w1,
        "decode_transformer.transformer.layers.0.ffnet.w2.weight": w2})
    assert torch.equal(converted["decoder.transformer.layers.0.ffnet.w12.weight"], torch.cat([w1, w2]))


def test_missing_unknown_and_misshaped_weights_are_errors(tmp_path):
    params = load_config(CONFIGS / "vfmtok-tiny.yaml")["params"]
    model = build_model(CONFIGS / "vfmtok-tiny.yaml")
    state = reference_state_dict(model, params)
    missing = {k: v for k, v in state.items() if k != "post_slots_quant.weight"}
    torch.save({"ema": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"post_quant_proj\.weight"):
        convert_reference_checkpoint(tmp_path / "missing.pt", model)
    torch.save({"ema": {**state, "discriminator.conv.weight": torch.zeros(1)}}, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match=r"discriminator\.conv\.weight"):
        convert_reference_checkpoint(tmp_path / "unknown.pt", model)
    torch.save({"ema": {**state, "pre_slots_quant.weight": torch.zeros(3, 3)}}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"quant_proj\.weight.*\(3, 3\)"):
        convert_reference_checkpoint(tmp_path / "shape.pt", model)


class _RunsCode:
    """A pickle that would run code when loaded (it writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_official_training_arguments_load_but_code_never_runs(tmp_path):
    path = tmp_path / "with_args.pt"
    with open(path, "wb") as f:  # exactly like the official scripts: training args pickled next to the weights
        torch.save({"model": {"x": torch.ones(1)}, "ema": {"x": torch.zeros(1)}, "optimizer": {},
                    "steps": 10, "args": Namespace(lr=1e-4, results_dir="out", image_size=256)}, f,
                   pickle_module=pickle)
    assert torch.equal(load_reference_checkpoint(path)["x"], torch.zeros(1))  # the EMA weights
    marker = tmp_path / "ran"
    torch.save({"ema": {"x": torch.zeros(1)}, "args": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"(?s)weights_only=True\) refused.*re-save just its tensors"):
        load_reference_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_checkpoint(tmp_path / "nope.pt")
