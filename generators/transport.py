"""Model-agnostic flow-matching transport: training loss, time schedules, ODE/SDE samplers, guidance.

Convention (SiT, Ma et al. 2024; willisma/SiT)
--------------------------------------------
Linear interpolant between Gaussian noise ``x0 ~ N(0, I)`` and data ``x1``::

    x_t = t * x1 + (1 - t) * x0,        t in [0, 1],  t = 0 pure noise, t = 1 data,
    v   = d x_t / d t = x1 - x0         (the velocity target).

A *model* is any callable ``velocity = model(x, t, class_labels)`` with ``x`` of shape ``(B, ...)``,
``t`` of shape ``(B,)`` (float, in [0, 1]) and ``class_labels`` of shape ``(B,)`` (long) or ``None``.
Sampling integrates ``dx/dt = v(x, t)`` from ``t = 0`` (noise) to ``t = 1`` (data).

Mapping to diffusers' FlowMatch schedulers (``FlowMatchEulerDiscreteScheduler``), which use
``x_s = (1 - s) * x1 + s * x0`` with the noise level ``s = sigma`` (``s = 1`` pure noise), model timestep
``1000 * sigma`` and model output ``x0 - x1`` (noise minus data)::

    sigma = 1 - t,    timestep_diffusers = 1000 * (1 - t),    output_diffusers = -v.

Time shift (SD3 / RAE), defined on the noise level ``sigma`` and applied here through ``sigma = 1 - t``::

    sigma' = shift * sigma / (1 + (shift - 1) * sigma),   shift = sqrt(latent_dim / 4096)  (RAE),

so ``shift > 1`` spends more of the schedule at high noise (small ``t``); endpoints are fixed.

Score from velocity: with ``x_t = t x1 + (1 - t) x0`` and ``v = E[x1 - x0 | x_t]`` one gets
``E[x0 | x_t] = x_t - t v`` and, since ``x_t | x1`` has covariance ``(1 - t)^2 I``,
``score(x_t) = -E[x0 | x_t] / (1 - t) = (t v - x_t) / (1 - t)``.

Guidance is applied over ALL channels (the DiT/SiT "first 3 channels" leftover is deliberately not reproduced).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.types import finite_number, positive_int

Model = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

__all__ = [
    "interpolate",
    "sample_training_times",
    "shift_time",
    "shift_for_dimension",
    "flow_matching_loss",
    "time_grid",
    "velocity_to_score",
    "diffusion_coefficient",
    "sample_ode",
    "sample_sde",
    "guided_model",
    "diffusers_flow_sampler",
    "FLOW_SCHEDULERS",
    "FlowMatchAdamsBashforthScheduler",
    "flow_scheduler",
    "scheduler_shift",
    "set_flow_timesteps",
    "sample_with_scheduler",
]


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times ``(B,)`` to broadcast against ``x`` of shape ``(B, ...)``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, v)`` with ``x_t = t * data + (1 - t) * noise`` and target velocity ``v = data - noise``."""
    if data.shape != noise.shape:
        raise InvalidValueError(f"data shape {tuple(data.shape)} != noise shape {tuple(noise.shape)}")
    if t.shape != (data.shape[0],):
        raise InvalidValueError(f"t must have shape ({data.shape[0]},), got {tuple(t.shape)}")
    te = _expand(t, data)
    return te * data + (1.0 - te) * noise, data - noise


# ----------------------------------------------------------------------------------------------------------------
# Training-time schedules
# ----------------------------------------------------------------------------------------------------------------
def sample_training_times(
    batch: int,
    generator: Optional[torch.Generator] = None,
    schedule: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Draw ``batch`` training times in (0, 1) (SiT convention, t = 0 noise).

    ``"uniform"``: t ~ U(0, 1). ``"logit_normal"``: t = sigmoid(mean + std * z), z ~ N(0, 1) (SD3 / LightningDiT).
    The logit-normal distribution is symmetric under t <-> 1 - t when ``mean = 0``, so it is the same in either
    time convention up to ``mean -> -mean``.
    """
    if batch <= 0:
        raise InvalidValueError(f"batch must be positive, got {batch}")
    if schedule == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if schedule == "logit_normal":
        if std <= 0:
            raise InvalidValueError(f"std must be positive, got {std}")
        z = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(mean + std * z)
    raise InvalidValueError(f"schedule must be 'uniform' or 'logit_normal', got {schedule!r}")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the SD3/RAE time shift to SiT times ``t`` (t = 0 noise).

    With ``sigma = 1 - t`` (noise level, 1 = noise): ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``,
    returned as ``t' = 1 - sigma'``. Monotone increasing in ``t``, fixes 0 and 1, identity for ``shift = 1``;
    ``shift > 1`` gives ``t' <= t`` (more time near noise).
    """
    shift = finite_number("shift", shift)
    if shift <= 0:
        raise InvalidValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    sigma = 1.0 - t
    sigma_shifted = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    return 1.0 - sigma_shifted


def shift_for_dimension(dim: int, base_dim: int = 4096) -> float:
    """Dimension-dependent shift of RAE: ``sqrt(dim / base_dim)`` with ``dim`` the latent size (e.g. C*H*W)."""
    if dim <= 0:
        raise InvalidValueError(f"dim must be positive, got {dim}")
    if base_dim <= 0:
        raise InvalidValueError(f"base_dim must be positive, got {base_dim}")
    return math.sqrt(dim / base_dim)


def flow_matching_loss(
    model: Model,
    data: torch.Tensor,
    class_labels: Optional[torch.Tensor],
    generator: Optional[torch.Generator] = None,
    time_schedule: str = "uniform",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    shift: float = 1.0,
    cosine_weight: float = 0.0,
    noise: Optional[torch.Tensor] = None,
    times: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, dict]:
    """Velocity-matching loss ``mean((v_pred - v)^2) + cosine_weight * mean_b(1 - cos(v_pred_b, v_b))``.

    Times are drawn first (``sample_training_times`` then ``shift_time``), then the noise, both from
    ``generator``; pass ``times`` (already final, not shifted again) and/or ``noise`` to fix them explicitly.
    Returns ``(loss, logs)`` with detached floats ``logs = {"loss", "mse", "cosine"}``.
    """
    if cosine_weight < 0:
        raise InvalidValueError(f"cosine_weight must be non-negative, got {cosine_weight}")
    batch = data.shape[0]
    if times is None:
        times = sample_training_times(batch, generator, time_schedule, time_mean, time_std, device=data.device)
        times = shift_time(times, shift)
    times = times.to(device=data.device, dtype=data.dtype)
    if noise is None:
        noise = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
    x_t, target = interpolate(data, noise, times)
    pred = model(x_t, times, class_labels)
    if pred.shape != target.shape:
        raise InvalidValueError(f"model output shape {tuple(pred.shape)} != data shape {tuple(target.shape)}")
    mse = (pred.float() - target.float()).pow(2).mean()
    cos = 1.0 - F.cosine_similarity(pred.float().flatten(1), target.float().flatten(1), dim=1, eps=1e-8)
    cos = cos.mean()
    loss = mse + cosine_weight * cos if cosine_weight > 0 else mse
    logs = {"loss": float(loss.detach()), "mse": float(mse.detach()), "cosine": float(cos.detach())}
    return loss, logs


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------
def time_grid(steps: int, shift: float = 1.0, t_end: float = 1.0, device=None) -> torch.Tensor:
    """Increasing grid ``shift_time(linspace(0, t_end, steps + 1), shift)`` (float64 for accurate steps)."""
    steps = positive_int("steps", steps)
    shift = finite_number("shift", shift)
    if not 0.0 < t_end <= 1.0:
        raise InvalidValueError(f"t_end must be in (0, 1], got {t_end}")
    return shift_time(torch.linspace(0.0, t_end, steps + 1, dtype=torch.float64, device=device), shift)


def _check_grid(times: torch.Tensor) -> torch.Tensor:
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.dim() != 1 or times.numel() < 2:
        raise InvalidValueError(f"times must be a 1-D grid with at least 2 points, got shape {tuple(times.shape)}")
    if not bool((times[1:] > times[:-1]).all()):
        raise InvalidValueError("times must be strictly increasing (t = 0 noise -> t = 1 data)")
    if float(times[0]) < 0.0 or float(times[-1]) > 1.0:
        raise InvalidValueError(f"times must lie in [0, 1], got [{float(times[0])}, {float(times[-1])}]")
    return times


def _call(model: Model, x: torch.Tensor, t: float, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    return model(x, tt, class_labels)


@torch.no_grad()
def sample_ode(
    model: Model,
    noise: torch.Tensor,
    class_labels: Optional[torch.Tensor],
    steps: int,
    method: str = "euler",
    times: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate ``dx/dt = model(x, t, y)`` from the noise at ``times[0]`` to ``times[-1]``.

    ``times`` defaults to ``time_grid(steps, shift)`` (0 -> 1); if given it overrides ``steps`` and ``shift``.
    ``method="euler"`` uses ``steps`` model calls, ``"heun"`` (explicit trapezoid) ``2 * steps``.
    """
    if method not in ("euler", "heun"):
        raise InvalidValueError(f"method must be 'euler' or 'heun', got {method!r}")
    if times is None:
        steps, shift = positive_int("steps", steps), finite_number("shift", shift)
    grid = time_grid(steps, shift) if times is None else _check_grid(times)
    x = noise
    for i in range(grid.numel() - 1):
        t0, t1 = float(grid[i]), float(grid[i + 1])
        h = t1 - t0
        v0 = _call(model, x, t0, class_labels)
        x_euler = x + h * v0
        if method == "euler":
            x = x_euler
        else:
            v1 = _call(model, x_euler, t1, class_labels)
            x = x + 0.5 * h * (v0 + v1)
    return x


def velocity_to_score(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``score = (t v - x_t) / (1 - t)`` for the linear interpolant (``t < 1`` required)."""
    te = _expand(t, x_t)
    if bool((te >= 1.0).any()):
        raise InvalidValueError("the score is undefined at t = 1 (data end); use a deterministic last step")
    return (te * v - x_t) / (1.0 - te)


def diffusion_coefficient(t: torch.Tensor, kind: str = "sigma", norm: float = 1.0) -> torch.Tensor:
    """Diffusion coefficient ``w(t)`` of the SDE (SiT's ``diffusion_form``), in the t = 0 noise convention.

    ``"constant"``: ``norm``; ``"sigma"``: ``norm * (1 - t)`` (the noise level; vanishes at the data end);
    ``"decreasing"``: ``norm * (1 - t)^2``. Any ``w >= 0`` leaves the marginals of the interpolant unchanged.
    """
    if norm < 0:
        raise InvalidValueError(f"norm must be non-negative, got {norm}")
    if kind == "constant":
        return torch.full_like(t, norm)
    if kind == "sigma":
        return norm * (1.0 - t)
    if kind == "decreasing":
        return norm * (1.0 - t) ** 2
    raise InvalidValueError(f"diffusion kind must be 'constant', 'sigma' or 'decreasing', got {kind!r}")


@torch.no_grad()
def sample_sde(
    model: Model,
    noise: torch.Tensor,
    class_labels: Optional[torch.Tensor],
    steps: int,
    generator: Optional[torch.Generator] = None,
    diffusion: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "sigma",
    diffusion_norm: float = 1.0,
    last_step_size: float = 0.04,
    shift: float = 1.0,
) -> torch.Tensor:
    """Euler–Maruyama for the marginal-preserving SDE (SiT)::

        dx = [v(x, t) + 0.5 * w(t) * score(x, t)] dt + sqrt(w(t)) dW,    score = (t v - x) / (1 - t),

    integrated over ``time_grid(steps, shift, t_end=1 - last_step_size)``, followed by one deterministic
    Euler step of the velocity from ``1 - last_step_size`` to ``1`` (the score is singular at ``t = 1``).
    ``diffusion`` is a name for ``diffusion_coefficient`` or a callable ``w(t)``; total model calls ``steps + 1``.
    """
    steps, shift = positive_int("steps", steps), finite_number("shift", shift)
    diffusion_norm = finite_number("diffusion_norm", diffusion_norm)
    if not 0.0 < last_step_size < 1.0:
        raise InvalidValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
    grid = time_grid(steps, shift, t_end=1.0 - last_step_size)
    x = noise
    for i in range(grid.numel() - 1):
        t0, h = float(grid[i]), float(grid[i + 1] - grid[i])
        t = torch.full((x.shape[0],), t0, dtype=x.dtype, device=x.device)
        v = model(x, t, class_labels)
        if callable(diffusion):
            w = diffusion(t)
        else:
            w = diffusion_coefficient(t, diffusion, diffusion_norm)
        w = _expand(w, x)
        if bool((w < 0).any()):
            raise InvalidValueError("diffusion coefficient w(t) must be non-negative")
        drift = v + 0.5 * w * velocity_to_score(v, x, t)
        dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * math.sqrt(h)
        x = x + h * drift + torch.sqrt(w) * dw
    t_last = float(grid[-1])
    return x + (1.0 - t_last) * _call(model, x, t_last, class_labels)


# ----------------------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------------------
def guided_model(
    model: Model,
    guidance_scale: float,
    interval: Optional[Tuple[float, float]] = None,
    weak_model: Optional[Model] = None,
    null_class: Optional[int] = None,
) -> Model:
    """Wrap ``model`` with guidance over ALL channels, returning a callable with the model signature.

    * CFG (``weak_model is None``): one call on the batch ``[x; x]`` with labels ``[y; null_class]``,
      ``v = v_u + s (v_c - v_u)``. ``null_class`` (e.g. ``num_classes`` for DiT) is required.
    * Autoguidance (``weak_model`` given): ``v = v_weak + s (v_main - v_weak)``, both conditional on ``y``.
    * ``interval = (t_lo, t_hi)``: guidance only for samples with ``t_lo <= t <= t_hi`` (SiT time, 0 = noise);
      elsewhere the plain conditional ``model`` output is returned.
    ``guidance_scale = 1`` reproduces the conditional model exactly.
    """
    guidance_scale = finite_number("guidance_scale", guidance_scale)
    if guidance_scale < 0:
        raise InvalidValueError(f"guidance_scale must be non-negative, got {guidance_scale}")
    if interval is not None:
        t_lo, t_hi = (finite_number("interval[0]", interval[0]), finite_number("interval[1]", interval[1]))
        if not 0.0 <= t_lo <= t_hi <= 1.0:
            raise InvalidValueError(f"interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")
    if weak_model is None and null_class is None:
        raise InvalidValueError("null_class is required for classifier-free guidance (weak_model is None)")

    def guided(x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        if weak_model is None:
            if class_labels is None:
                raise InvalidValueError("class_labels are required for classifier-free guidance")
            # Checked here, before the batch is doubled, so that errors name the caller's batch size.
            if not isinstance(class_labels, torch.Tensor) or tuple(class_labels.shape) != (x.shape[0],) or \
                    class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise InvalidValueError(
                    f"class_labels must be a ({x.shape[0]},) integer tensor, got "
                    f"{getattr(class_labels, 'shape', type(class_labels))}"
                    + (f" of dtype {class_labels.dtype}" if isinstance(class_labels, torch.Tensor) else ""))
            null = torch.full_like(class_labels, null_class)
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
            v_cond, v_ref = out.chunk(2)
        else:
            v_cond = model(x, t, class_labels)
            v_ref = weak_model(x, t, class_labels)
        v_guided = v_ref + guidance_scale * (v_cond - v_ref)
        if interval is None:
            return v_guided
        inside = _expand((t >= interval[0]) & (t <= interval[1]), x).bool()
        return torch.where(inside, v_guided, v_cond)

    return guided


# ----------------------------------------------------------------------------------------------------------------
# diffusers bridge
# ----------------------------------------------------------------------------------------------------------------
class FlowMatchAdamsBashforthScheduler(SchedulerMixin, ConfigMixin):
    """Second-order Adams-Bashforth multistep for the flow ODE, one model call per step (diffusers interface).

    diffusers' multistep solvers (DPM-Solver++, UniPC) step in log-SNR and take their last step to sigma = 0 at first
    order, which leaves their error at O(sigma_last) on a flow model. This one steps in sigma itself (the ODE the
    velocity defines, ``dx/dsigma = -v``) with the variable-step AB2 rule::

        x_{i+1} = x_i + h_i * ((1 + r / 2) d_i - (r / 2) d_{i-1}),   h_i = sigma_{i+1} - sigma_i,  r = h_i / h_{i-1},

    ``d`` the model output (``x0 - x1`` = ``-v``); the first step is Euler. Globally second order. The grid is
    FlowMatchEulerDiscreteScheduler's (``shift`` applied to the given or uniform sigmas, then a terminal 0), and
    ``timesteps = 1000 * sigma``.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._step_index = 0
        self._previous: Optional[torch.Tensor] = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[Sequence[float]] = None) -> None:
        if sigmas is None:
            steps = positive_int("num_inference_steps", num_inference_steps)
            sigmas = 1.0 - np.linspace(0.0, 1.0, steps + 1, dtype=np.float64)[:-1]
        sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        shift = float(self.config.shift)
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.timesteps = (sigmas * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self._step_index, self._previous = 0, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        i = self._step_index
        if i >= len(self.timesteps):
            raise InvalidValueError(f"step {i} past the {len(self.timesteps)} steps of the schedule")
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        h = sigma_next - sigma
        if self._previous is None:
            x = sample + h * model_output
        else:
            r = h / (sigma - float(self.sigmas[i - 1]))
            x = sample + h * ((1.0 + 0.5 * r) * model_output - 0.5 * r * self._previous)
        self._previous, self._step_index = model_output, i + 1
        x = x.to(sample.dtype)
        return (x,) if not return_dict else SchedulerOutput(prev_sample=x)


# Flow-matching schedulers of diffusers by name. Each entry: the class name, its settings (besides the shift) and the
# model calls per step. UniPC and DPM-Solver++ are diffusion solvers that take a flow-matching velocity with
# ``use_flow_sigmas=True, prediction_type="flow_prediction"`` (their shift is ``flow_shift``); they integrate the
# same ODE as Euler, in the exponential-integrator form, reusing the velocities of earlier steps (multistep).
FLOW_SCHEDULERS: dict = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "ab2": ("FlowMatchAdamsBashforthScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "unipc3": ("UniPCMultistepScheduler", {"solver_order": 3}),
}
_FLOW_SETTINGS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "final_sigmas_type": "zero"}


def flow_scheduler(name: str, shift: float = 1.0, num_train_timesteps: int = 1000):
    """The diffusers scheduler called ``name`` (a key of :data:`FLOW_SCHEDULERS`) set up for this suite's flow models
    with time shift ``shift``. ``"euler"`` is the same ODE solver as ``sample_ode(method="euler")``."""
    import diffusers

    if name not in FLOW_SCHEDULERS:
        raise InvalidValueError(f"flow sampler must be one of {sorted(FLOW_SCHEDULERS)}, got {name!r}")
    shift = finite_number("shift", shift)
    if shift <= 0:
        raise InvalidValueError(f"shift must be positive, got {shift}")
    class_name, settings = FLOW_SCHEDULERS[name]
    cls = FlowMatchAdamsBashforthScheduler if name == "ab2" else getattr(diffusers, class_name)
    if class_name.startswith("FlowMatch"):
        return cls(num_train_timesteps=num_train_timesteps, shift=shift, **settings)
    return cls(num_train_timesteps=num_train_timesteps, flow_shift=shift, **_FLOW_SETTINGS, **settings)


def scheduler_shift(scheduler) -> float:
    """The time shift a flow scheduler applies (``shift`` of the FlowMatch schedulers, ``flow_shift`` of the
    diffusion solvers run with flow sigmas)."""
    config = scheduler.config
    return float(config.get("shift", 1.0) if "FlowMatch" in type(scheduler).__name__ else config.get("flow_shift", 1.0))


def set_flow_timesteps(scheduler, steps: int, device=None, final_sigma: float = 0.0) -> None:
    """Uniform sigmas ``1, 1 - 1/N, ..., 1/N`` (then the scheduler's shift and terminal 0) where the scheduler takes
    explicit sigmas, else its own ``steps`` grid (DPM-Solver's starts at sigma 0.999, FlowMatchHeun's at 1).

    ``final_sigma > 0``: the grid ``1 - linspace(0, 1 - final_sigma, N + 1)`` keeps its last point, where the
    sampling stops (:func:`sample_with_scheduler` skips the scheduler's step to its appended 0): a release that
    stops early (VFMTok2: 99 steps ending at unshifted sigma 0.001) gives its own images only on its own grid."""
    import inspect

    steps = positive_int("steps", steps)
    if not 0.0 <= final_sigma < 1.0:
        raise InvalidValueError(f"final_sigma must be in [0, 1), got {final_sigma!r}")
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        grid = 1.0 - np.linspace(0.0, 1.0 - final_sigma, steps + 1, dtype=np.float64)  # UniPC needs an array
        scheduler.set_timesteps(sigmas=grid if final_sigma > 0 else grid[:-1], device=device)
    elif final_sigma > 0:
        raise InvalidValueError(f"scheduler {type(scheduler).__name__} takes no explicit sigmas, so it cannot end at "
                                f"final_sigma={final_sigma}; use FlowMatchEulerDiscreteScheduler")
    else:
        scheduler.set_timesteps(steps, device=device)


def scheduler_noise_levels(scheduler) -> list[float]:
    """The noise level ``sigma`` (1 = noise) of each model call of the schedule set by ``set_timesteps``: the
    scheduler's own ``sigmas`` where they match its timesteps one to one (all flow schedulers here), else
    ``timestep / num_train_timesteps``. The integer timesteps of the diffusion solvers are rounded, which would put
    the model at a slightly wrong time."""
    timesteps = scheduler.timesteps
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) >= len(timesteps) + 1:
        return [float(s) for s in sigmas[:len(timesteps)]]
    scale = float(scheduler.config.num_train_timesteps)
    return [float(t) / scale for t in timesteps]


@torch.no_grad()
def sample_with_scheduler(
    model: Model,
    noise: torch.Tensor,
    class_labels: Optional[torch.Tensor],
    scheduler,
    steps: int,
    on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    final_sigma: float = 0.0,
) -> torch.Tensor:
    """Integrate ``dx/dt = model(x, t, y)`` from noise to data with a diffusers flow scheduler (``steps`` steps of
    its schedule, ``len(scheduler.timesteps)`` model calls). The model is called at SiT time ``t = 1 - sigma`` and
    the scheduler gets ``-v`` (its ``x0 - x1`` convention). ``on_step(i, timestep, x)`` runs after each scheduler step
    and returns the (possibly replaced) sample. ``final_sigma > 0``: stop there (see :func:`set_flow_timesteps`)."""
    set_flow_timesteps(scheduler, steps, device=noise.device, final_sigma=final_sigma)
    steps_taken = list(zip(scheduler.timesteps, scheduler_noise_levels(scheduler)))
    if final_sigma > 0:  # the grid's last point is where it stops: no step to the scheduler's appended 0
        steps_taken = steps_taken[:-1]
    x = noise
    for i, (timestep, sigma) in enumerate(steps_taken):
        v = _call(model, x, 1.0 - sigma, class_labels)
        x = scheduler.step(-v, timestep, x, return_dict=False)[0]
        if on_step is not None:
            x = on_step(i, timestep, x)
    return x


def diffusers_flow_sampler(
    model: Model,
    noise: torch.Tensor,
    class_labels: Optional[torch.Tensor],
    steps: int,
    shift: float = 1.0,
) -> torch.Tensor:
    """The Euler ODE of ``sample_ode(method="euler")`` run through ``FlowMatchEulerDiscreteScheduler``."""
    steps = positive_int("steps", steps)
    return sample_with_scheduler(model, noise, class_labels, flow_scheduler("euler", shift), steps)


def repa_alignment_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """REPA (Yu et al. 2024): mean over tokens of 1 - cos(projected denoiser token, frozen-VFM feature of the same
    image region). ``projected`` (B, N, C) and ``features`` (B, M, C); when M != N both are square grids and the VFM
    grid is resized (bilinear) to the denoiser's."""
    if projected.shape[0] != features.shape[0] or projected.shape[-1] != features.shape[-1]:
        raise InvalidValueError(f"REPA needs (B, N, C) and (B, M, C) with equal B and C, got "
                                f"{tuple(projected.shape)} and "
                         f"{tuple(features.shape)}")
    n, m = projected.shape[1], features.shape[1]
    if n != m:
        side, source = math.isqrt(n), math.isqrt(m)
        if side * side != n or source * source != m:
            raise InvalidValueError(f"token counts {n} and {m} must both be square grids to be matched")
        grid = features.transpose(1, 2).reshape(features.shape[0], -1, source, source)
        features = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False)
        features = features.flatten(2).transpose(1, 2)
    cosine = F.cosine_similarity(projected.float(), features.float(), dim=-1, eps=1e-8)
    return (1 - cosine).mean()
