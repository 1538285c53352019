"""Class-conditional generation with a discrete tokenizer and an autoregressive GPT over its codes."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from vfmtok.tokenizer.utils.errors import CheckpointError
from vfmtok.pipelines.pipeline_common import ClassLabels, VFMTokPipelineBase

__all__ = ["VFMTokARPipeline"]


class VFMTokARPipeline(VFMTokPipelineBase):
    """``vqvae`` (any discrete tokenizer of the interface) + ``transformer`` (a :class:`vfmtok.generators.GPTModel` over its
    codes). ``pipe(207)`` returns an ``ImagePipelineOutput`` with one image of class 207."""

    model_cpu_offload_seq = "transformer->vqvae"
    _image_tokenizer_name = "vqvae"
    _raw_output_type = "codes"
    _callback_tensor_inputs = ["codes"]

    def __init__(self, vqvae, transformer, id2label: Optional[dict] = None, evaluation: Optional[dict] = None,
                 default_guidance_scale: Optional[float] = None):
        super().__init__()
        if not getattr(vqvae, "is_discrete", False):
            raise CheckpointError(f"the AR pipeline needs a discrete tokenizer (codes); {type(vqvae).__name__} "
                                  f"encodes to continuous latents")
        layout, config = vqvae.code_layout, transformer.config
        if (layout.vocab_size, layout.num_tokens) != (config.vocab_size, config.num_tokens):
            raise CheckpointError(f"the tokenizer's codes (vocab_size {layout.vocab_size}, num_tokens "
                                  f"{layout.num_tokens}) do not fit the GPT (vocab_size {config.vocab_size}, "
                                  f"num_tokens {config.num_tokens})")
        gpt_sizes = tuple(config.get("codebook_sizes") or (config.vocab_size,))
        if tuple(layout.codebook_sizes) != gpt_sizes:
            raise CheckpointError(f"the tokenizer's codebooks {list(layout.codebook_sizes)} do not match the GPT's "
                                  f"codebook_sizes {list(gpt_sizes)} (one code per codebook and grid cell)")
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self._register_labels(id2label, evaluation, config.num_classes, default_guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels,
        guidance_scale: Optional[float] = None,
        guidance_schedule: str = "constant",
        guidance_power: float = 2.75,
        guidance_interval: Optional[int] = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
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

        ``guidance_*``, ``temperature``, ``top_k``, ``top_p``, ``sjd_window`` (speculative Jacobi decoding with that
        many draft tokens per step: the same distribution in fewer model calls; no callback): as
        :meth:`vfmtok.generators.GPTModel.generate`
        (``guidance_scale = 1`` is no guidance; None: the pipeline's ``default_guidance_scale``, else 1). Labels are repeated ``num_images_per_class`` times and sampled in
        chunks of ``batch_size`` (default: all at once); the callback runs after every sampled token (step = token
        index in the chunk, ``t`` = the same) with ``{"codes": (B, num_tokens)}`` (not yet sampled positions 0) and
        may return replaced codes, which the following tokens condition on. ``output_size`` is the
        decoded side (default: the tokenizer's); ``output_type`` "pil", "np", "pt" (in [0, 1]) or "codes".
        """
        guidance_scale = self.resolve_guidance_scale(guidance_scale)
        self._check_call(guidance_scale, num_images_per_class, batch_size, output_type, output_size,
                         callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.transformer.guidance_scales(guidance_scale, guidance_schedule, guidance_power, guidance_interval)
        chunks = []

        def on_token(t: int, codes: torch.Tensor) -> torch.Tensor:
            return self._run_callback(callback_on_step_end, self, t, t, {"codes": codes},
                                      callback_on_step_end_tensor_inputs)["codes"]

        def sample_chunk(labels: torch.Tensor) -> torch.Tensor:
            codes = self.transformer.generate(
                labels, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                guidance_power=guidance_power, guidance_interval=guidance_interval, temperature=temperature,
                top_k=top_k, top_p=top_p, generator=generator, use_kv_cache=use_kv_cache,
                step_callback=on_token if callback_on_step_end is not None else None, sjd_window=sjd_window)
            self.vqvae.check_tokens(codes)
            chunks.append(len(codes))
            progress.update()
            return codes

        total = num_images_per_class * len(self.resolve_class_labels(class_labels))
        with self.progress_bar(total=-(-total // (batch_size or total))) as progress:
            return self._generate(class_labels, num_images_per_class, batch_size, output_type, output_size,
                                  return_dict, sample_chunk)
