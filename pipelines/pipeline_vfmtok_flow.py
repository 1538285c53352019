"""Class-conditional generation with a continuous tokenizer and a flow-matching denoiser over its latents."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from vfmtok.generators.transport import (FLOW_SCHEDULERS, flow_scheduler, guided_model, sample_sde,
                                         sample_with_scheduler, scheduler_shift, set_flow_timesteps)
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError
from vfmtok.pipelines.pipeline_common import ClassLabels, VFMTokPipelineBase

__all__ = ["VFMTokFlowPipeline", "SAMPLERS", "check_flow_scheduler"]

# "scheduler": the pipeline's scheduler component; "sde": the project's Euler-Maruyama sampler; a name of
# FLOW_SCHEDULERS: that scheduler, built for this call with the component's time shift.
SAMPLERS = ("scheduler", "sde", *FLOW_SCHEDULERS)
# The sampler a new pipeline uses when a call names none (chosen from the NFE-vs-quality curve of
# `vfmtok speed flow-samplers`, README "Flow samplers"): quality of 50 Euler steps at a third of the model calls.
DEFAULT_SAMPLER = ("ab2", 16)
LEGACY_STEPS = 50  # num_inference_steps of a call to a pipeline saved without a default sampler
# Diffusion solvers that integrate a flow-matching velocity when set up with flow sigmas.
_FLOW_CAPABLE = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


# Scheduler settings this pipeline does not drive: dynamic shifting needs a ``mu`` per call, inverted sigmas run the
# other time direction.
_UNSUPPORTED_SETTINGS = ("use_dynamic_shifting", "invert_sigmas")


def check_flow_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler that does not fit the transformer's convention (a diffusers flow-matching scheduler: sigma
    from 1 = noise to 0 = data, model output ``-v``) or whose settings would not give such a schedule. UniPC and
    DPM-Solver(++) multistep fit when set up with ``use_flow_sigmas=True, prediction_type="flow_prediction"`` and the
    model's time shift as ``flow_shift``."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "step") or not (name.startswith("FlowMatch") or name in _FLOW_CAPABLE):
        raise InvalidValueError(
            f"the scheduler {name} is not a flow-matching scheduler: the transformer predicts a flow-matching "
            f"velocity (SiT convention); use a FlowMatch* scheduler, or {' / '.join(_FLOW_CAPABLE)} with flow sigmas")
    shift_key = "shift" if name.startswith("FlowMatch") else "flow_shift"
    if name in _FLOW_CAPABLE:
        how = (f"{name}.from_config(pipe.scheduler.config, use_flow_sigmas=True, prediction_type='flow_prediction', "
               f"flow_shift=<the model's shift>)")
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise InvalidValueError(f"scheduler {name} needs use_flow_sigmas=True and prediction_type="
                                    f"'flow_prediction' to integrate the flow velocity; use {how}")
        carried = config.get("shift")  # a FlowMatch config's shift, kept by from_config as an unused key
        if carried is not None and carried != config.get("flow_shift"):
            raise InvalidValueError(f"scheduler {name}: flow_shift {config.get('flow_shift')} differs from the shift "
                                    f"{carried} of the scheduler config it was made from; use {how}")
    shift = config.get(shift_key, 1.0)
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
        raise InvalidValueError(f"scheduler {name}: {shift_key} must be a finite number > 0, got {shift!r}")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InvalidValueError(f"scheduler {name}: num_train_timesteps must be a positive integer, got {steps!r}")
    for key in _UNSUPPORTED_SETTINGS:
        if config.get(key):
            raise InvalidValueError(f"scheduler {name}: {key}=True is not supported by this pipeline")


def _check_sigmas(scheduler: Any) -> None:
    """The schedule the settings gave: finite sigmas decreasing from at most 1 to 0."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        return
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    decreasing = bool((sigmas[1:] <= sigmas[:-1]).all())
    if (not bool(torch.isfinite(sigmas).all()) or not decreasing or float(sigmas[0]) > 1 + 1e-6
            or float(sigmas[-1]) != 0.0):
        raise InvalidValueError(f"scheduler {type(scheduler).__name__}: its settings {dict(scheduler.config)} give "
                                f"the sigmas {sigmas[:6].tolist()}..., not a schedule decreasing from at most 1 to 0")


class VFMTokFlowPipeline(VFMTokPipelineBase):
    """``vae`` (any continuous tokenizer of the interface) + ``transformer`` (a :class:`vfmtok.generators.DiTModel`,
    SiT convention, with the latent statistics it was trained with) + ``scheduler`` (a diffusers flow-matching
    scheduler; FlowMatchEulerDiscreteScheduler by default, FlowMatchHeunDiscreteScheduler works too) and an optional
    ``weak_transformer`` for autoguidance (``scheduler=None`` builds the default). Scheduler time ``sigma`` is SiT's ``1 - t``; its model output is ``-v``."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["weak_transformer"]
    _image_tokenizer_name = "vae"
    _raw_output_type = "latent"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae, transformer, scheduler, weak_transformer=None, id2label: Optional[dict] = None,
                 evaluation: Optional[dict] = None, default_guidance_scale: Optional[float] = None,
                 default_guidance_interval: Optional[Sequence[float]] = None,
                 default_num_inference_steps: Optional[int] = None, final_sigma: float = 0.0,
                 source: Optional[dict] = None, default_sampler: Optional[dict[str, Any]] = None):
        super().__init__()
        if getattr(vae, "is_discrete", True):
            raise CheckpointError(f"the flow pipeline needs a continuous tokenizer (latents); {type(vae).__name__} "
                                  f"encodes to discrete codes")
        for name, model in (("transformer", transformer), ("weak_transformer", weak_transformer)):
            if model is not None and tuple(vae.latent_shape) != tuple(model.latent_shape):
                raise CheckpointError(f"the tokenizer's latent shape {list(vae.latent_shape)} does not fit the "
                                      f"{name}'s latent shape {list(model.latent_shape)}")
        if weak_transformer is not None and weak_transformer.config.num_classes != transformer.config.num_classes:
            raise CheckpointError(f"weak_transformer has {weak_transformer.config.num_classes} classes, transformer "
                                  f"{transformer.config.num_classes}")
        if scheduler is None:  # a new pipeline: the stock scheduler, sampled by the default sampler
            scheduler = FlowMatchEulerDiscreteScheduler()
            default_sampler = default_sampler if default_sampler is not None else list(DEFAULT_SAMPLER)
        check_flow_scheduler(scheduler)
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler,
                              weak_transformer=weak_transformer)
        self._register_labels(id2label, evaluation, transformer.config.num_classes,
                             default_guidance_scale)
        self.set_default_guidance_interval(default_guidance_interval)
        self.set_sampling_protocol(default_num_inference_steps, final_sigma)
        self.set_source(source)
        self.set_default_sampler(default_sampler)

    def set_sampling_protocol(self, num_inference_steps: Optional[int] = None, final_sigma: float = 0.0) -> None:
        """The steps a call takes when given none (None: 50) and where the Euler grid ends (both saved with the
        pipeline): the unshifted noise levels are ``1 - linspace(0, 1 - final_sigma, steps + 1)``, shifted by the
        scheduler's ``shift``; ``final_sigma = 0`` integrates to the data. A release that stops early, as VFMTok2
        (99 steps over ``1 - linspace(0, 0.999, 100)``, shift 4, ending at sigma 0.004), gives its own images only
        with its own grid, so a converted release stores it here. ``final_sigma`` concerns ``sampler="scheduler"``;
        the SDE sampler ends with its own deterministic last step."""
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
                num_inference_steps, int) or num_inference_steps < 1):
            raise InvalidValueError(f"default_num_inference_steps must be a positive integer or None, got "
                                    f"{num_inference_steps!r}")
        if (isinstance(final_sigma, bool) or not isinstance(final_sigma, numbers.Real)
                or not 0.0 <= final_sigma < 1.0):
            raise InvalidValueError(f"final_sigma must be a number in [0, 1) (the unshifted noise level the Euler "
                                    f"grid ends at), got {final_sigma!r}")
        self.register_to_config(default_num_inference_steps=num_inference_steps, final_sigma=float(final_sigma))

    @property
    def sampling_protocol(self) -> dict[str, Any]:
        """The settings a call uses by default: what a benchmark records as its sampling protocol."""
        return self.describe_sampling()

    def describe_sampling(self, sampler: Optional[str] = None,
                          num_inference_steps: Optional[int] = None) -> dict[str, Any]:
        """The sampler, steps, scheduler, shift and end of the grid a call with these arguments uses."""
        sampler, steps = self._resolve_sampler(sampler, num_inference_steps)
        scheduler = FLOW_SCHEDULERS[sampler][0] if sampler in FLOW_SCHEDULERS else type(self.scheduler).__name__
        return {"sampler": sampler, "num_inference_steps": steps, "scheduler": scheduler,
                "shift": scheduler_shift(self.scheduler),
                "final_sigma": self.config.get("final_sigma", 0.0) if sampler == "scheduler" else 0.0,
                "guidance_interval": self.config.get("default_guidance_interval"),
                "guidance": "autoguidance (weak_transformer)" if self.weak_transformer is not None else "cfg"}

    def set_default_sampler(self, sampler: Optional[Sequence[Any]]) -> None:
        """``[name, num_inference_steps]`` (saved as ``{"name", "steps"}``): the solver of :data:`FLOW_SCHEDULERS` and step count a call uses when
        given no ``sampler``; saved with the pipeline. Setting ``pipe.scheduler`` (the diffusers way) clears it, so
        that the scheduler set is the one used. None: the scheduler component, 50 steps (also pipelines saved before
        there was a default sampler)."""
        if sampler is not None:
            # Saved as a dict: a [library, class] list in model_index.json is what diffusers reads as a component.
            pair = (sampler.get("name"), sampler.get("steps")) if isinstance(sampler, dict) else sampler
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[0] in FLOW_SCHEDULERS
                    and isinstance(pair[1], int) and not isinstance(pair[1], bool) and pair[1] >= 1):
                raise InvalidValueError(f"default_sampler must be [name, steps] with a name of "
                                        f"{sorted(FLOW_SCHEDULERS)} and steps >= 1, got {sampler!r}")
            sampler = {"name": pair[0], "steps": int(pair[1])}
        self.register_to_config(default_sampler=sampler)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "scheduler" and self.config.get("default_sampler") is not None:
            self.register_to_config(default_sampler=None)  # a scheduler set by hand is the sampler from now on

    def _resolve_sampler(self, sampler: Optional[str], steps: Optional[int]) -> tuple[str, int]:
        default = self.config.get("default_sampler")
        if sampler is None:
            if default is not None:
                return default["name"], default["steps"] if steps is None else steps
            sampler = "scheduler"
        if steps is None:
            if default is not None and sampler == default["name"]:
                steps = default["steps"]
            elif sampler == "scheduler":  # a converted release's grid (set_sampling_protocol), else 50
                steps = self.config.get("default_num_inference_steps") or LEGACY_STEPS
            else:
                steps = LEGACY_STEPS
        return sampler, steps

    def set_default_guidance_interval(self, interval: Optional[Sequence[float]]) -> None:
        """The ``guidance_interval`` a call uses when given none (saved with the pipeline); None: guidance at every
        step."""
        if interval is not None:
            if not (isinstance(interval, (list, tuple)) and len(interval) == 2 and all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in interval)
                    and 0 <= interval[0] <= interval[1] <= 1):
                raise InvalidValueError(f"default_guidance_interval must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 "
                                        f"(SiT time, 0 = noise), got {interval!r}")
            interval = [float(v) for v in interval]
        self.register_to_config(default_guidance_interval=interval)

    def _velocity(self, guidance_scale: float, guidance_interval: Optional[tuple[float, float]]) -> Callable:
        """The (guided) velocity ``v(x, t, y)`` in SiT time."""
        def model(x, t, y):
            return self.transformer(x, t.to(x.dtype), y)

        if guidance_scale == 1.0:
            return model
        weak = None
        if self.weak_transformer is not None:
            def weak(x, t, y):
                return self.weak_transformer(x, t.to(x.dtype), y)
        return guided_model(model, guidance_scale, interval=guidance_interval, weak_model=weak,
                            null_class=self.transformer.null_class)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_interval: Optional[tuple[float, float]] = None,
        sampler: Optional[str] = None,
        num_images_per_class: int = 1,
        batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        output_size: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Any:
        """Sample images of ``class_labels`` (ids, names, a list or a tensor of them).

        ``num_inference_steps``: None = the pipeline's ``default_num_inference_steps`` (else 50); the grid ends at
        its ``final_sigma`` (see :meth:`set_sampling_protocol`).
        ``guidance_scale``: CFG (or autoguidance with ``weak_transformer``), 1 = none, None = the pipeline's
        ``default_guidance_scale`` (else 1); ``guidance_interval``
        ``(t_lo, t_hi)`` in SiT time (0 = noise) limits it (None: the pipeline's ``default_guidance_interval``, else
        every step). ``sampler`` (None: the pipeline's ``default_sampler`` with its steps, else "scheduler"; ``num_inference_steps`` None: the default sampler's
        steps, else 50): "scheduler" (the ``scheduler`` component,
        ``num_inference_steps`` steps; callback after each scheduler step with ``{"latents": ...}``), "sde"
        (the project's Euler–Maruyama SDE sampler, ``num_inference_steps`` + 1 model calls, shift from the
        scheduler config; no callback) or the name of a flow scheduler of
        :data:`vfmtok.generators.transport.FLOW_SCHEDULERS` ("euler", "ab2", "heun", "dpm++2m", "unipc", ...), built
        for this call with the scheduler component's shift (the component is left as it is). Labels are repeated ``num_images_per_class`` times and sampled in chunks
        of ``batch_size``. ``output_type`` "pil", "np", "pt" (in [0, 1]) or "latent" (the tokenizer's latents).
        """
        guidance_scale = self.resolve_guidance_scale(guidance_scale)
        self._check_call(guidance_scale, num_images_per_class, batch_size, output_type, output_size,
                         callback_on_step_end, callback_on_step_end_tensor_inputs)
        check_flow_scheduler(self.scheduler)  # it may have been swapped since (pipe.scheduler = ...)
        if sampler is not None and sampler not in SAMPLERS:
            raise InvalidValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        sampler, num_inference_steps = self._resolve_sampler(sampler, num_inference_steps)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InvalidValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if sampler not in SAMPLERS:
            raise InvalidValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "sde" and callback_on_step_end is not None:
            raise InvalidValueError("callback_on_step_end works with sampler='scheduler' only")
        if guidance_interval is None and self.config.get("default_guidance_interval") is not None:
            guidance_interval = tuple(self.config.default_guidance_interval)
        velocity = self._velocity(guidance_scale, guidance_interval)  # checks the interval
        scheduler = self.scheduler
        # a converted release's grid ends early (set_sampling_protocol); it concerns the pipeline's own scheduler
        final_sigma = float(self.config.get("final_sigma", 0.0)) if sampler == "scheduler" else 0.0
        if sampler in FLOW_SCHEDULERS:
            scheduler = flow_scheduler(sampler, scheduler_shift(self.scheduler),
                                       self.scheduler.config.get("num_train_timesteps", 1000))

        def sample_chunk(labels: torch.Tensor) -> torch.Tensor:
            shape = (len(labels), *self.transformer.latent_shape)
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.transformer.dtype)
            if sampler == "sde":
                latents = sample_sde(velocity, latents, labels, num_inference_steps, generator=generator,
                                     shift=scheduler_shift(self.scheduler))
            else:
                latents = self._scheduler_loop(scheduler, velocity, latents, labels, num_inference_steps,
                                               callback_on_step_end, callback_on_step_end_tensor_inputs, final_sigma)
            return self.transformer.denormalize_latents(latents).to(self.vae.dtype)

        settings = {"guidance_scale": guidance_scale, "sampler": sampler, "num_inference_steps": num_inference_steps,
                    "scheduler": type(scheduler).__name__, "shift": scheduler_shift(scheduler),
                    "final_sigma": final_sigma}
        return self._generate(class_labels, num_images_per_class, batch_size, output_type, output_size,
                              return_dict, sample_chunk, settings)

    def _scheduler_loop(self, scheduler: Any, velocity: Callable, latents: torch.Tensor, labels: torch.Tensor,
                        steps: int, callback: Optional[Callable], tensor_inputs: Sequence[str],
                        final_sigma: float = 0.0) -> torch.Tensor:
        # sample_with_scheduler sets the same grid again; set here to check it and size the progress bar
        set_flow_timesteps(scheduler, steps, device=latents.device, final_sigma=final_sigma)
        _check_sigmas(scheduler)
        with self.progress_bar(total=len(scheduler.timesteps) - (final_sigma > 0)) as progress:
            def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
                progress.update()
                return self._run_callback(callback, self, i, t, {"latents": latents}, tensor_inputs)["latents"]

            return sample_with_scheduler(velocity, latents, labels, scheduler, steps, on_step=on_step,
                                         final_sigma=final_sigma)
