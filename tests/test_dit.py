"""Tests for generators/dit.py (DiT / SiT / LightningDiT / DiT^DH denoiser), generators/convert_dit.py and
configs/flow/."""
import os
import sys
from pathlib import Path

import pytest
import torch

from vfmtok.generators.convert_dit import convert_ddt_checkpoint, convert_ddt_state_dict, load_converted_state_dict
from vfmtok.generators.dit import DiTModel, sincos_2d_pos_embed
from vfmtok.generators.layers import apply_rotary_embedding, rope_2d_table
from vfmtok.pipelines.config import build_model, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "flow"
TINY = dict(in_channels=8, latent_size=4, patch_size=1, dim=64, depth=2, num_heads=4, num_classes=10)


def _randomise_zero_init(model: DiTModel) -> None:
    """Give the zero-initialised modulation / final layers random weights (to test the rest of the network)."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "final_layer" in name:
            p.data.normal_(std=0.05)


def _inputs(model: DiTModel, batch: int = 3):
    c = model.config
    return (torch.randn(batch, c.in_channels, c.latent_size, c.latent_size), torch.rand(batch),
            torch.randint(0, c.num_classes, (batch,)))


VARIANTS = [
    dict(),
    dict(patch_size=2),
    dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, rope=True),
    dict(rope=True, pos_embed="none", patch_size=2),
    dict(norm="rmsnorm", mlp="swiglu", rope=True, head_width=96, head_depth=2),
    dict(patch_size=2, head_width=96, head_depth=1, head_patch_size=1, rope=True),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_shape_and_zero_output_at_init(variant):
    torch.manual_seed(0)
    model = DiTModel(**{**TINY, **variant}).eval()
    x, t, y = _inputs(model)
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zero final layer
    _randomise_zero_init(model)
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0
    out.square().mean().backward()
    assert model.x_embedder.weight.grad is not None and model.x_embedder.weight.grad.abs().max() > 0


def test_adaln_zero_gates_make_blocks_identity():
    torch.manual_seed(0)
    model = DiTModel(**TINY).eval()
    x = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    block = model.blocks[0]
    assert torch.equal(block(x, c, None), x)  # zero gates: the block is the identity at init
    # Non-zero shift/scale but zero gates: still the identity.
    with torch.no_grad():
        block.adaLN_modulation[-1].bias[: 2 * 64].normal_()
        block.adaLN_modulation[-1].bias[3 * 64: 5 * 64].normal_()
    assert torch.equal(block(x, c, None), x)
    with torch.no_grad():
        block.adaLN_modulation[-1].bias[2 * 64: 3 * 64].fill_(1.0)  # open the attention gate
    assert not torch.allclose(block(x, c, None), x)


def test_time_and_class_condition_the_output():
    torch.manual_seed(0)
    model = DiTModel(**TINY).eval()
    _randomise_zero_init(model)
    x, t, y = _inputs(model, 2)
    base = model(x, t, y)
    assert not torch.allclose(base, model(x, t + 0.3, y))
    assert not torch.allclose(base, model(x, t, (y + 1) % 10))
    # Samples do not interact (no cross-batch leakage).
    assert torch.allclose(model(x[:1], t[:1], y[:1]), base[:1], atol=1e-5)


def test_label_dropout_rate_null_class_and_force_drop():
    model = DiTModel(**TINY, class_dropout_prob=0.25)
    assert model.class_embedding.num_embeddings == 11 and model.null_class == 10
    labels = torch.randint(0, 10, (20000,))
    model.train()
    torch.manual_seed(0)
    dropped = model.drop_labels(labels)
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.25) < 0.015
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    model.eval()
    assert torch.equal(model.drop_labels(labels), labels)  # no dropout in eval
    force = torch.zeros(20000, dtype=torch.bool)
    force[:5] = True
    for mode in (model.train, model.eval):
        mode()
        forced = model.drop_labels(labels, force)
        assert (forced[:5] == 10).all() and torch.equal(forced[5:], labels[5:])
    # The null class is accepted as an input and equals forcing the drop.
    model.eval()
    _randomise_zero_init(model)
    x, t, y = _inputs(model, 2)
    assert torch.allclose(model(x, t, torch.full_like(y, 10)), model(x, t, y, force_drop_ids=torch.ones(2)))


def test_training_dropout_uses_torch_rng():
    model = DiTModel(**TINY, class_dropout_prob=0.5).train()
    _randomise_zero_init(model)
    x, t, y = _inputs(model, 8)
    torch.manual_seed(3)
    a = model(x, t, y)
    torch.manual_seed(3)
    assert torch.equal(a, model(x, t, y))


def test_rope_relative_position_property():
    head_dim, grid = 16, 6
    table = rope_2d_table(grid, head_dim)[1:]  # (grid*grid, head_dim/2, 2), as DiTModel uses it
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(pq, pk):
        iq, ik = pq[0] * grid + pq[1], pk[0] * grid + pk[1]
        return (apply_rotary_embedding(q, table[iq:iq + 1]) * apply_rotary_embedding(k, table[ik:ik + 1])).sum()

    ref = score((1, 2), (3, 1))
    for shift in ((1, 0), (0, 2), (2, 3)):
        moved = score((1 + shift[0], 2 + shift[1]), (3 + shift[0], 1 + shift[1]))
        assert torch.allclose(ref, moved, atol=1e-5)
    assert not torch.allclose(ref, score((1, 2), (1, 3)), atol=1e-3)


def test_rope_tables_per_trunk_and_head():
    a = DiTModel(**TINY, rope=True, pos_embed="none", head_width=96, head_depth=1, head_num_heads=2)
    assert a.pos_table.numel() == 0
    assert a.rope_table.shape == (16, 64 // 4 // 2, 2)  # trunk head_dim 16
    assert a.head_rope_table.shape == (16, 96 // 2 // 2, 2)  # head head_dim 48
    assert DiTModel(**TINY).rope_table.numel() == 0


def _count(params) -> int:
    with torch.device("meta"):
        model = DiTModel(**params)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published, exact", [
    ("sit-b-2.yaml", 130e6, 130_303_504),
    ("sit-l-2.yaml", 458e6, 457_824_272),
    ("sit-xl-2.yaml", 675e6, 674_816_272),
    ("ditdh-xl.yaml", 839e6, 834_517_364),  # see the yaml comment for the 839M bookkeeping
])
def test_config_parameter_counts(name, published, exact):
    params = load_config(CONFIGS / name)["params"]
    n = _count(params)
    assert n == exact
    assert abs(n - published) / published < 0.02


def test_count_matches_dit_xl2_published_bookkeeping():
    # DiT-XL/2 (learn_sigma, pos_embed as a frozen parameter): 675,129,632.
    ours = _count(load_config(CONFIGS / "sit-xl-2.yaml")["params"])
    assert ours + 256 * 1152 + (1152 * 16 + 16) == 675_129_632
    # At 32 x 16 x 16 (patch 2: 64 tokens), as stated in the yaml comment.
    params = {**load_config(CONFIGS / "sit-xl-2.yaml")["params"], "in_channels": 32, "latent_size": 16}
    assert _count(params) == 675_074_432


def test_tiny_config_builds_and_describes():
    model = build_model(CONFIGS / "dit-tiny.yaml").eval()
    info = model.describe()
    assert info["latent_shape"] == [8, 4, 4]  # configs/tokenizer/vfmae-tiny.yaml's latent
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["head"]["width"] == 96 and info["null_class"] == 1000
    x = torch.randn(2, 8, 4, 4)
    assert model(x, torch.rand(2), torch.tensor([0, 999])).shape == x.shape


def test_strict_loading_errors():
    model = DiTModel(**TINY)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "class_embedding.weight"}
    with pytest.raises(ValueError, match="class_embedding.weight"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match="extra.weight"):
        model.load_state_dict({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="x_embedder.weight"):
        model.load_state_dict({**state, "x_embedder.weight": torch.zeros(1, 2, 3, 4)})
    model.load_state_dict(missing, strict=False)  # non-strict is allowed
    assert "pos_table" not in state and "rope_table" not in state  # fixed tables are not weights


def test_invalid_inputs_and_config():
    model = DiTModel(**TINY).eval()
    x, t, y = _inputs(model, 2)
    with pytest.raises(ValueError, match="latents"):
        model(x[:, :4], t, y)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="outside"):
        model(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="norm"):
        DiTModel(**{**TINY, "norm": "batchnorm"})
    with pytest.raises(ValueError, match="divisible"):
        DiTModel(**{**TINY, "patch_size": 3})


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DiTModel(**TINY, rope=True, head_width=96, head_depth=1).eval()
    _randomise_zero_init(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiTModel.from_pretrained(tmp_path).eval()
    x, t, y = _inputs(model, 2)
    assert torch.equal(model(x, t, y), loaded(x, t, y))
    other = tmp_path / "other"
    DiTModel(**{**TINY, "depth": 1}).save_pretrained(other)
    import json
    config = json.loads((other / "config.json").read_text())
    config["depth"] = 2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="blocks.1"):
        DiTModel.from_pretrained(other)


def test_half_precision_keeps_fp32_tables():
    model = DiTModel(**TINY, rope=True).to(torch.bfloat16)
    assert model.pos_table.dtype == torch.float32 and model.rope_table.dtype == torch.float32
    x, t, y = _inputs(model, 2)
    assert model(x.bfloat16(), t, y).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------------
# Reference-exact options and the DiT^DH (VFMTok2 / RAE DiTwDDTHead) converter
# ----------------------------------------------------------------------------------------------------------------------
# A tiny DiT^DH laid out like configs/flow/ditdh-xl.yaml (reference options on).
DDT_TINY = dict(in_channels=8, latent_size=4, patch_size=1, num_classes=10, dim=64, depth=2, num_heads=4,
                norm="rmsnorm", mlp="swiglu", rope=True, pos_embed="sincos", head_width=96, head_depth=1,
                head_num_heads=4, head_patch_size=1, time_embedding="gaussian_fourier", condition_silu=True,
                reverse_time=True)


def _randomise_all(model: DiTModel, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "adaLN" in name or "final" in name:
                p.normal_(std=0.05)
            else:
                p.add_(0.1 * torch.randn_like(p))


def test_default_options_are_backward_compatible():
    model = DiTModel(**TINY)
    assert model.config.time_embedding == "sinusoidal" and not model.config.condition_silu
    assert not model.config.reverse_time
    assert model.t_embedder.mlp[0].in_features == 256 and "t_embedder.frequencies" not in model.state_dict()
    with pytest.raises(ValueError, match="time_embedding"):
        DiTModel(**TINY, time_embedding="learned")


def test_gaussian_fourier_time_embedding_is_saved(tmp_path):
    torch.manual_seed(0)
    model = DiTModel(**DDT_TINY).eval()
    freqs = model.t_embedder.frequencies
    assert freqs.shape == (256,) and model.t_embedder.mlp[0].in_features == 512
    assert "t_embedder.frequencies" in model.state_dict()
    assert all(p is not freqs for p in model.parameters())  # not trained, not counted
    t = torch.tensor([0.25])
    emb = torch.cat([torch.sin(2 * torch.pi * 0.25 * freqs), torch.cos(2 * torch.pi * 0.25 * freqs)])
    assert torch.allclose(model.t_embedder(t), model.t_embedder.mlp(emb[None]), atol=1e-6)
    _randomise_all(model)
    model.save_pretrained(tmp_path)
    loaded = DiTModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.t_embedder.frequencies, freqs)
    x, t, y = _inputs(model, 2)
    assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_reverse_time_and_condition_silu():
    torch.manual_seed(0)
    base = DiTModel(**{**DDT_TINY, "reverse_time": False}).eval()
    _randomise_all(base)
    flipped = DiTModel(**DDT_TINY).eval()
    flipped.load_state_dict(base.state_dict())
    x, t, y = _inputs(base, 3)
    assert torch.allclose(flipped(x, t, y), -base(x, 1 - t, y), atol=1e-5)
    no_silu = DiTModel(**{**DDT_TINY, "condition_silu": False}).eval()
    no_silu.load_state_dict(base.state_dict())
    assert (no_silu(x, t, y) - flipped(x, t, y)).abs().max() > 1e-5


def _reference_layout(model: DiTModel) -> dict:
    """``model``'s weights under DiTwDDTHead's key names (written from denoise/models/DDT.py and model_utils.py)."""
    ours = model.state_dict()
    depth, head_depth = model.config.depth, model.config.head_depth
    ref = {
        "s_embedder.proj.weight": ours["x_embedder.weight"], "s_embedder.proj.bias": ours["x_embedder.bias"],
        "x_embedder.proj.weight": ours["head_embedder.weight"], "x_embedder.proj.bias": ours["head_embedder.bias"],
        "s_projector.weight": ours["head_projection.weight"], "s_projector.bias": ours["head_projection.bias"],
        "t_embedder.W": ours["t_embedder.frequencies"],
        "y_embedder.embedding_table.weight": ours["class_embedding.weight"],
    }
    for i in (0, 2):
        for kind in ("weight", "bias"):
            ref[f"t_embedder.mlp.{i}.{kind}"] = ours[f"t_embedder.mlp.{i}.{kind}"]
    for name in ("norm_final.weight", "linear.weight", "linear.bias", "adaLN_modulation.1.weight",
                 "adaLN_modulation.1.bias"):
        ref[f"final_layer.{name}"] = ours[f"final_layer.{name}"]
    inner = ["norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias", "adaLN_modulation.1.weight",
             "adaLN_modulation.1.bias"]
    for i in range(depth + head_depth):
        for name in inner:
            ref[f"blocks.{i}.{name}"] = ours[f"blocks.{i}.{name}" if i < depth else f"head_blocks.{i - depth}.{name}"]
    # Fixed tables: pos_embed (1, N, dim); EVA RoPE buffers (N, head_dim), each angle repeated over a channel pair.
    ref["pos_embed"] = sincos_2d_pos_embed(model.config.dim, model.grid_size)[None]
    for prefix, table in (("enc", model.rope_table), ("dec", model.head_rope_table)):
        ref[f"{prefix}_feat_rope.freqs_cos"] = table[..., 0].repeat_interleave(2, dim=-1)
        ref[f"{prefix}_feat_rope.freqs_sin"] = table[..., 1].repeat_interleave(2, dim=-1)
    return ref


def test_convert_ddt_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DiTModel(**DDT_TINY).eval()
    _randomise_all(model)
    ref = _reference_layout(model)
    converted, dropped = convert_ddt_state_dict({f"module._orig_mod.{k}": v for k, v in ref.items()})
    assert sorted(dropped) == sorted(["module._orig_mod.pos_embed"] + [
        f"module._orig_mod.{p}_feat_rope.freqs_{f}" for p in ("enc", "dec") for f in ("cos", "sin")])
    # The released checkpoints keep the latent statistics in a separate file: everything else round-trips.
    ours = {k: v for k, v in model.state_dict().items() if k not in ("latent_mean", "latent_std")}
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    fresh = DiTModel(**DDT_TINY).eval()
    path = tmp_path / "ddt.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ref.items()}, "ema": ref, "steps": 1}, path)
    assert len(convert_ddt_checkpoint(path, fresh)) == 5  # prefer="ema"
    x, t, y = _inputs(model, 2)
    assert torch.equal(fresh(x, t, y), model(x, t, y))
    assert torch.equal(fresh.latent_mean, torch.zeros(fresh.latent_shape))  # identity without a statistics file
    # With the release's statistics (RAE's layout: mean and var with a batch axis), they become the model's state.
    mean, var = torch.randn(1, *fresh.latent_shape), torch.rand(1, *fresh.latent_shape) + 0.5
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    with_stats = DiTModel(**DDT_TINY).eval()
    convert_ddt_checkpoint(path, with_stats, latent_stats=tmp_path / "stat.pt", stats_convention="rae")
    torch.testing.assert_close(with_stats.latent_mean, mean[0])
    torch.testing.assert_close(with_stats.latent_std, var[0].sqrt())


def _vfmtok2_stats_file(path: Path, channels: int = 8, side: int = 4, seed: int = 0):
    """A file laid out exactly like VFMTok2's stats/stats-500.pt (its tokenizer/utils/compute_stats.py):
    ``torch.save({'mean': ndarray, 'var': ndarray})`` with float32 numpy arrays of shape (C, h*w)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(channels, side * side)).astype(np.float32)
    var = (rng.random(size=(channels, side * side)) * 0.3 + 0.2).astype(np.float32)
    torch.save({"mean": mean, "var": var}, path)
    return mean, var


def test_vfmtok2_statistics_load_safely_and_denormalise_with_the_release_arithmetic(tmp_path):
    """VFMTok2 trains on (x - mean) / (var + 1e-5) and decodes x * (var + 1e-5) + mean, with mean / var read by
    ``torch.tensor(stats[k])`` and ``rearrange('c (h w) -> c h w')`` (train_c2i.py, test_c2i.py)."""
    mean_np, var_np = _vfmtok2_stats_file(tmp_path / "stats-500.pt")
    model = DiTModel(**DDT_TINY).eval()
    path = tmp_path / "ddt.pt"
    torch.save({"ema": _reference_layout(model)}, path)
    convert_ddt_checkpoint(path, model, latent_stats=tmp_path / "stats-500.pt")  # the release's convention
    mean = torch.tensor(mean_np).reshape(8, 4, 4)[None]  # the reference formula, written out here
    var = torch.tensor(var_np).reshape(8, 4, 4)[None]
    samples = torch.randn(3, 8, 4, 4)
    assert torch.equal(model.denormalize_latents(samples), samples * (var + 1e-5) + mean)
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(model.normalize_latents(x), (x - mean) / (var + 1e-5), rtol=1e-6, atol=1e-6)
    # the square root of the variance (RAE's convention) would be a different model
    assert not torch.allclose(model.latent_std, var[0].sqrt(), atol=1e-3)


def test_statistics_files_that_could_run_code_or_hold_objects_are_refused(tmp_path):
    import os as os_module

    import numpy as np

    from vfmtok.generators.convert_dit import read_latent_statistics
    from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError

    class Payload:
        def __reduce__(self):
            return os_module.system, ("echo pwned > " + str(tmp_path / "ran"),)

    torch.save({"mean": np.zeros((8, 16), np.float32), "var": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        read_latent_statistics(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
    torch.save({"mean": np.zeros((8, 16), np.float32), "var": np.array([object()] * 128).reshape(8, 16)},
               tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match="objects.pt"):
        read_latent_statistics(tmp_path / "objects.pt")
    torch.save({"mean": np.zeros((8, 15), np.float32), "var": np.ones((8, 15), np.float32)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="square"):
        read_latent_statistics(tmp_path / "odd.pt")
    with pytest.raises(InvalidValueError, match="convention"):
        read_latent_statistics(tmp_path / "odd.pt", convention="sqrt")


def test_convert_ddt_state_dict_errors():
    model = DiTModel(**DDT_TINY)
    ref = _reference_layout(model)
    with pytest.raises(ValueError, match="y_embedder.extra"):
        convert_ddt_state_dict({**ref, "y_embedder.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="pos_embed"):
        convert_ddt_state_dict({**ref, "pos_embed": ref["pos_embed"] + 0.1})
    with pytest.raises(ValueError, match="enc_feat_rope.freqs_cos"):
        convert_ddt_state_dict({**ref, "enc_feat_rope.freqs_cos": ref["enc_feat_rope.freqs_cos"].flip(0)})
    equal_widths = {k: v for k, v in ref.items() if not k.startswith("s_projector")}
    with pytest.raises(ValueError, match="depth="):
        convert_ddt_state_dict(equal_widths)
    converted, _ = convert_ddt_state_dict(equal_widths, depth=2)
    assert "head_blocks.0.attn.qkv.weight" in converted and "blocks.2.attn.qkv.weight" not in converted
    # A model with a different number of classes: a strict, named shape error.
    with pytest.raises(ValueError, match="class_embedding.weight"):
        DiTModel(**{**DDT_TINY, "num_classes": 12}).load_state_dict(convert_ddt_state_dict(ref)[0])


@pytest.mark.reference
@pytest.mark.skipif(not os.environ.get("VFMTOK2_REF_REPO"), reason="set VFMTOK2_REF_REPO to a VFMTok2 checkout")
def test_parity_with_reference_ditwddthead():
    """Reference DiTwDDTHead (random weights) -> convert -> DiTModel: same velocity for the same (x, t, y)."""
    repo = os.environ["VFMTOK2_REF_REPO"]
    sys.path.insert(0, repo)
    try:
        from denoise.models.DDT import DiTwDDTHead
    finally:
        sys.path.remove(repo)
    torch.manual_seed(0)
    ref = DiTwDDTHead(input_size=4, patch_size=1, in_channels=8, hidden_size=[64, 96], depth=[2, 1],
                      num_heads=[4, 4], mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, use_qknorm=False,
                      use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True).eval()
    with torch.no_grad():  # leave no zero-initialised layer: every path must carry signal
        for name, p in ref.named_parameters():
            if name not in ("pos_embed", "t_embedder.W"):
                p.normal_(std=0.1) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    model = DiTModel(**DDT_TINY).eval()
    converted, dropped = convert_ddt_state_dict(ref.state_dict())
    load_converted_state_dict(model, converted)  # no statistics in the checkpoint: the model keeps the identity
    assert "pos_embed" in dropped
    x = torch.randn(4, 8, 4, 4)
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])
    y = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    with torch.no_grad():
        expected = ref(x, t, y)  # reference convention: t = 1 is noise, velocity = noise - data
        ours_raw = DiTModel(**{**DDT_TINY, "reverse_time": False}).eval()
        load_converted_state_dict(ours_raw, converted)
        raw = ours_raw(x, t, y)
        got = model(x, 1 - t, y)  # this project's convention
    assert expected.abs().max() > 0.1
    print(f"parity max |diff|: raw {(raw - expected).abs().max().item():.3e}, "
          f"reversed {(got + expected).abs().max().item():.3e} (scale {expected.abs().max().item():.3f})")
    assert torch.allclose(raw, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got, -expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# LightningDiT (VFMTok2 denoise/models/lightningDiT.py): a head-less DiTModel
# ----------------------------------------------------------------------------------------------------------------------
LIGHTNING_TINY = {**{k: v for k, v in DDT_TINY.items() if not k.startswith("head_")}, "condition_silu": False}


def _lightning_layout(model: DiTModel) -> dict:
    """``model``'s weights under LightningDiT's key names (written from denoise/models/lightningDiT.py)."""
    ours = model.state_dict()
    ref = {"x_embedder.proj.weight": ours["x_embedder.weight"], "x_embedder.proj.bias": ours["x_embedder.bias"],
           "t_embedder.W": ours["t_embedder.frequencies"],
           "y_embedder.embedding_table.weight": ours["class_embedding.weight"],
           "pos_embed": sincos_2d_pos_embed(model.config.dim, model.grid_size)[None],
           "feat_rope.freqs_cos": model.rope_table[..., 0].repeat_interleave(2, dim=-1),
           "feat_rope.freqs_sin": model.rope_table[..., 1].repeat_interleave(2, dim=-1)}
    for key, tensor in ours.items():
        if key.startswith(("t_embedder.mlp.", "blocks.", "final_layer.")):
            ref[key] = tensor
    return ref


def test_lightningdit_configs_build_and_convert_from_the_release_layout(tmp_path):
    from vfmtok.generators.convert_dit import convert_lightningdit_checkpoint

    for size, (dim, depth) in {"b": (768, 12), "l": (1024, 24), "xl": (1152, 28)}.items():
        params = load_config(CONFIGS / f"lightningdit-{size}.yaml")["params"]
        assert (params["dim"], params["depth"], params["head_depth"] if "head_depth" in params else 0) == (dim, depth, 0)
        assert params["condition_silu"] is False and params["reverse_time"] is True
    torch.manual_seed(0)
    model = build_model(CONFIGS / "lightningdit-tiny.yaml").eval()
    _randomise_all(model)
    path = tmp_path / "lightning.pt"
    torch.save({"model": {}, "ema": {f"module.{k}": v for k, v in _lightning_layout(model).items()}}, path)
    fresh = build_model(CONFIGS / "lightningdit-tiny.yaml").eval()
    dropped = convert_lightningdit_checkpoint(path, fresh)
    assert sorted(dropped) == ["module.feat_rope.freqs_cos", "module.feat_rope.freqs_sin", "module.pos_embed"]
    x, t, y = _inputs(model, 3)
    assert torch.equal(fresh(x, t, y), model(x, t, y))
    # a DiT^DH checkpoint or model is refused, naming what is wrong
    ddt = DiTModel(**DDT_TINY)
    torch.save({"ema": _reference_layout(ddt)}, tmp_path / "ddt.pt")
    with pytest.raises(ValueError, match="s_embedder"):
        convert_lightningdit_checkpoint(tmp_path / "ddt.pt", build_model(CONFIGS / "lightningdit-tiny.yaml"))
    with pytest.raises(ValueError, match="head_depth=1"):
        convert_lightningdit_checkpoint(path, ddt)


def _reference_lightningdit(repo: str):
    sys.path.insert(0, repo)
    try:
        from denoise.models.lightningDiT import LightningDiT
    finally:
        sys.path.remove(repo)
    torch.manual_seed(0)
    ref = LightningDiT(input_size=4, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4,
                       mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10).eval()
    with torch.no_grad():  # no zero-initialised layer left: every path carries signal
        for name, p in ref.named_parameters():
            if name not in ("pos_embed", "t_embedder.W"):
                p.normal_(std=0.1) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.mark.reference
@pytest.mark.skipif(not os.environ.get("VFMTOK2_REF_REPO"), reason="set VFMTOK2_REF_REPO to a VFMTok2 checkout")
def test_parity_with_reference_lightningdit_velocity_and_euler_trajectory():
    """Reference LightningDiT (random weights) -> convert -> DiTModel: the same velocity (<= 1e-5, fp32) and the same
    Euler trajectory as the reference's own ODE sampler (VFMTok2 transport, shift 4, 100 grid points)."""
    from vfmtok.generators.convert_dit import convert_lightningdit_state_dict, load_converted_state_dict

    repo = os.environ["VFMTOK2_REF_REPO"]
    ref = _reference_lightningdit(repo)
    model = DiTModel(**{**LIGHTNING_TINY, "latent_size": 4}).eval()
    converted, dropped = convert_lightningdit_state_dict(ref.state_dict())
    load_converted_state_dict(model, converted)
    assert sorted(dropped) == ["feat_rope.freqs_cos", "feat_rope.freqs_sin", "pos_embed"]
    x = torch.randn(4, 8, 4, 4)
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])
    y = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    with torch.no_grad():
        expected = ref(x, t, y)  # reference convention: t = 1 is noise
        got = model(x, 1 - t, y)
    velocity_diff = (got + expected).abs().max().item()
    assert expected.abs().max() > 0.1 and velocity_diff <= 1e-5, velocity_diff

    sys.path.insert(0, repo)
    try:
        from denoise.transport import Sampler, create_transport
    finally:
        sys.path.remove(repo)
    sampler = Sampler(create_transport("Linear", "velocity", time_dist_type="uniform", time_dist_shift=4.0))
    sample_fn = sampler.sample_ode(sampling_method="euler", num_steps=100, atol=1e-6, rtol=1e-3, reverse=False)
    noise, labels = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 4, 7])
    with torch.no_grad():
        reference_path = sample_fn(noise, ref.forward, y=labels)  # (100, B, C, H, W), t from 1 down to 0.004
        grid = 1 - torch.linspace(0, 0.999, 100)
        grid = 4.0 * grid / (1 + 3.0 * grid)
        ours, x_t = [noise], noise
        for i in range(99):  # the same grid in this project's time (t_sit = 1 - t) and velocity convention
            h = float(grid[i] - grid[i + 1])
            x_t = x_t + h * model(x_t, torch.full((3,), 1 - float(grid[i])), labels)
            ours.append(x_t)
        # and the project's own sampler on that grid
        from vfmtok.generators.transport import sample_ode

        final = sample_ode(model, noise, labels, 99, times=(1 - grid).double())
    trajectory_diff = (torch.stack(ours) - reference_path).abs().max().item()
    sampler_diff = (final - reference_path[-1]).abs().max().item()
    print(f"\nLightningDiT parity: velocity max |diff| {velocity_diff:.2e} (scale {expected.abs().max().item():.2f}), "
          f"Euler trajectory (99 steps) max |diff| {trajectory_diff:.2e}, sample_ode final {sampler_diff:.2e}")
    assert reference_path.shape[0] == 100 and trajectory_diff <= 1e-5 and sampler_diff <= 1e-5


@pytest.mark.reference
@pytest.mark.skipif(not os.environ.get("VFMTOK2_REF_REPO"), reason="set VFMTOK2_REF_REPO to a VFMTok2 checkout")
def test_the_released_statistics_file_loads_safely_with_the_release_arithmetic():
    """The checkout's own stats/stats-500.pt: numpy (32, 256) arrays, read without unpickling anything else, and the
    file the --official table pins (sha256)."""
    import hashlib

    from vfmtok.generators.convert_dit import read_latent_statistics
    from vfmtok.pipelines.official import VFMTOK2_STATS_SHA256

    path = Path(os.environ["VFMTOK2_REF_REPO"]) / "stats" / "stats-500.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VFMTOK2_STATS_SHA256
    mean, std = read_latent_statistics(path)
    raw = torch.load(path, weights_only=False)  # the checkout's own file, trusted here only to write the expectation
    assert mean.shape == std.shape == (32, 16, 16)
    assert torch.equal(mean, torch.tensor(raw["mean"]).reshape(32, 16, 16))
    assert torch.equal(std, torch.tensor(raw["var"]).reshape(32, 16, 16) + 1e-5)
