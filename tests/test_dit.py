"""Tests for generators/dit.py (DiT / SiT / LightningDiT / DiT^DH denoiser) and configs/flow/."""
from pathlib import Path

import pytest
import torch

from generators.dit import DiTModel
from generators.gpt import apply_rotary_embedding, rope_2d_table
from pipelines.config import build_model, load_config

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
    ("ditdh-xl.yaml", 839e6, 834_222_452),
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
