"""``vfmtok convert pipeline``: a pipeline folder from the official releases, through the existing converters.

* ``ar``: a VFMTok tokenizer checkpoint (CVMI-Lab/VFMTok ``VQModel``, :mod:`vfmtok.tokenizer.convert`) and a VFMTok / LlamaGen
  GPT checkpoint (:mod:`vfmtok.generators.convert_gpt`) -> :class:`VFMTokARPipeline`;
* a RAR release (:func:`convert_rar_release`; the release facts are data in :mod:`vfmtok.generators.convert_rar`): the
  VFMTok tokenizer and a RAR ``.safetensors`` -> :class:`VFMTokARPipeline` sampling as behind the published numbers;
* ``flow``: a VFMAE checkpoint (CVMI-Lab/VFMTok2 ``AutoencoderAE``) and a DiT^DH or LightningDiT checkpoint
  (:mod:`vfmtok.generators.convert_dit`; which one the generator config says: a head or none), with the latent
  statistics file the release ships -> :class:`VFMTokFlowPipeline`.

Each model is built from the matching config file, loaded strictly, and the pipeline checks that the two fit. The
pipeline samples by default as the release's own evaluation does (``release_protocol``; see
:data:`vfmtok.pipelines.official.PROTOCOLS`): VFMTok2's 99 shifted Euler steps ending at sigma 0.004, VFMTok's plain
bicubic 336 -> 256 resize. ``vfmtok convert pipeline --official NAME`` (:mod:`vfmtok.pipelines.official`) does
all of it from a release's name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vfmtok.tokenizer.utils.atomic import atomic_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError, OutputExistsError
from vfmtok.pipelines.config import build_model

__all__ = ["convert_official_pipeline", "assemble_pipeline", "convert_rar_release"]


def assemble_pipeline(tokenizer, generator, id2label: Optional[dict] = None, evaluation: Optional[dict] = None,
                      weak_generator=None):
    """The pipeline for a tokenizer and a generator: :class:`VFMTokARPipeline` for an autoregressive generator (GPT,
    RAR) over codes,
    :class:`VFMTokFlowPipeline` (diffusers' default flow scheduler) for a denoiser over latents. The pipeline checks
    that the two fit (a continuous tokenizer under a GPT is refused there, naming both)."""
    from vfmtok.generators.interface import AutoregressiveGeneratorMixin

    if isinstance(generator, AutoregressiveGeneratorMixin):
        from vfmtok.pipelines.pipeline_vfmtok_ar import VFMTokARPipeline

        if weak_generator is not None:
            raise InvalidValueError("a weak generator (autoguidance) belongs to a flow pipeline")
        return VFMTokARPipeline(tokenizer.eval(), generator.eval(), id2label=id2label, evaluation=evaluation)
    from vfmtok.pipelines.pipeline_vfmtok_flow import VFMTokFlowPipeline

    return VFMTokFlowPipeline(tokenizer.eval(), generator.eval(), None,
                              weak_generator.eval() if weak_generator is not None else None, id2label=id2label,
                              evaluation=evaluation)


def convert_official_pipeline(kind: str, tokenizer_checkpoint: str, tokenizer_config: str, generator_checkpoint: str,
                              generator_config: str, output_dir: str | Path, latent_stats: Optional[str] = None,
                              prefer: str = "ema", release_protocol: bool = True,
                              stats_convention: str = "vfmtok2") -> Path:
    """Convert both checkpoints and save the pipeline (``save_pretrained``, atomically) into ``output_dir``.

    ``release_protocol``: the pipeline's defaults are the release's sampling protocol (else this project's: 50
    steps, shift 1, antialiased resize). ``stats_convention``: how ``latent_stats``' ``var`` is read
    (:data:`vfmtok.generators.convert_dit.STATS_CONVENTIONS`; the flow releases are VFMTok2's)."""
    from vfmtok.pipelines.official import apply_protocol

    from vfmtok.generators.convert_dit import convert_ddt_checkpoint, convert_lightningdit_checkpoint
    from vfmtok.generators.convert_gpt import convert_llamagen_checkpoint
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    if kind not in ("ar", "flow"):
        raise InvalidValueError(f"kind must be 'ar' or 'flow', got {kind!r}")
    if kind == "ar" and latent_stats is not None:
        raise InvalidValueError("--latent-stats belongs to a flow pipeline (the denoiser's latent statistics)")
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        raise OutputExistsError(f"output directory {str(output)!r} already exists and is not empty")
    tokenizer = build_model(tokenizer_config)
    convert_reference_checkpoint(tokenizer_checkpoint, tokenizer, prefer=prefer)
    generator = build_model(generator_config)
    if kind == "ar":
        convert_llamagen_checkpoint(generator_checkpoint, generator, prefer=prefer)
    else:
        # a config with a head is DiT^DH (DiTwDDTHead), one without VFMTok2's LightningDiT
        convert = convert_ddt_checkpoint if generator.config.head_depth else convert_lightningdit_checkpoint
        convert(generator_checkpoint, generator, prefer=prefer, latent_stats=latent_stats,
                stats_convention=stats_convention)
    pipe = assemble_pipeline(tokenizer, generator)
    if release_protocol:
        apply_protocol(pipe, "vfmtok-ar" if kind == "ar" else "vfmtok2-flow")
    with atomic_directory(output) as staging:
        pipe.save_pretrained(staging)
    return output


def convert_rar_release(name: str, tokenizer_checkpoint: str | Path, generator_checkpoint: str | Path,
                        output_dir: Optional[str | Path] = None, tokenizer_config: Optional[str] = None,
                        generator_config: Optional[str] = None, prefer: str = "ema"):
    """One VFMTok-RAR release (``RAR-L-ultra``, ``RAR-L``, ``RAR-XL``, ``RAR-XXL``; see
    :data:`vfmtok.generators.convert_rar.RAR_RELEASES`) from its downloaded files (``DINOv2/tokenizer/
    vfmtok-tokenizer.pt`` and the generator's ``.safetensors``) -> a :class:`VFMTokARPipeline` whose defaults are the
    sampling behind the published gFID with CFG (``pipe(...)``; ``guidance_scale=1`` gives the CFG-free numbers' setting)
    and whose model card holds the published numbers. Saved (atomically) into ``output_dir`` when given. The configs
    default to the release's (``tokenizer_config`` / ``generator_config`` replace them, e.g. tiny ones in tests)."""
    from vfmtok.generators.convert_rar import (RAR_RELEASES, TOKENIZER_RELEASE, convert_rar_checkpoint,
                                               release_evaluation)
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    if name not in RAR_RELEASES:
        raise InvalidValueError(f"unknown RAR release {name!r}; known: {sorted(RAR_RELEASES)}")
    release = RAR_RELEASES[name]
    output = Path(output_dir) if output_dir is not None else None
    if output is not None and output.exists() and any(output.iterdir()):
        raise OutputExistsError(f"output directory {str(output)!r} already exists and is not empty")
    tokenizer = build_model(tokenizer_config or TOKENIZER_RELEASE["config"])
    convert_reference_checkpoint(tokenizer_checkpoint, tokenizer, prefer=prefer)
    generator = build_model(generator_config or release["config"])
    convert_rar_checkpoint(generator_checkpoint, generator, prefer=prefer)
    pipe = assemble_pipeline(tokenizer, generator, evaluation=release_evaluation(name))
    pipe.set_resize_protocol(antialias=False, output_size=256)  # test_net.py's 336 -> 256 (decode_tokens)
    sampling = dict(release["sampling"])
    pipe.set_default_guidance_scale(sampling.pop("guidance_scale"))
    pipe.set_default_sampler_options(sampling)
    if output is not None:
        with atomic_directory(output) as staging:
            pipe.save_pretrained(staging)
    return pipe
