"""Tests for generators.transport against closed forms (Gaussian data, hand-computed losses, guidance formulas)."""
from __future__ import annotations

import math

import pytest
import torch

from vfmtok.generators.transport import (
    diffusers_flow_sampler,
    flow_matching_loss,
    guided_model,
    sample_ode,
    sample_sde,
    sample_training_times,
    shift_for_dimension,
    shift_time,
    velocity_to_score,
)

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)


def gaussian_velocity(mu: torch.Tensor, std: torch.Tensor):
    """Exact E[x1 - x0 | x_t] for x_t = t x1 + (1 - t) x0, x1 ~ N(mu, diag(std^2)), x0 ~ N(0, I).

    Per dimension: Var(x_t) = t^2 s^2 + (1 - t)^2, Cov(x1 - x0, x_t) = t s^2 - (1 - t), so
    E[v | x_t] = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) * (x_t - t mu).
    """
    var1 = std ** 2

    def model(x, t, class_labels):
        tt = t.to(x.dtype)[:, None]
        gain = (tt * var1 - (1 - tt)) / (tt ** 2 * var1 + (1 - tt) ** 2)
        return mu + gain * (x - tt * mu)

    return model


# ----------------------------------------------------------------------------------------------------------------
# ODE samplers on Gaussian data
# ----------------------------------------------------------------------------------------------------------------
def _affine_scale_error(method: str, steps: int, shift: float = 1.0) -> float:
    """The exact flow map is x0 -> mu + std * x0; the numerical map is affine too. Push x0 = 0 and x0 = 1."""
    model = gaussian_velocity(MU, STD)
    noise = torch.stack([torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)])
    out = sample_ode(model, noise, None, steps, method=method, shift=shift)
    # The mean (x0 = 0) follows m(t) = t mu, which Euler and Heun integrate exactly (the field is mu there).
    torch.testing.assert_close(out[0], MU, atol=1e-12, rtol=0)
    return float((out[1] - out[0] - STD).abs().max())


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_ode_convergence_order(method, order, shift):
    errors = [_affine_scale_error(method, n, shift) for n in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:]):
        ratio = coarse / fine
        assert abs(math.log2(ratio) - order) < 0.15, (errors, ratio)
    assert errors[-1] < (5e-2 if order == 1 else 3e-4)


@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 40)])
def test_ode_gaussian_moments(method, steps):
    n = 20000
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    out = sample_ode(gaussian_velocity(MU, STD), noise, None, steps, method=method)
    # Sampling tolerance: ~5 standard errors on the mean and the variance of a Gaussian sample.
    torch.testing.assert_close(out.mean(0), MU, atol=float(5 * STD.max() / math.sqrt(n)) + 1e-2, rtol=0)
    cov = torch.cov(out.T)
    torch.testing.assert_close(cov.diagonal(), STD ** 2, rtol=5 * math.sqrt(2 / n) + 1e-2, atol=0)
    off = cov - torch.diag(cov.diagonal())
    assert float(off.abs().max()) < 5 * float(STD.max() ** 2) / math.sqrt(n)


def test_ode_explicit_times_equals_default_grid():
    model = gaussian_velocity(MU, STD)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = 1 - torch.linspace(0, 1, 11, dtype=torch.float64)
    grid = 1 - 2 * sigma / (1 + sigma)  # shift 2 applied by hand to the noise level
    a = sample_ode(model, noise, None, 10, shift=2.0)
    b = sample_ode(model, noise, None, 999, times=grid)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        sample_ode(model, noise, None, 10, times=torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError):
        sample_ode(model, noise, None, 10, method="rk4")


# ----------------------------------------------------------------------------------------------------------------
# SDE sampler
# ----------------------------------------------------------------------------------------------------------------
def test_score_from_velocity_closed_form():
    # For x_t ~ N(t mu, t^2 s^2 + (1 - t)^2) the score is -(x - t mu) / Var(x_t).
    model = gaussian_velocity(MU, STD)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=torch.float64)
    tt = t[:, None]
    expected = -(x - tt * MU) / (tt ** 2 * STD ** 2 + (1 - tt) ** 2)
    torch.testing.assert_close(velocity_to_score(model(x, t, None), x, t), expected)


@pytest.mark.parametrize("diffusion", ["sigma", "constant"])
def test_sde_gaussian_moments(diffusion):
    n = 20000
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    out = sample_sde(gaussian_velocity(MU, STD), noise, None, 250, generator=gen, diffusion=diffusion)
    torch.testing.assert_close(out.mean(0), MU, atol=float(5 * STD.max() / math.sqrt(n)) + 2e-2, rtol=0)
    torch.testing.assert_close(torch.var(out, 0), STD ** 2, rtol=5 * math.sqrt(2 / n) + 3e-2, atol=0)


def test_sde_zero_diffusion_is_euler_plus_last_step():
    model = gaussian_velocity(MU, STD)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sample_sde(model, noise, None, 10, generator=torch.Generator().manual_seed(0), diffusion_norm=0.0,
                     last_step_size=0.1)
    times = torch.cat([torch.linspace(0, 0.9, 11, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)])
    torch.testing.assert_close(out, sample_ode(model, noise, None, 1, times=times))


# ----------------------------------------------------------------------------------------------------------------
# diffusers bridge
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_diffusers_scheduler_matches_euler(shift):
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.3
    bias = torch.randn(4)
    emb = torch.randn(10, 4)

    def model(x, t, y):  # tiny linear model on (B, 4, 2, 2) latents
        h = torch.einsum("oc,bchw->bohw", weight, x)
        return h + (bias[None] * t[:, None] + emb[y])[:, :, None, None]

    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 4, 7])
    ours = sample_ode(model, noise, labels, 20, method="euler", shift=shift)
    theirs = diffusers_flow_sampler(model, noise, labels, 20, shift=shift)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------------------
NUM_CLASSES = 5
EMB = torch.arange((NUM_CLASSES + 1) * 2 * 3 * 3, dtype=torch.float32).reshape(NUM_CLASSES + 1, 2, 3, 3).sin()


class LabelModel:
    """v = 0.5 x + EMB[y] (t-independent); null class = NUM_CLASSES differs from every class in every channel."""

    def __init__(self, scale: float = 0.5):
        self.scale = scale
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return self.scale * x + EMB[y]


def test_guidance_scale_one_is_conditional():
    model = LabelModel()
    x = torch.randn(3, 2, 3, 3)
    t = torch.full((3,), 0.4)
    y = torch.tensor([0, 2, 4])
    guided = guided_model(model, 1.0, null_class=NUM_CLASSES)
    torch.testing.assert_close(guided(x, t, y), model(x, t, y))


def test_cfg_all_channels_single_batched_call():
    model = LabelModel()
    x = torch.randn(3, 2, 3, 3)
    t = torch.full((3,), 0.4)
    y = torch.tensor([0, 2, 4])
    guided = guided_model(model, 2.5, null_class=NUM_CLASSES)
    out = guided(x, t, y)
    assert len(model.calls) == 1 and model.calls[0][0] == 6
    assert model.calls[0][1].tolist() == [0, 2, 4, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]
    v_c, v_u = 0.5 * x + EMB[y], 0.5 * x + EMB[NUM_CLASSES]
    torch.testing.assert_close(out, v_u + 2.5 * (v_c - v_u))
    assert bool(((out - v_c).abs() > 1e-4).all()), "guidance must change every channel and position"


def test_guidance_interval():
    model = LabelModel()
    x = torch.randn(4, 2, 3, 3)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    y = torch.tensor([1, 1, 3, 3])
    guided = guided_model(model, 3.0, interval=(0.2, 0.8), null_class=NUM_CLASSES)
    out = guided(x, t, y)
    v_c, v_u = 0.5 * x + EMB[y], 0.5 * x + EMB[NUM_CLASSES]
    expected = v_u + 3.0 * (v_c - v_u)
    torch.testing.assert_close(out[[0, 3]], v_c[[0, 3]])
    torch.testing.assert_close(out[[1, 2]], expected[[1, 2]])


def test_autoguidance():
    main, weak = LabelModel(0.5), LabelModel(-0.25)
    x = torch.randn(2, 2, 3, 3)
    t = torch.tensor([0.1, 0.9])
    y = torch.tensor([2, 3])
    out = guided_model(main, 1.8, weak_model=weak)(x, t, y)
    v_main, v_weak = 0.5 * x + EMB[y], -0.25 * x + EMB[y]
    torch.testing.assert_close(out, v_weak + 1.8 * (v_main - v_weak))
    assert main.calls[0][1].tolist() == [2, 3] and weak.calls[0][1].tolist() == [2, 3]


def test_guidance_bad_values():
    with pytest.raises(ValueError, match="null_class"):
        guided_model(LabelModel(), 2.0)
    with pytest.raises(ValueError, match="interval"):
        guided_model(LabelModel(), 2.0, interval=(0.8, 0.2), null_class=NUM_CLASSES)
    with pytest.raises(ValueError, match="guidance_scale"):
        guided_model(LabelModel(), -1.0, null_class=NUM_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# Time sampling and shift
# ----------------------------------------------------------------------------------------------------------------
def test_uniform_and_logit_normal_moments():
    n = 200000
    u = sample_training_times(n, torch.Generator().manual_seed(0), "uniform")
    assert abs(float(u.mean()) - 0.5) < 5e-3 and abs(float(u.var()) - 1 / 12) < 2e-3
    t = sample_training_times(n, torch.Generator().manual_seed(0), "logit_normal", mean=0.5, std=1.5)
    assert float(t.min()) > 0 and float(t.max()) < 1
    logit = torch.log(t.double()) - torch.log1p(-t.double())
    assert abs(float(logit.mean()) - 0.5) < 2e-2 and abs(float(logit.std()) - 1.5) < 2e-2
    t0 = sample_training_times(n, torch.Generator().manual_seed(1), "logit_normal")
    assert abs(float(t0.mean()) - 0.5) < 5e-3  # symmetric about 1/2 when mean = 0
    with pytest.raises(ValueError, match="schedule"):
        sample_training_times(4, None, "cosine")


def test_shift_time():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = shift_time(t, 3.0)
    assert float(s[0]) == 0.0 and float(s[-1]) == 1.0
    assert bool((s[1:] > s[:-1]).all()) and bool((s <= t).all())
    # sigma = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75 -> t' = 0.25
    assert float(shift_time(torch.tensor(0.5), 3.0)) == pytest.approx(0.25)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    # Inverse shift undoes the shift: 1/s composed with s is the identity.
    torch.testing.assert_close(shift_time(s, 1 / 3.0), t)
    assert shift_for_dimension(16 * 16 * 32) == pytest.approx(math.sqrt(2))
    assert shift_for_dimension(4096) == 1.0
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def _linear_model(x, t, y):
    return 2.0 * x - t[:, None] + y[:, None].float()


def test_loss_hand_computed():
    data = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    noise = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    times = torch.tensor([0.25, 0.5])
    y = torch.tensor([0, 1])
    # x_t = t d + (1 - t) n:  [[0.625, -0.25], [0.5, 0.25]];  target d - n: [[0.5, 3.0], [-3.0, 0.5]]
    # pred = 2 x_t - t + y:  [[1.0, -0.75], [1.5, 1.0]]
    pred = torch.tensor([[1.0, -0.75], [1.5, 1.0]])
    target = torch.tensor([[0.5, 3.0], [-3.0, 0.5]])
    mse = ((0.5 ** 2 + 3.75 ** 2) + (4.5 ** 2 + 0.5 ** 2)) / 4
    cos = [float(pred[i] @ target[i] / (pred[i].norm() * target[i].norm())) for i in range(2)]
    cos_term = (2 - cos[0] - cos[1]) / 2
    loss, logs = flow_matching_loss(_linear_model, data, y, noise=noise, times=times)
    assert float(loss) == pytest.approx(mse, rel=1e-6)
    loss_c, logs_c = flow_matching_loss(_linear_model, data, y, noise=noise, times=times, cosine_weight=0.7)
    assert float(loss_c) == pytest.approx(mse + 0.7 * cos_term, rel=1e-6)
    assert logs_c["mse"] == pytest.approx(mse, rel=1e-6) and logs_c["cosine"] == pytest.approx(cos_term, rel=1e-6)


def test_loss_generator_draws_times_then_noise():
    data = torch.randn(4, 3, generator=torch.Generator().manual_seed(9))
    y = torch.zeros(4, dtype=torch.long)
    loss, _ = flow_matching_loss(_linear_model, data, y, generator=torch.Generator().manual_seed(7), shift=2.0)
    gen = torch.Generator().manual_seed(7)
    times = torch.rand(4, generator=gen)
    times = 1 - 2 * (1 - times) / (1 + (1 - times))  # shift 2 on sigma = 1 - t
    noise = torch.randn(4, 3, generator=gen)
    x_t = times[:, None] * data + (1 - times[:, None]) * noise
    expected = ((_linear_model(x_t, times, y) - (data - noise)) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="cosine_weight"):
        flow_matching_loss(_linear_model, data, y, cosine_weight=-1.0)
