"""Speculative Jacobi decoding (generators/sampling.py) through GPTModel.generate and RARModel.generate(sjd_window=...).

Exactness: on tiny GPTs and RAR models whose joint distribution over all ``vocab ** num_tokens`` sequences can be
enumerated (from teacher-forced logits, a code path SJD does not use), SJD samples pass a chi-square goodness-of-fit
test against the enumerated joint. Each test runs once with a fixed seed at significance 0.001: a correct sampler fails
it with probability 0.001 per case (the false-alarm rate), and fixed seeds make the outcome reproducible. The same test
rejects a sampler that is slightly off (temperature 1.15 instead of 1), so it can fail.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chi2

from vfmtok.generators.gpt import GPTModel
from vfmtok.generators.rar import RARModel
from vfmtok.generators.sampling import (SJDStats, sample_tokens_by_inverse_cdf, speculative_jacobi_decode,
                                        token_probabilities)
from vfmtok.tokenizer.utils.errors import InvalidValueError

SIGNIFICANCE = 1e-3


def perturbed(model):
    """A peaked, prefix-dependent joint (random init gives near-uniform logits; RAR's adaLN-zero blocks start as
    the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def tiny_gpt(vocab: int, tokens: int, seed: int = 0, codebooks=None) -> GPTModel:
    torch.manual_seed(seed)
    return perturbed(GPTModel(vocab_size=vocab, num_tokens=tokens, num_classes=3, dim=32, depth=2, num_heads=2,
                              ffn_multiple_of=16, codebook_sizes=codebooks))


def tiny_rar(vocab: int, tokens: int, seed: int = 0) -> RARModel:
    torch.manual_seed(seed)
    return perturbed(RARModel(vocab_size=vocab, num_tokens=tokens, num_classes=3, dim=32, depth=2, num_heads=2,
                              intermediate_size=64, extra_position_slots=4, extra_step_slots=4))


TINY = {"gpt": tiny_gpt, "rar": tiny_rar}


def teacher_forced(model, sequences: torch.Tensor, label: int) -> torch.Tensor:
    labels = torch.full((len(sequences),), label)
    with torch.no_grad():
        if isinstance(model, RARModel):
            return model.teacher_forced_logits(sequences, labels).double()
        return model(sequences, labels).double()


def power_cosine_scales(guidance_scale: float, power: float, total: int) -> list[float]:
    """RAR's schedule written out here (not the model's guidance_scales): s_t = 1 + (s - 1)(1 - cos(pi (t/T)^p)) / 2."""
    return [1 + (guidance_scale - 1) * (1 - math.cos(math.pi * (t / total) ** power)) / 2 for t in range(total)]


def enumerated_joint(model, label: int, guidance_scale: float, temperature: float, scales=None) -> torch.Tensor:
    """P(sequence) for every sequence in itertools.product order, from teacher-forced logits with CFG by hand
    (``scales``: the guidance scale of each token; default ``guidance_scale`` for every token)."""
    vocab, total = model.config.vocab_size, model.num_tokens
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=total)))
    cond = teacher_forced(model, sequences, label)
    uncond = teacher_forced(model, sequences, model.null_class)
    scale = torch.tensor(scales if scales is not None else [guidance_scale] * total, dtype=torch.float64)
    logits = uncond + scale[None, :, None] * (cond - uncond) if guidance_scale != 1.0 else cond
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    return log_probs.gather(2, sequences[..., None])[..., 0].sum(dim=1).exp()


def chi_square_p_value(samples: torch.Tensor, joint: torch.Tensor, vocab: int) -> float:
    """Pearson's chi-square of the sample counts against ``joint``; cells expected below 5 are pooled into one."""
    weights = vocab ** torch.arange(samples.shape[1] - 1, -1, -1)
    counts = torch.bincount((samples * weights).sum(dim=1), minlength=len(joint)).double()
    expected = joint * len(samples)
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return float(chi2.sf(statistic, int(keep.sum()) - 1))


CASES = [  # family, vocab, tokens, window, guidance, schedule
    ("gpt", 3, 4, 2, 2.0, "constant"),
    ("gpt", 3, 4, 5, 1.0, "constant"),   # window longer than the sequence allows
    ("gpt", 2, 9, 3, 3.0, "constant"),   # the block clipped at the sequence's end, rows finishing at different steps
    ("gpt", 2, 9, 1, 1.5, "constant"),
    ("rar", 3, 4, 2, 2.0, "constant"),
    ("rar", 2, 9, 3, 3.0, "cosine_power"),  # RAR's default schedule: a different scale for every token
    ("rar", 3, 4, 5, 1.0, "constant"),
]


@pytest.mark.parametrize("family, vocab, tokens, window, guidance, schedule", CASES)
def test_sjd_samples_the_enumerated_joint(family, vocab, tokens, window, guidance, schedule):
    model = TINY[family](vocab, tokens)
    scales = power_cosine_scales(guidance, 2.75, tokens) if schedule == "cosine_power" else None
    joint = enumerated_joint(model, 1, guidance, 1.0, scales)
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-9)
    labels = torch.full((20000,), 1)
    samples, stats = model.generate(labels, guidance_scale=guidance, guidance_schedule=schedule,
                                    guidance_power=2.75, generator=torch.Generator().manual_seed(1),
                                    sjd_window=window, return_sjd_stats=True)
    assert chi_square_p_value(samples, joint, vocab) > SIGNIFICANCE
    assert stats.tokens == 20000 * (tokens - 1) and stats.steps <= tokens - 1


def test_inverse_cdf_sampling_draws_the_distribution_and_never_a_zero_probability_token():
    """SJD's token draws: the counts of 200000 draws per distribution against the probabilities (chi-square at
    SIGNIFICANCE; zero-probability tokens, also first and last, are never drawn), greedy one-hot rows exactly."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0],
                          [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
                          [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    draws = sample_tokens_by_inverse_cdf(probs[:, None].expand(-1, 200000, -1), torch.Generator().manual_seed(0))
    assert draws.shape == (3, 200000)
    for row, p in zip(draws, probs):
        counts = torch.bincount(row, minlength=6).double()
        assert torch.all(counts[p == 0] == 0)
        keep = p > 0
        if int(keep.sum()) > 1:
            expected = p[keep].double() * len(row)
            statistic = float(((counts[keep] - expected) ** 2 / expected).sum())
            assert chi2.sf(statistic, int(keep.sum()) - 1) > SIGNIFICANCE
    assert torch.all(draws[2] == 4)


def test_plain_sampling_passes_and_a_wrong_distribution_fails_the_same_test():
    model = tiny_gpt(3, 4)
    joint = enumerated_joint(model, 1, 2.0, 1.0)
    labels = torch.full((20000,), 1)
    plain = model.generate(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert chi_square_p_value(plain, joint, 3) > SIGNIFICANCE
    off = model.generate(labels, guidance_scale=2.0, temperature=1.15, generator=torch.Generator().manual_seed(1),
                         sjd_window=2)
    assert chi_square_p_value(off, joint, 3) < SIGNIFICANCE
    tempered = enumerated_joint(model, 1, 2.0, 1.15)
    assert chi_square_p_value(off, tempered, 3) > SIGNIFICANCE


@pytest.mark.parametrize("family", ["gpt", "rar"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_greedy_sjd_gives_the_tokens_of_plain_greedy(family, guidance, window):
    model = TINY[family](64, 16, seed=3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    plain = model.generate(labels, guidance_scale=guidance, top_k=1)
    sjd = model.generate(labels, guidance_scale=guidance, top_k=1, sjd_window=window)
    assert torch.equal(plain, sjd)


def test_greedy_sjd_with_several_codebooks():
    model = tiny_gpt(12, 8, seed=2, codebooks=[4, 8])
    labels = torch.tensor([0, 2])
    assert torch.equal(model.generate(labels, guidance_scale=2.0, top_k=1),
                       model.generate(labels, guidance_scale=2.0, top_k=1, sjd_window=4))


def test_sjd_on_a_model_that_repeats_itself_accepts_whole_windows():
    """A decoder whose distribution does not depend on the prefix: every draft from the last distribution is
    accepted with probability 1, so each step commits window + 1 tokens."""
    vocab, total, window = 5, 40, 4
    probs = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])

    def decode(tokens, first_index):
        return probs.log().expand(tokens.shape[0], tokens.shape[1], vocab)

    tokens, stats = speculative_jacobi_decode(decode, probs.log().expand(3, vocab), total, lambda l: l.softmax(-1),
                                              window=window, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, total) and isinstance(stats, SJDStats)
    assert stats.steps == -(-(total - 1) // (window + 1)) and stats.tokens == 3 * (total - 1)
    assert stats.tokens_per_step == pytest.approx((total - 1) / stats.steps)


@pytest.mark.parametrize("family", ["gpt", "rar"])
def test_sjd_argument_errors(family):
    model = TINY[family](3, 4)
    labels = torch.tensor([0])
    with pytest.raises(InvalidValueError, match="sjd_window must be an integer >= 1"):
        model.generate(labels, sjd_window=0)
    with pytest.raises(InvalidValueError, match="needs use_kv_cache=True"):
        model.generate(labels, sjd_window=2, use_kv_cache=False)
    with pytest.raises(InvalidValueError, match="return_sjd_stats needs sjd_window"):
        model.generate(labels, return_sjd_stats=True)
    assert token_probabilities(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), top_k=1).tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("generator_config", ["gpt-tiny", "rar-tiny"])
def test_ar_pipeline_and_vfmtok_sample_take_sjd(generator_config, tmp_path, capsys):
    import json
    from pathlib import Path

    from vfmtok.pipelines import VFMTokARPipeline
    from vfmtok.pipelines.cli import main
    from vfmtok.pipelines.config import build_model

    configs = Path(__file__).resolve().parents[1] / "configs"
    torch.manual_seed(0)
    generator = build_model(configs / "ar" / f"{generator_config}.yaml").eval()
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = VFMTokARPipeline(build_model(configs / "tokenizer" / "vfmtok-tiny.yaml").eval(), generator)
    kw = dict(guidance_scale=2.0, top_k=1, output_type="codes")
    assert torch.equal(pipe([3, 7], **kw).images, pipe([3, 7], sjd_window=4, **kw).images)
    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--class-ids", "1", "--sjd-window", "4",
                 "--output", str(tmp_path / "grid.png")]) in (0, None)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 1
