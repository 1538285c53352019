"""RARModel (generators/rar.py), its converter and its recipe pieces, checked against independent references: the
reference key names written out by hand, full-sequence forwards against the KV-cached decoder, a naive greedy CFG
loop, the closed-form schedules of RAR's code, parameter counts from the architecture's own arithmetic; and, opt-in
(``VFMTOK_RAR_REF_REPO`` = a checkout of CVMI-Lab/VFMTok-RAR or bytedance/1d-tokenizer), the public reference code."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vfmtok.generators.convert_rar import (RAR_RELEASES, convert_rar_checkpoint, convert_rar_state_dict,
                                           rar_params_from_state_dict)
from vfmtok.generators.rar import RARModel, permutation_probability
from vfmtok.pipelines.config import build_model, load_config
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError
from test_trainer import ROOT

TINY = dict(vocab_size=64, num_tokens=9, num_classes=5, dim=32, depth=2, num_heads=4, intermediate_size=64,
            extra_position_slots=4, extra_step_slots=3)


def noisy_model(seed: int = 0, **overrides) -> RARModel:
    """A tiny RAR in eval mode with N(0, 0.02) noise on every tensor (adaLN-zero would otherwise hide the blocks)."""
    torch.manual_seed(seed)
    model = RARModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Converter (reference key names written out by hand from modeling/rar.py)
# ----------------------------------------------------------------------------------------------------------------------
def reference_layout(model: RARModel) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    state = {"cls_token": ours["start_token"], "embeddings.weight": ours["embedding.weight"],
             "pos_embed": ours["position_embedding"][None], "target_aware_pos_embed":
             ours["target_position_embedding"][None], "timesteps_embeddings": ours["step_embedding"][None],
             "adaln_before_head.adaLN_modulation.1.weight": ours["final_modulation.weight"],
             "adaln_before_head.adaLN_modulation.1.bias": ours["final_modulation.bias"],
             "lm_head.weight": ours["head.weight"], "lm_head.bias": ours["head.bias"],
             "attn_mask": torch.zeros(3, 3)}
    for i in range(model.config.depth):
        for part in ("weight", "bias"):
            state[f"blocks.{i}.norm1.{part}"] = ours[f"blocks.{i}.norm1.{part}"]
            state[f"blocks.{i}.norm2.{part}"] = ours[f"blocks.{i}.norm2.{part}"]
            for name in ("qkv", "proj", "q_norm", "k_norm"):
                state[f"blocks.{i}.attn.{name}.{part}"] = ours[f"blocks.{i}.attention.{name}.{part}"]
            state[f"blocks.{i}.mlp.fc1.{part}"] = ours[f"blocks.{i}.mlp.fc1.{part}"]
            state[f"blocks.{i}.mlp.fc2.{part}"] = ours[f"blocks.{i}.mlp.fc2.{part}"]
            state[f"blocks.{i}.adaLN_modulation.1.{part}"] = ours[f"blocks.{i}.modulation.{part}"]
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_reference_files_convert_exactly(tmp_path, suffix):
    source = noisy_model(1)
    state = reference_layout(source)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    target = RARModel(**TINY)
    assert [k.split(".")[-1] for k in convert_rar_checkpoint(path, target)] == ["attn_mask"]  # dropped as named
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_converter_refuses_foreign_and_missized_files(tmp_path):
    llamagen = {"tok_embeddings.weight": torch.zeros(4, 2), "layers.0.attention.wqkv.weight": torch.zeros(6, 2)}
    with pytest.raises(CheckpointError, match="tok_embeddings"):  # a LlamaGen GPT file is never half-converted
        convert_rar_state_dict(llamagen)
    state = reference_layout(noisy_model(0, vocab_size=32))
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"vocab_size: file 32, config 64"):
        convert_rar_checkpoint(tmp_path / "m.safetensors", RARModel(**TINY))
    converted, _ = convert_rar_state_dict(state)
    assert rar_params_from_state_dict(converted, 5)["intermediate_size"] == 64
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        convert_rar_checkpoint(tmp_path / "bad.safetensors", RARModel(**TINY))


# ----------------------------------------------------------------------------------------------------------------------
# The model against itself computed another way
# ----------------------------------------------------------------------------------------------------------------------
def test_kv_cached_generation_matches_full_sequence_forwards():
    model = noisy_model(2)
    labels = torch.tensor([0, 3, 4])
    tokens, logits = model.generate(labels, guidance_scale=1.0, return_logits=True,
                                    generator=torch.Generator().manual_seed(0))
    full = model.teacher_forced_logits(tokens, labels)  # one causal pass over the finished sequences
    assert (logits - full).abs().max() < 1e-5
    again, uncached = model.generate(labels, guidance_scale=1.0, return_logits=True, use_kv_cache=False,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens) and (uncached - full).abs().max() < 1e-5


def test_decode_of_several_tokens_equals_one_at_a_time():
    model = noisy_model(3)
    labels = torch.tensor([1, 2])
    tokens = torch.randint(0, 64, (2, 9))
    one = model.allocate_cache(2)
    first = model.prefill(labels, one)
    steps = [model.decode(tokens[:, t:t + 1], one)[:, 0] for t in range(5)]
    many = model.allocate_cache(2)
    assert torch.allclose(model.prefill(labels, many), first)
    chunk = torch.cat([model.decode(tokens[:, :3], many), model.decode(tokens[:, 3:5], many)], dim=1)
    assert (chunk - torch.stack(steps, dim=1)).abs().max() < 1e-5
    with pytest.raises(InvalidValueError, match="do not fit"):
        model.decode(tokens[:, :4], many)


def test_random_orders_are_causal_in_the_order_and_target_aware():
    model = noisy_model(4)
    labels = torch.tensor([2])
    tokens = torch.randint(0, 64, (1, 9))
    order = torch.tensor([[4, 0, 8, 2, 6, 1, 3, 5, 7]])
    base = model.teacher_forced_logits(tokens, labels, order)
    changed = tokens.clone()
    changed[0, order[0, 3]] = (changed[0, order[0, 3]] + 1) % 64  # the 4th token of the order
    after = model.teacher_forced_logits(changed, labels, order)
    same = (after - base).abs().amax(dim=-1)[0]
    assert torch.all(same[:4] == 0) and torch.all(same[4:] > 0)  # index j sees order positions < j only
    # Same prefix, different next target: the prediction for the next position changes (target-aware embedding).
    other = order.clone()
    other[0, 3], other[0, 4] = order[0, 4], order[0, 3]
    swapped = model.teacher_forced_logits(tokens, labels, other)
    assert torch.equal(swapped[:, :3], base[:, :3]) and not torch.allclose(swapped[:, 3], base[:, 3])


def test_forward_aligns_logits_with_tokens_and_its_loss_is_the_ordered_loss():
    model = noisy_model(5)
    tokens = torch.randint(0, 64, (3, 9))
    labels = torch.tensor([0, 1, 2])
    orders = torch.stack([torch.randperm(9) for _ in range(3)])
    ordered = model.teacher_forced_logits(tokens, labels, orders)
    aligned = model(tokens, labels, orders=orders)
    for b in range(3):
        for j in range(9):
            assert torch.equal(aligned[b, orders[b, j]], ordered[b, j])
    direct = F.cross_entropy(ordered.flatten(0, 1), tokens.gather(1, orders).flatten())
    assert torch.allclose(F.cross_entropy(aligned.flatten(0, 1), tokens.flatten()), direct)


def naive_greedy(model: RARModel, labels: torch.Tensor, scale: float, power: float) -> torch.Tensor:
    """Greedy CFG decoding without a cache: each step one teacher-forced pass over the tokens so far (later positions
    padded with code 0, which the causal mask hides), s_t from RAR's formula."""
    T = model.config.num_tokens
    tokens = torch.zeros(len(labels), T, dtype=torch.long)
    null = torch.full_like(labels, model.config.num_classes)
    for t in range(T):
        s = (scale - 1) * (1 - math.cos(((t / T) ** power) * math.pi)) / 2 + 1
        cond = model.teacher_forced_logits(tokens, labels)[:, t]
        uncond = model.teacher_forced_logits(tokens, null)[:, t]
        tokens[:, t] = (uncond + (cond - uncond) * s).argmax(dim=-1)
    return tokens


@pytest.mark.parametrize("scale,power", [(4.0, 2.75), (6.5, 1.0)])
def test_greedy_cfg_generation_matches_a_naive_loop(scale, power):
    model = noisy_model(6)
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        expected = naive_greedy(model, labels, scale, power)
    got = model.generate(labels, guidance_scale=scale, guidance_power=power, top_k=1)  # RAR's schedule by default
    assert torch.equal(got, expected) and len(got.unique()) > 3


def test_guidance_schedule_is_rars_power_cosine():
    model = noisy_model(0)
    T = model.config.num_tokens
    for scale, power in ((16.0, 2.75), (6.5, 1.0)):
        expected = [(scale - 1) * (1 - np.cos(((t / T) ** power) * np.pi)) / 2 + 1 for t in range(T)]
        assert model.guidance_scales(scale, "cosine_power", power) == pytest.approx(expected, abs=1e-12)
    assert model.default_sampling["guidance_schedule"] == "cosine_power"
    assert model.default_sampling["guidance_power"] == 2.75 and model.default_sampling["temperature"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Training pieces
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start,end", [(125_000, 187_500), (4, 12), (3, 3)])
def test_permutation_probability_is_the_annealing_of_the_reference(start, end):
    steps = sorted({0, 1, start - 1, start, start + 1, (start + end) // 2, end - 1, end, end + 1, 2 * end + 5})
    for step in (s for s in steps if s >= 0):
        # direct: 1 before the start, then the straight line from (start, 1) to (end, 0), 0 afterwards
        if step < start:
            direct = 1.0
        elif step >= end:
            direct = 0.0
        else:
            direct = (end - step) / (end - start)
        assert permutation_probability(step, start, end) == pytest.approx(direct, abs=1e-12), step
    model = RARModel(**{**TINY, "randomness_anneal_start": start, "randomness_anneal_end": max(end, start)})
    model.on_train_step(end + 1)
    assert model.permutation_probability == 0.0


def test_sampled_orders_follow_the_permutation_probability():
    model = RARModel(**TINY)
    torch.manual_seed(0)
    raster = torch.arange(9)
    for p, low, high in ((0.0, 0.0, 0.0), (1.0, 0.99, 1.0), (0.5, 0.46, 0.54)):
        model.permutation_probability = p
        orders = model.sample_orders(4000, "cpu")
        assert torch.equal(orders.sort(dim=1).values, raster.expand(4000, -1))  # every row a permutation
        shuffled = (orders != raster).any(dim=1).float().mean().item()  # a random row is raster with p 1/9!
        assert low <= shuffled <= high, (p, shuffled)


def test_training_forward_draws_orders_and_drops_labels_from_the_global_rng():
    model = noisy_model(7).train()
    model.on_train_step(0)  # probability 1: random orders
    tokens, labels = torch.randint(0, 64, (4, 9)), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(11)
    first = model(tokens, labels)
    torch.manual_seed(11)
    assert torch.equal(model(tokens, labels), first)
    model.eval()
    assert not torch.allclose(model(tokens, labels), first)


def test_adamw_groups_and_cosine_floor_follow_the_rar_recipe():
    from vfmtok.pipelines.config import TrainingConfig
    from vfmtok.pipelines.train.trainer import _optimizer, _scheduler

    model = RARModel(**TINY)
    config = TrainingConfig.from_dict({"optimizer": "adamw", "learning_rate": 4e-4, "betas": [0.9, 0.96],
                                       "weight_decay": 0.03, "lr_scheduler": "cosine", "lr_warmup_steps": 5,
                                       "min_learning_rate": 1e-5, "max_steps": 25})
    optimizer = _optimizer(model, config)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.03 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "embedding.weight" not in names and "position_embedding" not in names and "start_token" not in names
    assert "blocks.0.attention.qkv.weight" in names and "head.weight" in names
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.96)
    scheduler = _scheduler(optimizer, config)
    lrs = []
    for _ in range(27):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # utils/lr_schedulers.py: linear warm-up, then end + (base - end) * 0.5 * (1 + cos(pi * progress))
    expected = [4e-4 * s / 5 if s < 5 else 1e-5 + (4e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * min(1, (s - 5) / 20)))
                for s in range(27)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    with pytest.raises(InvalidValueError, match="min_learning_rate"):
        TrainingConfig.from_dict({"min_learning_rate": 1e-5, "lr_scheduler": "constant"})


# ----------------------------------------------------------------------------------------------------------------------
# Configs: the released layouts
# ----------------------------------------------------------------------------------------------------------------------
def rar_parameter_count(vocab: int, tokens: int, classes: int, dim: int, depth: int, inter: int, heads: int) -> int:
    """modeling/rar.py's parameters, counted by hand: per block norm1 / norm2 (2 dim each), qkv (3 dim^2 + 3 dim),
    q/k norms (2 x 2 head_dim), proj (dim^2 + dim), fc1 / fc2 (2 dim inter + inter + dim), adaLN (6 dim^2 + 6 dim);
    then embeddings, cls token, three position tables, the final adaLN and the head."""
    head_dim = dim // heads
    block = 4 * dim + 3 * dim * dim + 3 * dim + 4 * head_dim + dim * dim + dim + 2 * dim * inter + inter + dim \
        + 6 * dim * dim + 6 * dim
    return depth * block + (vocab + classes + 2) * dim + dim + 2 * (tokens + 1024) * dim + (tokens + 100) * dim \
        + 2 * dim * dim + 2 * dim + dim * vocab + vocab


@pytest.mark.parametrize("name,dim,depth,inter", [("rar-l", 1024, 24, 4096), ("rar-l-ultra", 1024, 24, 4096),
                                                   ("rar-xl", 1280, 32, 4096), ("rar-xxl", 1408, 40, 6144)])
def test_configs_have_the_released_layouts(name, dim, depth, inter):
    config = load_config(ROOT / "configs" / "ar" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == rar_parameter_count(16384, 256, 1000, dim, depth, inter, 16)
    # the published sizes (461M, 955M with intermediate 5120, 1.5B) are RAR's over its 1024-code tokenizer
    published = {"rar-l": 461e6, "rar-l-ultra": 461e6, "rar-xl": 955e6, "rar-xxl": 1.5e9}[name]
    inter_published = 5120 if name == "rar-xl" else inter
    assert abs(rar_parameter_count(1024, 256, 1000, dim, depth, inter_published, 16) - published) / published < 0.01
    assert config["training"]["betas"] == (0.9, 0.96) and config["training"]["weight_decay"] == 0.03
    assert config["training"]["min_learning_rate"] == 1e-5 and config["training"]["lr_scheduler"] == "cosine"
    assert config["params"]["class_dropout_prob"] == 0.1
    release = next(r for r in RAR_RELEASES.values() if r["config"].endswith(f"{name}.yaml"))
    assert config["sampling"]["guidance_scale"] == release["sampling"]["guidance_scale"]
    assert config["sampling"]["guidance_power"] == release["sampling"]["guidance_power"]


@pytest.mark.parametrize("change,match", [({"dim": 30}, "multiple of num_heads"), ({"dropout": 1.0}, "dropout"),
                                          ({"randomness_anneal_start": 9, "randomness_anneal_end": 3}, "anneal"),
                                          ({"extra_position_slots": 1}, "extra_position_slots"),
                                          ({"depth": 0}, "depth")])
def test_invalid_configs_are_named(change, match):
    with pytest.raises(InvalidValueError, match=match):
        RARModel(**{**TINY, **change})


def test_bad_sampling_inputs_are_named():
    model = RARModel(**TINY)
    with pytest.raises(InvalidValueError, match=r"class ids \[5\]"):
        model.generate(torch.tensor([5]))
    with pytest.raises(InvalidValueError, match="guidance_schedule"):
        model.generate(torch.tensor([1]), guidance_scale=2.0, guidance_schedule="cosine")
    with pytest.raises(InvalidValueError, match="temperature"):
        model.generate(torch.tensor([1]), temperature=0.0)
    with pytest.raises(InvalidValueError, match="permutation"):
        model.teacher_forced_logits(torch.zeros(1, 9, dtype=torch.long), torch.tensor([0]),
                                    torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(InvalidValueError, match="needs use_kv_cache=True"):
        model.generate(torch.tensor([1]), compile_decode=True, use_kv_cache=False)
    with pytest.raises(InvalidValueError, match="takes no compile_decode"):
        model.generate(torch.tensor([1]), compile_decode=True, sjd_window=2)


def test_compiled_decode_step_samples_the_tokens_of_the_eager_one():
    """compile_decode=True: torch.compile of the static-shape decode step (the whole cache under a mask), on the CPU
    here (about 10 s of compilation): the same tokens as the eager step, greedy and sampled with one seed."""
    model = noisy_model(seed=4)
    labels = torch.tensor([1, 2])
    assert torch.equal(model.generate(labels, guidance_scale=2.0, top_k=1),
                       model.generate(labels, guidance_scale=2.0, top_k=1, compile_decode=True))
    assert torch.equal(model.generate(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(3)),
                       model.generate(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(3),
                                      compile_decode=True))


# ----------------------------------------------------------------------------------------------------------------------
# Opt-in: the public reference code (modeling/rar.py of CVMI-Lab/VFMTok-RAR or bytedance/1d-tokenizer)
# ----------------------------------------------------------------------------------------------------------------------
def reference_pair(repo: str):
    from rar_reference import reference_rar

    sizes = dict(vocab_size=512, num_tokens=16, num_classes=10, dim=64, depth=2, num_heads=4, intermediate_size=256)
    torch.manual_seed(0)
    reference = reference_rar(repo, **sizes).eval()
    with torch.no_grad():
        for p in reference.parameters():  # N(0, 0.02) on every tensor, in the reference's own layout
            p.normal_(0, 0.02)
    converted, dropped = convert_rar_state_dict(reference.state_dict())
    model = RARModel(**sizes, extra_position_slots=1024, extra_step_slots=100).eval()
    model.load_state_dict(converted, strict=True)
    return reference, model


@pytest.mark.reference
def test_matches_the_reference_rar_code(monkeypatch):
    repo = os.environ.get("VFMTOK_RAR_REF_REPO")
    if not repo:
        pytest.skip("set VFMTOK_RAR_REF_REPO to a checkout of CVMI-Lab/VFMTok-RAR or bytedance/1d-tokenizer")
    reference, model = reference_pair(repo)
    tokens, labels = torch.randint(0, 512, (3, 16)), torch.tensor([1, 7, 3])
    condition = reference.preprocess_condition(labels.clone(), cond_drop_prob=0.0)
    deltas = {}
    with torch.no_grad():
        for name, orders in (("raster", None), ("random", torch.stack([torch.randperm(16) for _ in range(3)]))):
            theirs = reference.forward_fn(tokens, condition, orders=orders)[:, :-1]
            deltas[name] = (theirs - model.teacher_forced_logits(tokens, labels, orders)).abs().max().item()
        # the training loss: the reference's ARLoss (cross-entropy of the shuffled labels) on its logits
        torch.manual_seed(3)
        reference.set_random_ratio(1.0)
        orders = reference.sample_orders(tokens)
        logits, shuffled = reference.forward_fn(tokens, condition, return_labels=True, orders=orders)
        their_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), shuffled.flatten())
        our_loss = F.cross_entropy(model(tokens, labels, orders=orders).flatten(0, 1), tokens.flatten())
    print(f"\nRAR reference parity: max |dlogits| raster {deltas['raster']:.3e}, random {deltas['random']:.3e}; "
          f"loss {their_loss.item():.8f} vs {our_loss.item():.8f}")
    assert deltas["raster"] <= 1e-5 and deltas["random"] <= 1e-5
    assert abs(their_loss.item() - our_loss.item()) <= 1e-6
    for scale, power in ((4.0, 2.75), (6.5, 1.0), (1.0, 2.75)):
        with monkeypatch.context() as patch:  # greedy: the reference's multinomial draw becomes the argmax
            patch.setattr(torch, "multinomial", lambda probs, num_samples, **_: probs.argmax(dim=-1, keepdim=True))
            theirs = reference.generate(labels, guidance_scale=scale, randomize_temperature=1.0,
                                        guidance_scale_pow=power)
        ours = model.generate(labels, guidance_scale=scale, guidance_power=power, top_k=1)
        assert torch.equal(theirs.long(), ours), (scale, power)
        assert len(ours.unique()) > 8


# ----------------------------------------------------------------------------------------------------------------------
# The generator interface: the AR pipeline and the release converter with a RAR
# ----------------------------------------------------------------------------------------------------------------------
TOKENIZER_TINY = ROOT / "configs" / "tokenizer" / "vfmtok-tiny.yaml"
RAR_TINY = ROOT / "configs" / "ar" / "rar-tiny.yaml"


@pytest.fixture(scope="module")
def rar_pipe():
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline

    torch.manual_seed(0)
    tokenizer = build_model(TOKENIZER_TINY).eval()
    generator = build_model(RAR_TINY).eval()
    with torch.no_grad():
        for p in generator.parameters():
            p.normal_(0, 0.02)
    return VFMTokARPipeline(tokenizer, generator, default_guidance_scale=3.0,
                            default_sampler_options={"guidance_power": 1.0})


def test_ar_pipeline_samples_a_rar_with_its_defaults_and_saves_them(rar_pipe, tmp_path):
    from vfmtok.pipelines.pipeline_common import load_pipeline

    assert rar_pipe.sampler_defaults()["guidance_schedule"] == "cosine_power"  # the family's
    assert rar_pipe.sampler_defaults()["guidance_power"] == 1.0  # the pipeline's
    images = rar_pipe([1, 2], generator=torch.Generator().manual_seed(4), output_type="np").images
    codes = rar_pipe.transformer.generate(torch.tensor([1, 2]), guidance_scale=3.0, guidance_schedule="cosine_power",
                                          guidance_power=1.0, generator=torch.Generator().manual_seed(4))
    direct = ((rar_pipe.vqvae.decode(codes).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - direct).max() < 1e-5
    rar_pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert type(loaded.transformer).__name__ == "RARModel" and loaded.sampler_defaults() == rar_pipe.sampler_defaults()
    again = loaded([1, 2], generator=torch.Generator().manual_seed(4), output_type="np").images
    assert np.abs(again - images).max() < 1e-5
    with pytest.raises(InvalidValueError, match="guidance_shedule"):
        rar_pipe.set_default_sampler_options({"guidance_shedule": "constant"})


def test_a_release_converts_into_a_pipeline_with_its_published_sampling(tmp_path):
    from test_convert import reference_state_dict
    from vfmtok.pipelines.convert import convert_rar_release

    tokenizer_params = load_config(TOKENIZER_TINY)["params"]
    torch.save({"ema": reference_state_dict(build_model(TOKENIZER_TINY), tokenizer_params, seed=1)},
               tmp_path / "vfmtok-tokenizer.pt")
    save_file(reference_layout(build_model(RAR_TINY)), str(tmp_path / "model.safetensors"))
    pipe = convert_rar_release("RAR-L-ultra", tmp_path / "vfmtok-tokenizer.pt", tmp_path / "model.safetensors",
                               tmp_path / "out", tokenizer_config=str(TOKENIZER_TINY), generator_config=str(RAR_TINY))
    assert pipe.config.default_guidance_scale == 16.0
    assert pipe.sampler_defaults()["guidance_power"] == 2.75 and pipe.sampler_defaults()["temperature"] == 1.0
    assert pipe.config.evaluation["gFID (cfg-16)"] == 1.33 and pipe.config.evaluation["gFID (cfg-1)"] == 2.01
    assert (tmp_path / "out" / "model_index.json").is_file()
    with pytest.raises(InvalidValueError, match="RAR-M"):
        convert_rar_release("RAR-M", tmp_path / "vfmtok-tokenizer.pt", tmp_path / "model.safetensors")


def test_plain_bicubic_resize_is_the_reference_evaluations(rar_pipe):
    from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline

    pipe = VFMTokARPipeline(rar_pipe.vqvae, rar_pipe.transformer, resize_antialias=False)
    codes = pipe([1, 2], generator=torch.Generator().manual_seed(2), output_type="codes").images
    images = pipe([1, 2], generator=torch.Generator().manual_seed(2), output_type="pt", output_size=48).images
    with torch.no_grad():
        native, _ = pipe.vqvae._decode_tokens(pipe.vqvae._tokens_to_decoder_input(codes), semantic=False)  # unclamped
    expected = (F.interpolate(native, size=(48, 48), mode="bicubic").clamp(-1, 1) + 1) / 2  # as decode_tokens
    assert (images - expected).abs().max() < 1e-5
    antialiased = (pipe.vqvae.decode(codes, output_size=48) + 1) / 2  # the default ("antialias") resize
    assert (antialiased - expected).abs().max() > 1e-3
    with pytest.raises(InvalidValueError, match="resize_antialias"):
        VFMTokARPipeline(rar_pipe.vqvae, rar_pipe.transformer, resize_antialias="nearest")
