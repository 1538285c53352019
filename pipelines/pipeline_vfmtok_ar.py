"""Class-conditional generation with a discrete tokenizer and an autoregressive generator over its codes (any family
of :class:`vfmtok.generators.interface.AutoregressiveGeneratorMixin`: the LlamaGen-style GPT, RAR)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from vfmtok.generators.interface import SAMPLING_OPTIONS, AutoregressiveGeneratorMixin
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError
from vfmtok.pipelines.pipeline_common import ClassLabels, VFMTokPipelineBase

__all__ = ["VFMTokARPipeline"]


class VFMTokARPipeline(VFMTokPipelineBase):
    """``vqvae`` (any discrete tokenizer of the interface) + ``transformer`` (any autoregressive generator of the
    interface over its codes: :class:`vfmtok.generators.GPTModel`, :class:`vfmtok.generators.RARModel`).
    ``pipe(207)`` returns an ``ImagePipelineOutput`` with one image of class 207.

    Sampler options a call leaves None come from ``default_sampler_options`` (saved with the pipeline, e.g. the
    settings behind a release's published numbers), else from the generator family's ``default_sampling``."""

    model_cpu_offload_seq = "transformer->vqvae"
    _image_tokenizer_name = "vqvae"
    _raw_output_type = "codes"
    _callback_tensor_inputs = ["codes"]

    def __init__(self, vqvae, transformer, id2label: Optional[dict] = None, evaluation: Optional[dict] = None,
                 default_guidance_scale: Optional[float] = None, resize_antialias: bool = True,
                 default_output_size: Optional[int] = None, source: Optional[dict] = None,
                 default_sampler_options: Optional[dict[str, Any]] = None):
        super().__init__()
        if not isinstance(transformer, AutoregressiveGeneratorMixin):
            raise CheckpointError(f"the AR pipeline needs an autoregressive generator over codes; "
                                  f"{type(transformer).__name__} is not one")
        if not getattr(vqvae, "is_discrete", False):
            raise CheckpointError(f"the AR pipeline needs a discrete tokenizer (codes); {type(vqvae).__name__} "
                                  f"encodes to continuous latents")
        layout, config = vqvae.code_layout, transformer.config
        if (layout.vocab_size, layout.num_tokens) != (config.vocab_size, config.num_tokens):
            raise CheckpointError(f"the tokenizer's codes (vocab_size {layout.vocab_size}, num_tokens "
                                  f"{layout.num_tokens}) do not fit the {type(transformer).__name__} (vocab_size "
                                  f"{config.vocab_size}, num_tokens {config.num_tokens})")
        if tuple(layout.codebook_sizes) != transformer.codebook_sizes:
            raise CheckpointError(f"the tokenizer's codebooks {list(layout.codebook_sizes)} do not match the "
                                  f"{type(transformer).__name__}'s codebook_sizes {list(transformer.codebook_sizes)} "
                                  f"(one code per codebook and grid cell)")
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self._register_labels(id2label, evaluation, config.num_classes, default_guidance_scale)
        self.set_resize_protocol(resize_antialias, default_output_size)
        self.set_source(source)
        self.set_default_sampler_options(default_sampler_options)

    def set_resize_protocol(self, antialias: bool = True, output_size: Optional[int] = None) -> None:
        """How images are resized when a call asks for another size (``antialias``: bicubic with antialiasing, else
        plain bicubic ``F.interpolate`` as the VFMTok release's ``test_net.py``, which changes uint8 pixels by up
        to 20), and the ``output_size`` a call uses when given none (None: the tokenizer's own size). Saved."""
        if not isinstance(antialias, bool):
            raise InvalidValueError(f"resize_antialias must be True or False, got {antialias!r}")
        if output_size is not None and (isinstance(output_size, bool) or not isinstance(output_size, int)
                                        or output_size < 1):
            raise InvalidValueError(f"default_output_size must be a positive integer or None, got {output_size!r}")
        self.register_to_config(resize_antialias=antialias, default_output_size=output_size)

    @property
    def sampling_protocol(self) -> dict:
        """The settings a call uses by default: what a benchmark records as its sampling protocol."""
        return {"resize": "bicubic, antialiased" if self.config.get("resize_antialias", True)
                else "bicubic F.interpolate, no antialiasing (as the release's evaluation)",
                "output_size": self.config.get("default_output_size") or self.vqvae.output_size}

    def set_default_sampler_options(self, options: Optional[dict[str, Any]]) -> None:
        """The sampler options (``guidance_schedule``, ``guidance_power``, ``guidance_interval``, ``temperature``,
        ``top_k``, ``top_p``) ``pipe(...)`` uses when given none (saved with the pipeline); None: the generator's."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise InvalidValueError(f"unknown sampler option(s) {unknown}; known: {list(SAMPLING_OPTIONS)}")
        resolved = self.transformer.sampling_options(**options)
        self.transformer.guidance_scales(1.0, resolved["guidance_schedule"], resolved["guidance_power"],
                                         resolved["guidance_interval"])
        self.transformer._check_sampler(resolved["temperature"], resolved["top_k"], resolved["top_p"])
        self.register_to_config(default_sampler_options=options or None)

    def sampler_defaults(self) -> dict[str, Any]:
        """The sampler options a call uses for those it leaves None."""
        return self.transformer.sampling_options(**(self.config.get("default_sampler_options") or {}))

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels,
        guidance_scale: Optional[float] = None,
        guidance_schedule: Optional[str] = None,
        guidance_power: Optional[float] = None,
        guidance_interval: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        num_images_per_class: int = 1,
        batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        output_size: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_kv_cache: bool = True,
        sjd_window: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("codes",),
    ) -> Any:
        """Sample images of ``class_labels`` (ids, names, a list or a tensor of them).

        ``guidance_*``, ``temperature``, ``top_k``, ``top_p``: as the generator's ``generate``
        (``guidance_scale = 1`` is no guidance; None: the pipeline's ``default_guidance_scale``, else 1; the other
        options left None: :meth:`sampler_defaults`). ``sjd_window``: speculative Jacobi decoding with that many draft
        tokens per step (the same distribution in fewer model calls; no callback; generators whose
        ``supports_sjd`` is true). Labels are repeated ``num_images_per_class`` times and sampled in
        chunks of ``batch_size`` (default: all at once); the callback runs after every sampled token (step = token
        index in the chunk, ``t`` = the same) with ``{"codes": (B, num_tokens)}`` (not yet sampled positions 0) and
        may return replaced codes, which the following tokens condition on. ``output_size`` is the
        decoded side (default: the tokenizer's); ``output_type`` "pil", "np", "pt" (in [0, 1]) or "codes".
        """
        guidance_scale = self.resolve_guidance_scale(guidance_scale)
        self._check_call(guidance_scale, num_images_per_class, batch_size, output_type, output_size,
                         callback_on_step_end, callback_on_step_end_tensor_inputs)
        options = {**self.sampler_defaults(), **{k: v for k, v in dict(
            guidance_schedule=guidance_schedule, guidance_power=guidance_power, guidance_interval=guidance_interval,
            temperature=temperature, top_k=top_k, top_p=top_p).items() if v is not None}}
        self.transformer.guidance_scales(guidance_scale, options["guidance_schedule"], options["guidance_power"],
                                         options["guidance_interval"])
        sjd = {} if sjd_window is None else {"sjd_window": sjd_window}
        if sjd and not self.transformer.supports_sjd:
            raise InvalidValueError(f"sjd_window: {type(self.transformer).__name__} does not implement speculative "
                                    f"Jacobi decoding (GPTModel and RARModel do); leave sjd_window out")
        chunks = []

        def on_token(t: int, codes: torch.Tensor) -> torch.Tensor:
            return self._run_callback(callback_on_step_end, self, t, t, {"codes": codes},
                                      callback_on_step_end_tensor_inputs)["codes"]

        def sample_chunk(labels: torch.Tensor) -> torch.Tensor:
            codes = self.transformer.generate(
                labels, guidance_scale=guidance_scale, **options, generator=generator, use_kv_cache=use_kv_cache,
                step_callback=on_token if callback_on_step_end is not None else None, **sjd)
            self.vqvae.check_tokens(codes)
            chunks.append(len(codes))
            progress.update()
            return codes

        total = num_images_per_class * len(self.resolve_class_labels(class_labels))
        with self.progress_bar(total=-(-total // (batch_size or total))) as progress:
            return self._generate(class_labels, num_images_per_class, batch_size, output_type, output_size,
                                  return_dict, sample_chunk)
