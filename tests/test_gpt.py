"""GPTModel (generators/gpt.py) and its converter, checked against independent references: a naive float64 forward
written here, full forward passes, closed-form guidance schedules, hand-written reference key names, published
parameter counts and (opt-in) the public LlamaGen / VFMTok code."""
import math
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vfmtok.generators import GPTModel
from vfmtok.generators.convert_gpt import (CheckpointError, convert_llamagen_checkpoint, convert_llamagen_state_dict,
                                load_llamagen_checkpoint)
from vfmtok.generators.gpt import filter_logits
from vfmtok.generators.layers import apply_rotary_embedding, rope_2d_table
from vfmtok.pipelines.config import build_model, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ar"
TINY = dict(vocab_size=64, num_tokens=16, num_classes=10, dim=32, depth=2, num_heads=4, ffn_multiple_of=32,
            class_dropout_prob=0.1, token_dropout=0.0, residual_dropout=0.0, ffn_dropout=0.0)


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    """A tiny model with every weight random (the zero-initialised head too, so logits carry information)."""
    torch.manual_seed(seed)
    model = GPTModel(**{**TINY, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model.eval()


def random_tokens(model, batch, length, seed=1):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# An independent float64 forward pass (loops, complex rotations, explicit softmax)
# ----------------------------------------------------------------------------------------------------------------------
def naive_logits(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    heads, hd, grid = c.num_heads, c.dim // c.num_heads, math.isqrt(c.num_tokens)
    length = tokens.shape[1]
    x = torch.stack([sd["class_embedding.weight"][labels]] +
                    [sd["token_embedding.weight"][tokens[:, j]] for j in range(length - 1)], dim=1)
    theta = c.rope_base ** (-4.0 * torch.arange(hd // 4, dtype=torch.float64) / hd)  # base^(-2j / (hd/2))
    rot = []
    for p in range(length):
        if p == 0:
            value = 0.0 if c.class_token_rope == "zero" else 1.0
            rot.append(torch.full((hd // 2,), value, dtype=torch.complex128))
        else:
            row, col = divmod(p - 1, grid)
            rot.append(torch.polar(torch.ones(hd // 2, dtype=torch.float64), torch.cat([row * theta, col * theta])))
    rot = torch.stack(rot)  # (T, hd/2)

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def rotate(v):  # (B, T, H, hd): pairs (2i, 2i+1) are complex numbers
        z = torch.view_as_complex(v.reshape(*v.shape[:-1], hd // 2, 2).contiguous()) * rot[None, :, None]
        return torch.view_as_real(z).flatten(-2)

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(c.depth):
        b = f"blocks.{i}."
        h = rms(x, sd[b + "attention_norm.weight"]) @ sd[b + "attention.qkv.weight"].T
        q, k, v = (t.reshape(*x.shape[:2], heads, hd) for t in h.split(c.dim, dim=-1))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("bhts,bshd->bthd", weights, v).reshape(*x.shape)
        x = x + out @ sd[b + "attention.proj.weight"].T
        h = rms(x, sd[b + "ffn_norm.weight"])
        gate, up = h @ sd[b + "ffn.gate_proj.weight"].T, h @ sd[b + "ffn.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[b + "ffn.down_proj.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["head.weight"].T


@pytest.mark.parametrize("class_token_rope", ["zero", "none"])
def test_forward_matches_a_naive_float64_implementation(class_token_rope):
    model = tiny_model(class_token_rope=class_token_rope)
    tokens, labels = random_tokens(model, 3, 16), torch.tensor([0, 9, 10])  # 10 = the null class
    logits = model(tokens, labels)
    assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), naive_logits(model, tokens, labels), atol=2e-5, rtol=1e-5)
    # Shorter sequences are prefixes of the same computation; T = 0 gives no logits.
    torch.testing.assert_close(model(tokens[:, :5], labels), logits[:, :5], atol=1e-5, rtol=1e-5)
    assert model(tokens[:, :0], labels).shape == (3, 0, 64)


def test_zero_class_token_rope_zeroes_the_class_query_and_key():
    """LlamaGen: the class position's rotation entry is (cos, sin) = (0, 0). Its query and key become exactly 0."""
    model = tiny_model(class_token_rope="zero")
    seen = {}
    attention = model.blocks[0].attention
    hook = attention.qkv.register_forward_hook(lambda m, i, o: seen.setdefault("qkv", o))
    model(random_tokens(model, 2, 4), torch.tensor([1, 2]))
    hook.remove()
    q, k, _ = seen["qkv"].view(2, 4, 3, 4, 8).unbind(2)
    rotated_q = apply_rotary_embedding(q, model.rope[:4])
    rotated_k = apply_rotary_embedding(k, model.rope[:4])
    assert torch.all(rotated_q[:, 0] == 0) and torch.all(rotated_k[:, 0] == 0)
    assert rotated_q[:, 1:].abs().sum() > 0 and rotated_k[:, 1:].abs().sum() > 0
    # "none" leaves the class position unrotated.
    none = tiny_model(class_token_rope="none")
    torch.testing.assert_close(apply_rotary_embedding(q, none.rope[:4])[:, 0], q[:, 0])
    # The class embedding still matters with "zero" (through the values).
    tokens = random_tokens(model, 1, 6)
    assert not torch.allclose(model(tokens, torch.tensor([1])), model(tokens, torch.tensor([2])))


# ----------------------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------------------
def test_rope_preserves_norms_and_depends_only_on_relative_2d_offsets():
    grid, hd = 6, 16
    table = rope_2d_table(grid, hd, class_token_rope="zero")
    assert table.shape == (1 + grid * grid, hd // 2, 2) and torch.all(table[0] == 0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, dtype=torch.float64), torch.randn(1, 1, 1, hd, dtype=torch.float64)

    def at(v, row, col):
        return apply_rotary_embedding(v, table[1 + row * grid + col][None].double())[0, 0, 0]

    for row, col in [(0, 0), (2, 5), (5, 1)]:
        torch.testing.assert_close(at(q, row, col).norm(), q.norm())
    # Same 2D offset (dr, dc) = (1, -2) at different absolute places -> same score.
    scores = [at(q, r + 1, c - 2) @ at(k, r, c) for r, c in [(0, 2), (3, 4), (4, 5)]]
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0])
    # A different offset gives a different score; rows and columns are not interchangeable.
    assert not torch.isclose(at(q, 2, 1) @ at(k, 0, 0), scores[0])
    assert not torch.isclose(at(q, 1, 0) @ at(k, 0, 0), at(q, 0, 1) @ at(k, 0, 0))


def test_rope_table_layout_rows_then_columns():
    """First hd/4 pairs rotate with the row, the rest with the column, frequencies base^(-2j/(hd/2))."""
    grid, hd, base = 4, 16, 10000.0
    table = rope_2d_table(grid, hd, base, class_token_rope="none")
    assert torch.all(table[0, :, 0] == 1) and torch.all(table[0, :, 1] == 0)
    freqs = [base ** (-2 * j / (hd // 2)) for j in range(hd // 4)]
    for row, col in [(0, 3), (2, 1), (3, 3)]:
        angles = torch.tensor([row * f for f in freqs] + [col * f for f in freqs])
        entry = table[1 + row * grid + col]
        torch.testing.assert_close(entry[:, 0], torch.cos(angles))
        torch.testing.assert_close(entry[:, 1], torch.sin(angles))


def test_rope_stays_float32_when_the_model_is_cast():
    model = tiny_model()
    model.to(torch.bfloat16)
    assert model.rope.dtype == torch.float32 and model.head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.rope, rope_2d_table(4, 8))
    assert model.generate(torch.tensor([1]), guidance_scale=2.0).shape == (1, 16)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------------
def test_cached_decoding_matches_a_full_forward_at_every_step():
    model = tiny_model()
    tokens, labels = random_tokens(model, 3, 16), torch.tensor([1, 5, 10])
    cache = model.allocate_kv_cache(3)
    assert cache.max_length == 16 and cache.keys[0].shape == (3, 4, 16, 8)
    step_logits = [model.prefill(labels, cache)]
    for position in range(1, 16):
        step_logits.append(model.decode_step(tokens[:, position - 1], position, cache))
    for t, logits in enumerate(step_logits):
        full = model(tokens[:, :t + 1], labels)[:, t]  # the full forward over the same prefix
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    # A chunk (class token + 6 tokens) then single steps give the same logits as well.
    cache = model.allocate_kv_cache(3)
    chunk = model.forward_cached(cache, 0, tokens[:, :6], class_labels=labels)
    torch.testing.assert_close(chunk, model(tokens[:, :7], labels), atol=1e-5, rtol=1e-5)
    rest = model.forward_cached(cache, 7, tokens[:, 6:15])
    torch.testing.assert_close(rest, model(tokens, labels)[:, 7:], atol=1e-5, rtol=1e-5)


def full_forward_guided_logits(model, tokens, labels, scales):
    """Independent CFG: full forward passes over each prefix, conditional and null-class, combined per step."""
    null = torch.full_like(labels, model.config.num_classes)
    steps = []
    for t, s in enumerate(scales):
        cond = model(tokens[:, :t + 1], labels)[:, t]
        uncond = model(tokens[:, :t + 1], null)[:, t]
        steps.append(uncond + s * (cond - uncond))
    return torch.stack(steps, dim=1)


def closed_form_scales(schedule, s, total, power=2.75, interval=None):
    out = []
    for t in range(total):
        value = {"constant": s, "interval": s, "linear": 1 + (s - 1) * t / total,
                 "cosine_power": 1 + (s - 1) * (1 - math.cos(math.pi * (t / total) ** power)) / 2}[schedule]
        out.append(1.0 if interval is not None and t >= interval else value)
    return out


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("schedule,interval", [("constant", None), ("linear", None), ("cosine_power", None),
                                               ("interval", 5), ("linear", 9)])
def test_generation_logits_match_full_forward_cfg_at_every_step(schedule, interval, use_kv_cache):
    model = tiny_model()
    labels = torch.tensor([3, 7])
    tokens, logits = model.generate(labels, guidance_scale=3.0, guidance_schedule=schedule, guidance_power=1.5,
                                    guidance_interval=interval, generator=torch.Generator().manual_seed(0),
                                    use_kv_cache=use_kv_cache, return_logits=True)
    scales = closed_form_scales(schedule, 3.0, 16, power=1.5, interval=interval)
    assert model.guidance_scales(3.0, schedule, 1.5, interval) == pytest.approx(scales, abs=1e-12)
    torch.testing.assert_close(logits, full_forward_guided_logits(model, tokens, labels, scales),
                               atol=2e-5, rtol=1e-5)


def test_schedules_closed_form():
    model = tiny_model()
    assert model.guidance_scales(2.0) == [2.0] * 16
    linear = model.guidance_scales(5.0, "linear")
    assert linear[0] == 1.0 and linear[8] == pytest.approx(3.0) and linear[-1] == pytest.approx(1 + 4 * 15 / 16)
    cosine = model.guidance_scales(16.0, "cosine_power", guidance_power=2.75)
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(1 + 15 * (1 - math.cos(math.pi * (15 / 16) ** 2.75)) / 2)
    assert all(a <= b for a, b in zip(cosine, cosine[1:]))  # monotone ramp
    assert model.guidance_scales(4.0, "interval", guidance_interval=3) == [4.0] * 3 + [1.0] * 13
    assert model.guidance_scales(1.0, "cosine_power") == [1.0] * 16


def class_ids_seen(model):
    seen = []
    hook = model.class_embedding.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    return seen, hook


def test_the_unconditional_half_uses_the_null_class_and_stops_after_the_interval():
    model = tiny_model()
    labels = torch.tensor([3, 7])
    seen, hook = class_ids_seen(model)
    batch_sizes = []
    block_hook = model.blocks[0].register_forward_hook(lambda m, i, o: batch_sizes.append(o.shape[0]))
    model.generate(labels, guidance_scale=2.0, guidance_interval=4)
    hook.remove(), block_hook.remove()
    assert len(seen) == 1 and seen[0].tolist() == [3, 7, 10, 10]  # [cond; uncond], null class = num_classes
    assert batch_sizes == [4] * 4 + [2] * 12  # the uncond half is skipped once guidance is off
    # Without guidance only the conditional batch runs.
    seen, hook = class_ids_seen(model)
    model.generate(labels, guidance_scale=1.0, guidance_schedule="linear")
    hook.remove()
    assert [s.tolist() for s in seen] == [[3, 7]]


def test_guidance_scale_one_equals_the_conditional_model_alone():
    model = tiny_model()
    labels = torch.tensor([2, 4, 6])
    tokens, logits = model.generate(labels, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                                    return_logits=True)
    torch.testing.assert_close(logits, model(tokens, labels), atol=1e-5, rtol=1e-5)
    # guidance_scale = 0 is the unconditional model alone.
    tokens, logits = model.generate(labels, guidance_scale=0.0, return_logits=True)
    torch.testing.assert_close(logits, model(tokens, torch.full_like(labels, 10)), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_top_k_one_is_greedy_decoding_with_full_forward_passes(guidance_scale):
    model = tiny_model(seed=4)
    labels = torch.tensor([0, 8])
    null = torch.full_like(labels, 10)
    greedy = torch.zeros(2, 0, dtype=torch.long)
    for t in range(16):
        padded = torch.cat([greedy, torch.zeros(2, 1, dtype=torch.long)], dim=1)  # the last input is never read
        cond, uncond = model(padded, labels)[:, t], model(padded, null)[:, t]
        logits = uncond + guidance_scale * (cond - uncond)
        greedy = torch.cat([greedy, logits.argmax(-1, keepdim=True)], dim=1)
    for use_kv_cache in (True, False):
        sampled = model.generate(labels, guidance_scale=guidance_scale, top_k=1, temperature=0.7,
                                 use_kv_cache=use_kv_cache, generator=torch.Generator().manual_seed(9))
        assert torch.equal(sampled, greedy)


def test_generation_is_reproducible_with_a_generator_and_the_same_with_or_without_the_cache():
    model = tiny_model()
    labels = torch.tensor([1, 2, 3])

    def run(seed, **kw):
        return model.generate(labels, guidance_scale=2.0, top_p=0.9, top_k=40, temperature=1.2,
                              generator=torch.Generator().manual_seed(seed), **kw)

    first = run(0)
    assert first.shape == (3, 16) and first.dtype == torch.long
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))
    assert torch.equal(first, run(0, use_kv_cache=False))
    assert model.training is False
    model.train()
    assert torch.equal(first, run(0)) and model.training  # generate runs in eval mode and restores the mode


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[True, False, True, False]]
    # Sorted: 0.5, 0.3, 0.15, 0.05. top_p = 0.7: 0.5 < 0.7 keeps the 0.3 as well; the mass before 0.15 is 0.8.
    assert filter_logits(logits, top_p=0.7).isfinite().tolist() == [[True, False, True, False]]
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[True, False, True, False]]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[True, False, True, True]]
    assert filter_logits(logits, top_p=0.1).isfinite().tolist() == [[True, False, False, False]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the decode step is checked on a GPU")
def test_compiled_decode_matches_eager_on_gpu():
    model = tiny_model().cuda()
    labels = torch.tensor([1, 2], device="cuda")
    eager = model.generate(labels, guidance_scale=2.0, guidance_interval=6, top_k=1)
    compiled = model.generate(labels, guidance_scale=2.0, guidance_interval=6, top_k=1, compile_decode=True)
    assert torch.equal(eager, compiled)


# ----------------------------------------------------------------------------------------------------------------------
# Training behaviour, initialisation, errors
# ----------------------------------------------------------------------------------------------------------------------
def test_label_dropout_uses_the_null_class_at_rate_p_in_training_only():
    model = tiny_model(class_dropout_prob=0.25)
    labels = torch.arange(4000) % 10
    tokens = torch.zeros(4000, 1, dtype=torch.long)
    seen, hook = class_ids_seen(model)
    model.train()
    torch.manual_seed(0)
    model(tokens, labels)
    model.eval()
    model(tokens, labels)
    model.train()
    model(tokens[:4], labels[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    hook.remove()
    dropped = seen[0] == 10
    assert abs(dropped.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    assert torch.equal(seen[0][~dropped], labels[~dropped])  # the others are untouched
    assert torch.equal(seen[1], labels)  # eval: never
    assert seen[2].tolist() == [10, 1, 10, 3]  # explicit drops, nothing random


def test_initialisation_and_training_loss():
    torch.manual_seed(0)
    model = GPTModel(**{**TINY, "dim": 64, "vocab_size": 512})
    assert torch.all(model.head.weight == 0)
    for name in ("token_embedding.weight", "class_embedding.weight", "blocks.0.attention.qkv.weight"):
        assert model.state_dict()[name].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.norm.weight == 1)
    tokens, labels = torch.randint(0, 512, (4, 16)), torch.randint(0, 10, (4,))
    logits = model(tokens, labels)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert loss.item() == pytest.approx(math.log(512), abs=1e-5)  # zero head: uniform prediction
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_bad_inputs_raise_value_errors_naming_the_value():
    model = tiny_model()
    ok = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\[10, 12\].*\[0, 10\)"):
        model.generate(torch.tensor([12, 1, 10]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        model.generate(torch.tensor([-1]))
    for kwargs, pattern in [({"guidance_scale": -0.5}, "guidance_scale.*-0.5"), ({"top_p": 0.0}, r"top_p.*\(0, 1\]"),
                            ({"top_p": 1.5}, "top_p.*1.5"), ({"top_k": -1}, "top_k.*-1"),
                            ({"temperature": 0.0}, "temperature.*0.0"), ({"guidance_schedule": "cosine"}, "'cosine'"),
                            ({"guidance_schedule": "interval"}, "guidance_interval"),
                            ({"guidance_interval": -2}, "guidance_interval.*-2"),
                            ({"guidance_power": 0.0}, "guidance_power"),
                            ({"compile_decode": True, "use_kv_cache": False}, "use_kv_cache")]:
        with pytest.raises(ValueError, match=pattern):
            model.generate(ok, **kwargs)
    with pytest.raises(ValueError, match=r"\[11\]"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.tensor([11]))
    with pytest.raises(ValueError, match="at most 16"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[64\].*\[0, 64\)"):
        model(torch.full((1, 3), 64), torch.tensor([1]))
    with pytest.raises(ValueError, match="position"):
        model.decode_step(torch.zeros(2, dtype=torch.long), 16, model.allocate_kv_cache(2))
    with pytest.raises(ValueError, match="square"):
        GPTModel(**{**TINY, "num_tokens": 15})
    with pytest.raises(ValueError, match="class_token_rope"):
        GPTModel(**{**TINY, "class_token_rope": "learned"})
    with pytest.raises(ValueError, match="head_dim"):
        GPTModel(**{**TINY, "dim": 24, "num_heads": 4})


# ----------------------------------------------------------------------------------------------------------------------
# Configs and parameter counts
# ----------------------------------------------------------------------------------------------------------------------
def analytic_params(dim, depth, vocab=16384, classes=1000):
    hidden = math.ceil(int(8 * dim / 3) / 256) * 256
    return depth * (4 * dim * dim + 3 * dim * hidden + 2 * dim) + 2 * vocab * dim + (classes + 1) * dim + dim


# Published sizes (REFERENCE.md section 4). GPT-2B's "2.0B" is the label in VFMTok's gpt.py; its own 48/32/1920 layout
# builds 2.19B parameters (the reference code itself counts 2,188,389,120), so that entry checks the layout.
PUBLISHED = {"gpt-b": (12, 12, 768, 111e6), "gpt-l": (24, 16, 1024, 343e6), "gpt-xl": (36, 20, 1280, 775e6),
             "gpt-xxl": (48, 24, 1536, 1.4e9), "gpt-2b": (48, 32, 1920, 2.188e9), "gpt-3b": (24, 32, 3200, 3.1e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_parameter_counts(name):
    depth, heads, dim, published = PUBLISHED[name]
    config = load_config(CONFIGS / f"{name}.yaml")
    params = config["params"]
    assert (params["depth"], params["num_heads"], params["dim"]) == (depth, heads, dim)
    assert (params["vocab_size"], params["num_tokens"], params["num_classes"]) == (16384, 256, 1000)
    assert params["class_token_rope"] == "zero"
    with torch.device("meta"):
        model = build_model(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_params(dim, depth)
    assert abs(count - published) / published < 0.02


def test_tiny_config_matches_the_tiny_tokenizer_and_describe():
    tokenizer = load_config(CONFIGS.parent / "tokenizer" / "vfmtok-tiny.yaml")["params"]
    model = build_model(CONFIGS / "gpt-tiny.yaml")
    assert model.config.vocab_size == tokenizer["codebook_size"]
    assert model.config.num_tokens == tokenizer["query_grid"] ** 2
    info = model.describe()
    assert info["model"] == "GPTModel" and info["num_tokens"] == 16 and info["grid"] == [4, 4]
    assert info["trainable_params"] == info["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(info["parameters_by_part"].values()) == info["total_params"]
    assert (info["dim"], info["depth"], info["num_heads"], info["null_class"]) == (64, 2, 4, 1000)


def test_save_and_strict_from_pretrained(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path / "gpt")
    loaded = GPTModel.from_pretrained(tmp_path / "gpt").eval()
    tokens, labels = random_tokens(model, 2, 16), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(tokens, labels), model(tokens, labels))
    weights = tmp_path / "gpt" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["blocks.1.ffn.up_proj.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="blocks.1.ffn.up_proj.weight"):
        GPTModel.from_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="head.weight.*\\(64, 32\\)"):
        model.load_state_dict({**model.state_dict(), "head.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="extra.weight"):
        model.load_state_dict({**model.state_dict(), "extra.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------------
# Converter (reference key names written out by hand from LlamaGen's autoregressive/models/gpt.py)
# ----------------------------------------------------------------------------------------------------------------------
def reference_layout(p: dict, seed: int) -> dict:
    """A state dict named and shaped like LlamaGen's Transformer(ModelArgs(...)) for the c2i model ``p`` describes."""
    g = torch.Generator().manual_seed(seed)
    d, hidden = p["dim"], math.ceil(int(8 * p["dim"] / 3) / p["ffn_multiple_of"]) * p["ffn_multiple_of"]
    shapes = {"cls_embedding.embedding_table.weight": (p["num_classes"] + 1, d),
              "tok_embeddings.weight": (p["vocab_size"], d), "norm.weight": (d,), "output.weight": (p["vocab_size"], d),
              "freqs_cis": (p["num_tokens"] + 1, d // p["num_heads"] // 2, 2)}
    for i in range(p["depth"]):
        shapes.update({f"layers.{i}.attention.wqkv.weight": (3 * d, d), f"layers.{i}.attention.wo.weight": (d, d),
                       f"layers.{i}.feed_forward.w1.weight": (hidden, d),
                       f"layers.{i}.feed_forward.w3.weight": (hidden, d),
                       f"layers.{i}.feed_forward.w2.weight": (d, hidden),
                       f"layers.{i}.attention_norm.weight": (d,), f"layers.{i}.ffn_norm.weight": (d,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_reference_layout_round_trip(tmp_path):
    params = load_config(CONFIGS / "gpt-tiny.yaml")["params"]
    model = build_model(CONFIGS / "gpt-tiny.yaml")
    ema, raw = reference_layout(params, 1), reference_layout(params, 2)
    checkpoint = {"model": {f"module._orig_mod.{k}": v for k, v in raw.items()}, "ema": ema,
                  "optimizer": {"state": {}, "param_groups": []}, "steps": 10}
    torch.save(checkpoint, tmp_path / "gpt.pt")
    dropped = convert_llamagen_checkpoint(tmp_path / "gpt.pt", model)
    assert dropped == ["freqs_cis"]
    state = model.state_dict()
    expected = {"class_embedding.weight": "cls_embedding.embedding_table.weight",
                "token_embedding.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
                "head.weight": "output.weight", "blocks.1.attention.qkv.weight": "layers.1.attention.wqkv.weight",
                "blocks.1.attention.proj.weight": "layers.1.attention.wo.weight",
                "blocks.0.ffn.gate_proj.weight": "layers.0.feed_forward.w1.weight",
                "blocks.0.ffn.up_proj.weight": "layers.0.feed_forward.w3.weight",
                "blocks.0.ffn.down_proj.weight": "layers.0.feed_forward.w2.weight",
                "blocks.1.attention_norm.weight": "layers.1.attention_norm.weight",
                "blocks.1.ffn_norm.weight": "layers.1.ffn_norm.weight"}
    for ours, theirs in expected.items():
        assert torch.equal(state[ours], ema[theirs]), ours
    assert len(ema) - 1 == len(state)  # every weight converted, only freqs_cis dropped
    convert_llamagen_checkpoint(tmp_path / "gpt.pt", model, prefer="model")
    assert torch.equal(model.state_dict()["head.weight"], raw["output.weight"])
    # A bare (FSDP-style) state dict, with sampling buffers saved after setup_caches.
    bare = {**ema, "layers.0.attention.kv_cache.k_cache": torch.zeros(1)}
    torch.save(bare, tmp_path / "bare.pt")
    assert sorted(convert_llamagen_checkpoint(tmp_path / "bare.pt", model)) == [
        "freqs_cis", "layers.0.attention.kv_cache.k_cache"]


def test_converter_errors(tmp_path):
    params = load_config(CONFIGS / "gpt-tiny.yaml")["params"]
    model = build_model(CONFIGS / "gpt-tiny.yaml")
    state = reference_layout(params, 0)
    with pytest.raises(ValueError, match="cls_embedding.cap_proj.fc1.weight"):  # a t2i checkpoint
        convert_llamagen_state_dict({**state, "cls_embedding.cap_proj.fc1.weight": torch.zeros(1)})
    missing = dict(state)
    del missing["layers.1.feed_forward.w3.weight"]
    torch.save({"ema": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="blocks.1.ffn.up_proj.weight"):
        convert_llamagen_checkpoint(tmp_path / "missing.pt", model)
    torch.save({"ema": {**state, "output.weight": torch.zeros(7, 64)}}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(7, 64\)"):
        convert_llamagen_checkpoint(tmp_path / "shape.pt", model)
    torch.save({"ema": state, "args": Namespace(lr=1e-4)}, tmp_path / "pickled.pt")  # as train_c2i.py saves
    assert load_llamagen_checkpoint(tmp_path / "pickled.pt").keys() == state.keys()
    torch.save({"ema": state, "args": Path("x")}, tmp_path / "other-object.pt")  # any other class: refused
    with pytest.raises(CheckpointError, match="weights_only"):
        load_llamagen_checkpoint(tmp_path / "other-object.pt")
    with pytest.raises(ValueError, match="prefer"):
        load_llamagen_checkpoint(tmp_path / "missing.pt", prefer="best")
    with pytest.raises(FileNotFoundError):
        load_llamagen_checkpoint(tmp_path / "nothing.pt")


# ----------------------------------------------------------------------------------------------------------------------
# Opt-in: the public reference code (CVMI-Lab/VFMTok autoregressive/models/{gpt,generate}.py)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.reference
def test_matches_the_reference_gpt_code():
    repo = os.environ.get("VFMTOK_REF_REPO")
    if not repo or not (Path(repo) / "autoregressive" / "models" / "gpt.py").is_file():
        pytest.skip("set VFMTOK_REF_REPO to a CVMI-Lab/VFMTok checkout to compare with its GPT")
    sys.path.append(repo)
    from autoregressive.models.generate import generate as reference_generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    torch.manual_seed(0)
    reference = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=512, block_size=16, num_classes=10,
                                      cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0,
                                      resid_dropout_p=0.0, ffn_dropout_p=0.0)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    model = GPTModel(vocab_size=512, num_tokens=16, num_classes=10, dim=64, depth=2, num_heads=4,
                     class_token_rope="zero").eval()
    converted, _ = convert_llamagen_state_dict(reference.state_dict())
    model.load_state_dict(converted)

    tokens, labels = torch.randint(0, 512, (3, 16)), torch.tensor([0, 4, 10])
    with torch.no_grad():
        theirs, _ = reference(tokens[:, :-1], labels, input_pos=torch.arange(16))
    delta_forward = (model(tokens, labels) - theirs).abs().max().item()

    # Their KV-cached path, step by step, against ours.
    reference.setup_caches(max_batch_size=3, max_seq_length=16, dtype=torch.float32)
    cache = model.allocate_kv_cache(3)
    with torch.no_grad():
        deltas = [(reference(None, labels, input_pos=torch.arange(1))[0][:, 0] - model.prefill(labels, cache))
                  .abs().max().item()]
        for position in range(1, 16):
            ref_step = reference(tokens[:, position - 1:position], None, input_pos=torch.tensor([position]))[0][:, 0]
            deltas.append((ref_step - model.decode_step(tokens[:, position - 1], position, cache)).abs().max().item())
    delta_cached = max(deltas)
    print(f"\nreference parity: max |dlogits| forward {delta_forward:.3e}, KV-cached {delta_cached:.3e}")
    assert delta_forward < 1e-4 and delta_cached < 1e-4

    # Greedy CFG generation; LlamaGen's cfg_interval = k guides tokens 0..k+1 (our guidance_interval = k + 2).
    conditions = torch.tensor([1, 7])
    for cfg_interval in (-1, 3):
        ref_tokens = reference_generate(reference, conditions, 16, cfg_scale=2.0, cfg_interval=cfg_interval,
                                        temperature=1.0, top_k=1, top_p=1.0)
        ours = model.generate(conditions, guidance_scale=2.0, top_k=1,
                              guidance_interval=None if cfg_interval < 0 else cfg_interval + 2)
        assert torch.equal(ours, ref_tokens.long())
    # Stochastic sampling from torch's global RNG draws the same tokens.
    torch.manual_seed(123)
    ref_tokens = reference_generate(reference, conditions, 16, cfg_scale=1.75, temperature=1.0, top_k=0, top_p=1.0)
    torch.manual_seed(123)
    assert torch.equal(model.generate(conditions, guidance_scale=1.75), ref_tokens.long())


def test_step_callback_sees_every_token_and_a_replaced_token_conditions_the_rest():
    model = tiny_model()
    labels = torch.tensor([1, 2])
    plain = model.generate(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    seen = []
    observed = model.generate(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                              step_callback=lambda t, tokens: seen.append((t, tokens[:, :t + 1].clone())))
    assert torch.equal(observed, plain) and [t for t, _ in seen] == list(range(model.num_tokens))
    assert all(torch.equal(prefix, plain[:, :t + 1]) for t, prefix in seen)

    def force_first(t, tokens):  # replace token 0; the rest is sampled after it
        if t == 0:
            tokens = tokens.clone()
            tokens[:, 0] = 3
            return tokens
        return None

    forced = model.generate(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                            step_callback=force_first)
    assert (forced[:, 0] == 3).all()
    # greedy decoding after the forced token equals greedy decoding from full forward passes with it
    greedy = model.generate(labels, top_k=1, step_callback=force_first)
    prefix = greedy[:, :1]
    with torch.no_grad():
        for t in range(1, model.num_tokens):
            logits = model.eval()(torch.cat([prefix, torch.zeros_like(prefix[:, :1])], 1), labels)[:, t]
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, prefix)
