"""Flow samplers (generators/transport.py: FLOW_SCHEDULERS, sample_with_scheduler, the Adams-Bashforth scheduler) on a
problem with a closed-form solution, and their use through the flow pipeline.

Gaussian data ``x1 ~ N(mu, diag(s^2))`` under the linear interpolant ``x_t = t x1 + (1 - t) x0``: ``x_t`` is Gaussian
with mean ``m(t) = t mu`` and std ``r(t) = sqrt(t^2 s^2 + (1 - t)^2)``, the flow velocity is affine,
``v(x, t) = mu + r'(t) / r(t) * (x - m(t))``, and the ODE maps ``x_{t0}`` to ``x_1 = mu + s (x_{t0} - m(t0)) / r(t0)``.
"""
from __future__ import annotations

import math

import pytest
import torch

from vfmtok.generators.transport import (FLOW_SCHEDULERS, FlowMatchAdamsBashforthScheduler, flow_scheduler,
                                         guided_model, sample_ode, sample_with_scheduler, scheduler_noise_levels,
                                         scheduler_shift)
from vfmtok.tokenizer.utils.errors import InvalidValueError

DIM = 16


class GaussianFlow:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(DIM, generator=g, dtype=torch.float64)
        self.s = torch.rand(DIM, generator=g, dtype=torch.float64) * 0.5 + 0.1
        self.noise = torch.randn(32, DIM, generator=g, dtype=torch.float64)
        self.calls = 0

    def std(self, t):
        return torch.sqrt(t * t * self.s ** 2 + (1 - t) ** 2)

    def velocity(self, x, t, y=None):
        self.calls += 1
        t = t.to(torch.float64)[:, None]
        d_std = (t * self.s ** 2 - (1 - t)) / self.std(t)
        return self.mu + d_std / self.std(t) * (x - t * self.mu)

    def exact(self, t0: float) -> torch.Tensor:
        t0 = torch.tensor(t0, dtype=torch.float64)
        return self.mu + self.s * (self.noise - t0 * self.mu) / self.std(t0)


def _error(name: str, steps: int, shift: float) -> float:
    problem = GaussianFlow()
    scheduler = flow_scheduler(name, shift)
    out = sample_with_scheduler(problem.velocity, problem.noise, None, scheduler, steps)
    # DPM-Solver's own grid starts at sigma 0.999: compare with the exact solution from where it starts.
    t0 = 1.0 - scheduler_noise_levels(scheduler)[0]
    return float((out - problem.exact(t0)).abs().max())


# name -> (claimed order, step counts where the asymptotic order shows)
ORDERS = {"euler": (1, (32, 64, 128)), "ab2": (2, (32, 64, 128)), "heun": (2, (16, 32, 64))}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", sorted(ORDERS))
def test_sampler_converges_to_the_exact_ode_solution_at_its_order(name, shift):
    order, counts = ORDERS[name]
    errors = [_error(name, n, shift) for n in counts]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(o - order) < 0.35 for o in observed), (errors, observed)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", ["dpm++2m", "dpm++3m", "unipc", "unipc3"])
def test_diffusers_multistep_solvers_converge_and_beat_euler(name, shift):
    """diffusers' multistep solvers take their last step to sigma = 0 at first order (an error of O(sigma_last));
    what is claimed: at least first-order convergence, and a smaller error than Euler at the same model calls."""
    errors = [_error(name, n, shift) for n in (16, 64)]
    assert math.log2(errors[0] / errors[1]) / 2 > 0.9, errors
    for n, error in zip((16, 64), errors):
        assert error < _error("euler", n, shift)


@pytest.mark.parametrize("name", sorted(FLOW_SCHEDULERS))
def test_model_calls_per_sampler(name):
    problem = GaussianFlow()
    sample_with_scheduler(problem.velocity, problem.noise, None, flow_scheduler(name, 2.0), 6)
    assert problem.calls == (11 if name == "heun" else 6)


def test_euler_scheduler_is_sample_ode_euler_with_the_shift():
    problem = GaussianFlow()
    ours = sample_with_scheduler(problem.velocity, problem.noise, None, flow_scheduler("euler", 2.5), 7)
    reference = sample_ode(problem.velocity, problem.noise, None, 7, method="euler", shift=2.5)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_ab2_scheduler_matches_a_hand_written_adams_bashforth():
    problem = GaussianFlow()
    ours = sample_with_scheduler(problem.velocity, problem.noise, None, flow_scheduler("ab2", 2.0), 5)
    sigmas = [2.0 * s / (1.0 + s) for s in (1.0, 0.8, 0.6, 0.4, 0.2)] + [0.0]
    x, previous = problem.noise, None
    for i in range(5):
        d = -problem.velocity(x, torch.full((len(x),), 1.0 - sigmas[i], dtype=torch.float64))
        h = sigmas[i + 1] - sigmas[i]
        if previous is None:
            x = x + h * d
        else:
            r = h / (sigmas[i] - sigmas[i - 1])
            x = x + h * ((1 + r / 2) * d - r / 2 * previous)
        previous = d
    torch.testing.assert_close(ours, x)


def test_every_scheduler_carries_the_shift():
    for name in FLOW_SCHEDULERS:
        assert scheduler_shift(flow_scheduler(name, 3.0)) == 3.0
    with pytest.raises(InvalidValueError, match="flow sampler must be one of"):
        flow_scheduler("euler-a", 1.0)
    with pytest.raises(InvalidValueError, match="shift must be positive"):
        flow_scheduler("unipc", 0.0)


def test_guidance_interval_is_applied_at_the_scheduler_times():
    """The guided model is called at SiT time 1 - sigma of every model call of each sampler: inside the interval it
    returns the guided velocity, outside the conditional one (class velocity 2, null-class velocity 1, scale 3:
    guided 1 + 3 (2 - 1) = 4)."""
    def model(x, t, y):
        return torch.where(y[:, None] == 0, torch.ones_like(x), 2 * torch.ones_like(x))

    guided = guided_model(model, 3.0, interval=(0.2, 0.8), null_class=0)
    for name in sorted(FLOW_SCHEDULERS):
        calls = []

        def recorded(x, t, y):
            v = guided(x, t, y)
            calls.append((float(t[0]), float(v[0, 0])))
            return v

        scheduler = flow_scheduler(name, 2.0)
        sample_with_scheduler(recorded, torch.zeros(2, 1), torch.tensor([1, 1]), scheduler, 10)
        times = [1.0 - s for s in scheduler_noise_levels(scheduler)]
        assert [t for t, _ in calls] == pytest.approx(times, abs=1e-6)
        assert {v for t, v in calls if 0.2 <= t <= 0.8} == {4.0}
        assert {v for t, v in calls if not 0.2 <= t <= 0.8} == {2.0}


def test_ab2_scheduler_round_trips_through_its_config(tmp_path):
    scheduler = FlowMatchAdamsBashforthScheduler(shift=2.0)
    scheduler.save_pretrained(tmp_path)
    again = FlowMatchAdamsBashforthScheduler.from_pretrained(tmp_path)
    assert again.config.shift == 2.0


# -- through the pipeline ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_pipe():
    from pathlib import Path

    from vfmtok.pipelines import VFMTokFlowPipeline
    from vfmtok.pipelines.config import build_model

    configs = Path(__file__).resolve().parents[1] / "configs"
    torch.manual_seed(0)
    dit = build_model(configs / "flow" / "dit-tiny.yaml").eval()
    with torch.no_grad():  # adaLN-Zero starts at a zero velocity: make the output depend on x, t and y
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return VFMTokFlowPipeline(build_model(configs / "tokenizer" / "vfmae-tiny.yaml").eval(), dit,
                              flow_scheduler("euler", 2.0))


def test_sampler_by_name_is_the_swapped_scheduler_the_diffusers_way(flow_pipe):
    from diffusers import DPMSolverMultistepScheduler

    kw = dict(num_inference_steps=6, guidance_scale=1.5, guidance_interval=(0.1, 0.9), output_type="latent")
    by_name = flow_pipe([3, 5], sampler="dpm++2m", generator=torch.Generator().manual_seed(0), **kw).images
    euler = flow_pipe.scheduler
    try:
        flow_pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            euler.config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0)
        swapped = flow_pipe([3, 5], generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        flow_pipe.scheduler = euler
    transformer = flow_pipe.transformer
    noise = torch.randn(2, *transformer.latent_shape, generator=torch.Generator().manual_seed(0))
    velocity = guided_model(lambda x, t, y: transformer(x, t, y), 1.5, interval=(0.1, 0.9),
                            null_class=transformer.null_class)
    reference = sample_with_scheduler(velocity, noise, torch.tensor([3, 5]), flow_scheduler("dpm++2m", 2.0), 6)
    torch.testing.assert_close(by_name, swapped)
    torch.testing.assert_close(by_name, transformer.denormalize_latents(reference), atol=1e-5, rtol=1e-5)
    assert flow_pipe.scheduler is euler


def test_pipeline_refuses_a_diffusion_solver_without_flow_settings(flow_pipe):
    from diffusers import UniPCMultistepScheduler

    euler = flow_pipe.scheduler
    try:
        flow_pipe.scheduler = UniPCMultistepScheduler.from_config(euler.config)
        with pytest.raises(InvalidValueError, match="use_flow_sigmas=True and prediction_type='flow_prediction'"):
            flow_pipe(1, num_inference_steps=2, output_type="latent")
        flow_pipe.scheduler = UniPCMultistepScheduler.from_config(euler.config, use_flow_sigmas=True,
                                                                  prediction_type="flow_prediction")
        with pytest.raises(InvalidValueError, match="flow_shift 1.0 differs from the shift 2.0"):
            flow_pipe(1, num_inference_steps=2, output_type="latent")
    finally:
        flow_pipe.scheduler = euler
    with pytest.raises(InvalidValueError, match="sampler must be one of"):
        flow_pipe(1, sampler="dpm", output_type="latent")


def test_command_line_offers_every_sampler_of_the_pipeline():
    from vfmtok.pipelines.cli import FLOW_SAMPLERS
    from vfmtok.pipelines.pipeline_vfmtok_flow import SAMPLERS

    assert tuple(FLOW_SAMPLERS) == tuple(SAMPLERS)


def test_vfmtok_sample_takes_a_sampler_by_name(flow_pipe, tmp_path, capsys):
    import json

    from PIL import Image

    from vfmtok.pipelines.cli import main

    flow_pipe.save_pretrained(tmp_path / "pipe")
    assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--class-ids", "1", "--sampler", "ab2",
                 "--num-inference-steps", "3", "--output", str(tmp_path / "grid.png")]) in (0, None)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 1
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_default_sampler_of_a_new_pipeline_is_saved_and_a_swapped_scheduler_replaces_it(flow_pipe, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vfmtok.pipelines import VFMTokFlowPipeline
    from vfmtok.pipelines.pipeline_common import load_pipeline
    from vfmtok.pipelines.pipeline_vfmtok_flow import DEFAULT_SAMPLER

    pipe = VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, None)
    name, steps = DEFAULT_SAMPLER
    assert pipe.config.default_sampler == {"name": name, "steps": steps}
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.config.default_sampler == {"name": name, "steps": steps}
    kw = dict(guidance_scale=1.5, output_type="latent")
    default = loaded(4, generator=torch.Generator().manual_seed(0), **kw).images
    explicit = loaded(4, sampler=name, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      **kw).images
    assert torch.equal(default, explicit)
    loaded.scheduler = FlowMatchEulerDiscreteScheduler.from_config(loaded.scheduler.config)  # the diffusers way
    assert loaded.config.default_sampler is None
    euler = loaded(4, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(euler, loaded(4, sampler="euler", num_inference_steps=50,
                                     generator=torch.Generator().manual_seed(0), **kw).images)
    with pytest.raises(InvalidValueError, match="default_sampler must be"):
        VFMTokFlowPipeline(flow_pipe.vae, flow_pipe.transformer, None, default_sampler=["rk45", 8])
