"""Throughput measurements behind ``vfmtok speed``: one JSON-ready dict per measured mode.

Timings synchronise the device around each measured window and report the median over windows, so a noisy machine
shows up as spread between runs rather than as a biased figure; compare figures taken in one run.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vfmtok.pipelines.config import build_model, load_config
from vfmtok.tokenizer.utils.errors import InvalidValueError
from vfmtok.tokenizer.utils.foreign import reference_vfmtok_package

__all__ = ["speed_tokenizer", "speed_ar", "speed_flow", "speed_eval", "time_call", "compare_reference_tokenizer"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int, windows: int = 3) -> float:
    """Median seconds per call of ``fn`` over ``windows`` windows of ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    per_call = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        per_call.append((time.perf_counter() - start) / steps)
    return statistics.median(per_call)


def _check_device(device: str) -> torch.device:
    device_t = torch.device(device)
    if device_t.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError("--device cuda was given but no CUDA device is available")
    return device_t


def _build_for_speed(config_path: str, device: str, precision: str | None, batch_size: int
                     ) -> tuple[torch.nn.Module, torch.device, str, dict[str, Any]]:
    """The shared set-up of every measurement: checked arguments, the config's model with seeded random weights
    on the device, and the fields every result row carries."""
    device_t = _check_device(device)
    precision = precision or ("bf16" if device_t.type == "cuda" else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise InvalidValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if batch_size < 1:
        raise InvalidValueError(f"batch size must be >= 1, got {batch_size}")
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config).to(device_t)
    common = {"config": str(config_path), "device": device_t.type, "batch_size": batch_size, "precision": precision,
              "threads": torch.get_num_threads()}
    return model, device_t, precision, common


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _deformable_attention_seconds(model, images, device, precision, steps, warmup) -> float:
    """Seconds per training step spent in the deformable cross-attention (forward + backward).

    One forward records the inputs of every deformable layer; those calls are then replayed in isolation,
    with a backward through them, and timed."""
    from vfmtok.tokenizer.deformable_attention import MultiScaleDeformableAttention

    calls: list[tuple[torch.nn.Module, tuple]] = []
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, tuple(
        a.detach() if torch.is_tensor(a) else a for a in args))))
               for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    try:
        with _autocast(device, precision):
            model(images)
    finally:
        for handle in handles:
            handle.remove()

    def replay():
        for module, (query, reference, features, shapes) in calls:
            query = query.requires_grad_()
            module(query, reference, features, shapes).sum().backward()

    return time_call(replay, device, steps, warmup)


def _cached_train_speed(model, images, train_step, device, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``train_step`` with features read from a feature cache of a few batches (cycled through)."""
    import tempfile

    from vfmtok.tokenizer.feature_cache import VFMFeatureCache

    batch_size, num_batches = len(images), 4
    with tempfile.TemporaryDirectory(prefix="vfmtok-speed-cache-") as directory:
        batches = [(torch.arange(i * batch_size, (i + 1) * batch_size), images) for i in range(num_batches)]
        cache = VFMFeatureCache.build(model.vfm, batches, batch_size * num_batches, f"{directory}/cache",
                                      source="random images", image_size=images.shape[-1], device=device)
        position = iter(range(10 ** 9))

        def read_features():
            start = next(position) % num_batches * batch_size
            return cache.features(torch.arange(start, start + batch_size), device=device)

        seconds = time_call(lambda: train_step(read_features), device, steps, warmup)
    return {"feature_cache": True, "images_per_s": batch_size / seconds, "seconds_per_batch": seconds,
            "cache_bytes_per_image": cache.meta["bytes_per_image"]}


def speed_tokenizer(config_path: str, device: str = "cpu", batch_size: int = 4, steps: int = 3, warmup: int = 1,
                    precision: str | None = None, modes: tuple[str, ...] = ("train", "encode", "decode"),
                    deformable_share: bool = True, feature_cache: bool = False) -> list[dict[str, Any]]:
    """Images/s of a tokenizer config (random weights) for a training step (forward + backward of every loss term of
    the model), ``encode`` and ``decode``.

    ``feature_cache``: also time the training step with the frozen VFM's features read from an on-disk feature cache
    (:mod:`vfmtok.tokenizer.feature_cache`, built in a temporary directory; reading is part of the timed step). Train rows
    carry ``"feature_cache": false / true``.
    """
    model, device_t, precision, common = _build_for_speed(config_path, device, precision, batch_size)
    size = model.input_size
    images = torch.rand(batch_size, 3, size, size, device=device_t) * 2 - 1
    results = []

    if "train" in modes:
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_step(features_of=None):
            with _autocast(device_t, precision):
                output = model(images, vfm_features=features_of() if features_of else None)
            loss = sum(output.losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = time_call(train_step, device_t, steps, warmup)
        row = {"mode": "train", **common, "feature_cache": False, "images_per_s": batch_size / seconds,
               "seconds_per_batch": seconds}
        if deformable_share:
            deform = _deformable_attention_seconds(model, images, device_t, precision, steps, warmup)
            row["deformable_attention_share"] = deform / seconds
        results.append(row)
        if feature_cache:
            results.append({"mode": "train", **common, **_cached_train_speed(model, images, train_step, device_t,
                                                                             steps, warmup)})

    model.eval()
    if "encode" in modes:
        with _autocast(device_t, precision):
            seconds = time_call(lambda: model.encode(images), device_t, steps, warmup)
        results.append({"mode": "encode", **common, "images_per_s": batch_size / seconds, "seconds_per_batch": seconds})
    if "decode" in modes:
        with torch.no_grad():
            tokens = model.encode(images)
        with _autocast(device_t, precision):
            seconds = time_call(lambda: model.decode(tokens), device_t, steps, warmup)
        results.append({"mode": "decode", **common, "images_per_s": batch_size / seconds, "seconds_per_batch": seconds})
    return results


def speed_ar(config_path: str, device: str = "cpu", batch_size: int = 8, cfg: bool = True,
             guidance_scale: float = 2.0, kv_cache: bool = True, compile: bool = False, steps: int = 1,
             warmup: int = 1, windows: int = 3, precision: str | None = None,
             sjd_window: int | None = None) -> dict[str, Any]:
    """Class-conditional generation throughput of an AR generator config (GPT or RAR; random weights): every call
    samples ``num_tokens`` tokens for ``batch_size`` images (CFG doubles the model batch but not the counted tokens).
    ``compile``: the compiled one-token decode step. ``sjd_window``: also time speculative Jacobi decoding with
    that many drafts; ``sjd_step_cost`` is the time of one of its block steps over one plain step (bookkeeping
    included). Random weights say nothing about acceptance (``sjd_tokens_per_step`` here is not a trained model's):
    with a trained model's tokens per step T (``vfmtok speed sjd``), SJD's speed-up is about T / ``sjd_step_cost``."""
    model, device_t, precision, common = _build_for_speed(config_path, device, precision, batch_size)
    model.eval()
    labels = torch.arange(batch_size, device=device_t) % model.config.num_classes
    generator = torch.Generator(device=device_t).manual_seed(0)
    scale = guidance_scale if cfg else 1.0

    def generate():
        with _autocast(device_t, precision):
            model.generate(labels, guidance_scale=scale, generator=generator, use_kv_cache=kv_cache,
                           compile_decode=compile)

    seconds = time_call(generate, device_t, steps, warmup, windows=windows)
    total = model.config.num_tokens
    row = {**common, "model": type(model).__name__, "cfg": cfg, "kv_cache": kv_cache, "compiled": compile,
           "tokens_per_s": batch_size * total / seconds, "images_per_s": batch_size / seconds,
           "seconds_per_batch": seconds}
    if sjd_window is not None:
        stats = []

        def generate_sjd():
            with _autocast(device_t, precision):
                stats.append(model.generate(labels, guidance_scale=scale, generator=generator, sjd_window=sjd_window,
                                            return_sjd_stats=True)[1])

        sjd_seconds = time_call(generate_sjd, device_t, steps, warmup, windows=windows)
        sjd_steps = statistics.median(s.steps for s in stats)
        # per step: one prefill and total - 1 decode steps (plain), one prefill and the block steps (SJD)
        row.update(sjd_window=sjd_window, sjd_seconds_per_batch=sjd_seconds, sjd_steps=sjd_steps,
                   sjd_tokens_per_step=statistics.median(s.tokens_per_step for s in stats),
                   sjd_step_cost=(sjd_seconds / (sjd_steps + 1)) / (seconds / total))
    return row


def speed_flow(config_path: str, device: str = "cpu", batch_size: int = 8, sampler: str = "euler", steps: int = 50,
               cfg: bool = True, guidance_scale: float = 1.5, warmup: int = 1, windows: int = 3,
               precision: str | None = None) -> dict[str, Any]:
    """Class-conditional sampling throughput of a denoiser config (random weights). ``sampler``: ``"sde"``
    (Euler-Maruyama) or a flow solver of :data:`vfmtok.generators.transport.FLOW_SCHEDULERS` run as the pipeline runs
    it (:func:`~vfmtok.generators.transport.sample_with_scheduler`; the time shift does not change the cost, 1 here).
    ``nfe`` counts model evaluations per image, the conditional and unconditional ones of CFG separately."""
    from vfmtok.generators.transport import (FLOW_SCHEDULERS, flow_scheduler, guided_model, sample_sde,
                                             sample_with_scheduler)

    if steps < 1:
        raise InvalidValueError(f"steps must be >= 1, got {steps}")
    if sampler != "sde" and sampler not in FLOW_SCHEDULERS:
        raise InvalidValueError(f"sampler must be sde or one of {sorted(FLOW_SCHEDULERS)}, got {sampler!r}")
    model, device_t, precision, common = _build_for_speed(config_path, device, precision, batch_size)
    model.eval()
    labels = torch.arange(batch_size, device=device_t) % model.config.num_classes
    noise = torch.randn((batch_size, *model.latent_shape), device=device_t)
    generator = torch.Generator(device=device_t).manual_seed(0)
    calls = [0]

    def counted(x, t, y):
        calls[0] += 1
        return model(x, t, y)

    velocity = guided_model(counted, guidance_scale, null_class=model.null_class) if cfg else counted

    def sample():
        with torch.no_grad(), _autocast(device_t, precision):
            if sampler == "sde":
                sample_sde(velocity, noise, labels, steps, generator=generator)
            else:
                sample_with_scheduler(velocity, noise, labels, flow_scheduler(sampler), steps)

    sample()  # counts the model calls of one sampling run
    nfe = calls[0] * (2 if cfg else 1)
    seconds = time_call(sample, device_t, 1, warmup, windows=windows)
    return {**common, "sampler": sampler, "steps": steps, "cfg": cfg, "nfe": nfe,
            "images_per_s": batch_size / seconds, "seconds_per_batch": seconds}


def speed_eval(samples: str, reference: str, inception_weights: str | None = None, batch_size: int = 50,
               device: str = "cpu") -> dict[str, Any]:
    """FID of two image folders through this suite (:mod:`vfmtok.evaluation.fid`) and through torch-fidelity's own
    ``calculate_metrics`` on the same images, the same network and weights, side by side in one run: images/s of
    each (feature extraction of both sets plus the distance) and both FIDs.

    torch-fidelity loads its weights strictly, with the classification layer: it gets a temporary copy of the same
    weights whose missing fc layer is filled with zeros (used for timing and FID only, which never read it)."""
    import tempfile

    import torch_fidelity

    from vfmtok.evaluation.fid import InceptionFeatures, compare_sources, load_source
    from vfmtok.evaluation.inception_weights import resolve_inception_weights

    device_t = _check_device(device)
    weights = resolve_inception_weights(inception_weights)
    a, b = load_source(samples), load_source(reference)
    if a.kind != "folder" or b.kind != "folder":
        raise InvalidValueError("speed eval compares two image folders (what torch-fidelity reads directly)")
    count = a.num_images + b.num_images
    start = time.perf_counter()
    ours = compare_sources(a, b, InceptionFeatures(inception_weights, device=device_t), batch_size=batch_size,
                           cache=False)["fid"]
    ours_seconds = time.perf_counter() - start
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    state.setdefault("fc.weight", torch.zeros(1008, 2048))
    state.setdefault("fc.bias", torch.zeros(1008))
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/inception.pth"
        torch.save(state, path)  # our own file, read back by torch-fidelity
        start = time.perf_counter()
        theirs = torch_fidelity.calculate_metrics(
            input1=str(a.path), input2=str(b.path), fid=True, batch_size=batch_size, cuda=device_t.type == "cuda",
            feature_extractor_weights_path=path, cache=False, verbose=False, samples_find_deep=True)
        theirs_seconds = time.perf_counter() - start
    return {"images": count, "batch_size": batch_size, "device": device_t.type, "threads": torch.get_num_threads(),
            "vfmtok_images_per_s": count / ours_seconds, "torch_fidelity_images_per_s": count / theirs_seconds,
            "ratio": theirs_seconds / ours_seconds, "fid_vfmtok": ours,
            "fid_torch_fidelity": theirs["frechet_inception_distance"]}


# ----------------------------------------------------------------------------------------------------------------------
# Side by side with the reference code (CVMI-Lab/VFMTok), ``vfmtok speed tokenizer --compare-reference PATH``
# ----------------------------------------------------------------------------------------------------------------------
_REFERENCE_ARCHS = {"dinov2-vitl14-reg": ("dinov2_vitl14_reg", 1024), "dinov2-vitb14-reg": ("dinov2_vitb14_reg", 768),
                    "dinov2-vits14-reg": ("dinov2_vits14_reg", 384)}


def _import_reference(path: str):
    """Import the reference checkout's ``vfmtok`` package on the CPU: ``.cuda()`` becomes a no-op, the compiled
    deformable-attention op is replaced by the checkout's own pure-PyTorch core, the DINOv2 / LPIPS / VGG checkpoint
    loads are skipped (random weights), the internal ``refile`` I/O package is ``open``. Patches this process only
    (a benchmark command); the checkout is read, never modified. Returns the checkout's root and the reference
    modules the train step uses."""
    import importlib
    import sys
    import types
    from pathlib import Path

    root = Path(path).expanduser()
    if not (root / "vfmtok" / "tokenizer" / "vq_model.py").is_file() or not (root / "configs").is_dir():
        raise InvalidValueError(f"--compare-reference {path!r} is not a checkout of CVMI-Lab/VFMTok (expected "
                                "vfmtok/tokenizer/vq_model.py and configs/ under it)")
    missing = [name for name in ("omegaconf", "einops", "kornia", "torchvision")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidValueError(f"the reference code needs {missing} (pip install {' '.join(missing)}); they are not "
                                "dependencies of this project")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    if "refile" not in sys.modules:
        refile = types.ModuleType("refile")
        refile.smart_open = open
        sys.modules["refile"] = refile
    with reference_vfmtok_package(root):  # the checkout's package is also called `vfmtok`
        functions = importlib.import_module("vfmtok.modules.ops.functions.ms_deform_attn_func")

        class _PyTorchCore:
            @staticmethod
            def apply(value, shapes, level_start, locations, weights, im2col_step):
                return functions.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

        functions.MSDeformAttnFunction = _PyTorchCore
        importlib.import_module("vfmtok.modules.ops.modules.ms_deform_attn").MSDeformAttnFunction = _PyTorchCore
        encoders = importlib.import_module("vfmtok.modules.pretrained_enc.models_pretrained_enc")
        encoders.load_pretrained_dino_v2 = lambda model, checkpoint: model
        modules = {"root": root, "vq_model": importlib.import_module("vfmtok.tokenizer.vq_model"),
                   "lpips": importlib.import_module("vfmtok.losses.lpips")}
    return modules


def _build_reference_step(reference: dict, arch: str, vfm_dim: int, image_size: int, images: torch.Tensor,
                          lpips: bool):
    """The reference tokenizer (random weights) at the paper config and its generator step: forward, the reference's
    generator loss without the GAN term (2 x MSE + LPIPS when ``lpips`` + codebook, commitment, entropy + 1 - cosine
    to the VFM features, as ``VQLoss.forward`` before ``disc_start``), backward, Adam step."""
    import importlib
    import os
    import types

    from omegaconf import OmegaConf

    root, vq_model = reference["root"], reference["vq_model"]
    cfg = OmegaConf.load(os.path.join(root, "configs", "vit_transformer.yaml"))
    enc = cfg.encoder_config.params
    enc.in_channels, enc.image_size, enc.dim, enc.depth, enc.n_carrier = vfm_dim, image_size, 512, 6, 256
    enc.visual_encoder_config.params.pretrained_enc_arch = arch
    enc.visual_encoder_config.params.proj_dim = vfm_dim
    model = vq_model.VQModel(vq_model.ModelArgs(codebook_size=16384, codebook_embed_dim=8, z_channels=512,
                                                transformer_config=cfg, codebook_slots_embed_dim=12))
    for buffer in model.buffers():
        buffer.requires_grad_(False)  # the usage buffer is registered as a Parameter object
    model.train()
    perceptual = None
    if lpips:
        import torchvision

        ref_lpips = reference["lpips"]
        ref_lpips.models = types.SimpleNamespace(vgg16=lambda pretrained=True, **kw: torchvision.models.vgg16(weights=None))
        ref_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
        perceptual = ref_lpips.LPIPS().eval()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        (reconstruction, latent, dinov2), vq_losses, _ = model(images)
        loss = 2 * F.mse_loss(images, reconstruction)
        if perceptual is not None:
            loss = loss + perceptual(images, reconstruction).mean()
        loss = loss + vq_losses[0] + vq_losses[1] + vq_losses[2]
        loss = loss + (1 - F.cosine_similarity(dinov2, latent, dim=2, eps=1e-6)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _build_our_step(config_path: str, images: torch.Tensor, lpips: bool):
    """This suite's train step at ``config_path`` (random weights): forward, every model loss term, with ``lpips``
    the config's whole generator loss before the GAN starts (2 x MSE + LPIPS + VQ + semantic), backward, Adam step.
    LPIPS uses the config's ``lpips_vgg_weights`` / ``lpips_lin_weights`` when both are local files, else random
    weights (the time does not depend on them)."""
    from pathlib import Path

    from vfmtok.tokenizer.losses import TokenizerLoss

    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config)
    model.train()
    loss_fn, weights = None, None
    if lpips:
        options = dict(config.get("loss") or {})
        local = all(options.get(key) and Path(str(options[key])).is_file()
                    for key in ("lpips_vgg_weights", "lpips_lin_weights"))
        options.update(lpips_pretrained=local, discriminator_pretrained=False, discriminator="none")
        if not options.get("perceptual_weight"):
            options["perceptual_weight"] = 1.0
        loss_fn, weights = TokenizerLoss(**options), ("pretrained" if local else "random")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        output = model(images)
        loss = sum(output.losses.values()) if loss_fn is None else loss_fn.generator_loss(output, step=0)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step, weights


def compare_reference_tokenizer(config_path: str, reference_path: str, batch_size: int = 1, rounds: int = 2,
                                steps: int = 1, warmup: int = 1, lpips: bool = False) -> dict[str, Any]:
    """Train-step images/s of this suite and of the reference VFMTok code (a checkout of CVMI-Lab/VFMTok at
    ``reference_path``), CPU, fp32, random weights, the same images, batch and loss set, timed alternately in one
    process: ``rounds`` rounds of (ours, reference), each ``steps`` timed steps (``warmup`` untimed steps of each
before the first round). Returns
    both figures and their ratio per round, and the median ratio (ours / reference).

    The loss set is the pixel, VQ and semantic terms, plus LPIPS-VGG with ``lpips`` (the reference's generator loss
    before its GAN starts; the reference's ``VQLoss`` would also run its DINO discriminator at weight 0, which is
    left out here, so the reference figure is if anything optimistic)."""
    if rounds < 1 or steps < 1 or warmup < 0 or batch_size < 1:
        raise InvalidValueError(f"rounds, steps and batch size must be >= 1 and warmup >= 0, got {rounds}, {steps}, "
                                f"{batch_size}, {warmup}")
    config = load_config(config_path)
    preset = (config.get("params") or {}).get("vfm", {}).get("preset")
    if config.get("model") != "VFMTokModel" or preset not in _REFERENCE_ARCHS:
        raise InvalidValueError(f"--compare-reference needs a discrete VFMTokModel config on a DINOv2-with-registers "
                                f"preset ({sorted(_REFERENCE_ARCHS)}), like configs/tokenizer/vfmtok-l.yaml; "
                                f"{config_path} has model {config.get('model')!r}, vfm preset {preset!r}")
    reference = _import_reference(reference_path)
    device = torch.device("cpu")
    size = int(config["params"].get("image_size", 336))
    torch.manual_seed(0)
    images = torch.rand(batch_size, 3, size, size) * 2 - 1
    _, ours, weights = _build_our_step(config_path, images, lpips)
    arch, vfm_dim = _REFERENCE_ARCHS[preset]
    torch.manual_seed(0)
    theirs = _build_reference_step(reference, arch, vfm_dim, size, images, lpips)
    per_round = []
    for index in range(rounds):  # warm-up steps before the first round only; later rounds are warm already
        ours_s = time_call(ours, device, steps, warmup if index == 0 else 0, windows=1)
        theirs_s = time_call(theirs, device, steps, warmup if index == 0 else 0, windows=1)
        per_round.append({"vfmtok_images_per_s": batch_size / ours_s, "reference_images_per_s": batch_size / theirs_s,
                          "ratio": theirs_s / ours_s})
    return {"mode": "train", "config": str(config_path), "reference": str(reference_path), "device": "cpu",
            "precision": "fp32", "batch_size": batch_size, "lpips": lpips, "lpips_weights": weights,
            "threads": torch.get_num_threads(), "steps": steps, "rounds": per_round,
            "ratio": statistics.median(r["ratio"] for r in per_round)}


# ----------------------------------------------------------------------------------------------------------------------
# Side by side with LlamaGen's generate(), ``vfmtok speed ar --compare-reference PATH``
# ----------------------------------------------------------------------------------------------------------------------
def _import_llamagen(path: str):
    """``autoregressive.models.gpt`` and ``.generate`` of a FoundationVision/LlamaGen checkout (read, not modified;
    its root goes on ``sys.path`` for this process, a benchmark command)."""
    import importlib
    import sys
    from pathlib import Path

    root = Path(path).expanduser()
    if not (root / "autoregressive" / "models" / "generate.py").is_file():
        raise InvalidValueError(f"--compare-reference {path!r} is not a checkout of FoundationVision/LlamaGen "
                                "(expected autoregressive/models/generate.py under it)")
    sys.path.insert(0, str(root))
    return (importlib.import_module("autoregressive.models.gpt"),
            importlib.import_module("autoregressive.models.generate"))


def compare_reference_ar(config_path: str, reference_path: str, batch_size: int = 8, guidance_scale: float = 2.0,
                         rounds: int = 3, sjd_window: int | None = None, profile: bool = False) -> dict[str, Any]:
    """Plain KV-cache sampling of this suite's GPT and LlamaGen's ``generate()`` on the same random weights (the
    reference model's initialisation converted with :mod:`vfmtok.generators.convert_gpt`), CPU, fp32, CFG at
    ``guidance_scale``, all ``num_tokens`` tokens, ``batch_size`` images, timed alternately in one process: ``rounds``
    rounds of (ours, reference). Returns the wall-clock and CPU seconds of each per round, their ratios
    (reference / ours) and the median ratios. ``sjd_window``: also time our SJD sampling in each round.
    ``profile``: then one more call of each under ``torch.profiler``: the self CPU seconds of their costliest
    operators (``profile``), which say where the difference goes."""
    from vfmtok.generators.convert_gpt import convert_llamagen_state_dict

    if rounds < 1 or batch_size < 1:
        raise InvalidValueError(f"rounds and batch size must be >= 1, got {rounds}, {batch_size}")
    config = load_config(config_path)
    if config.get("model") != "GPTModel":
        raise InvalidValueError(f"--compare-reference needs a GPTModel config, {config_path} has "
                                f"{config.get('model')!r}")
    gpt_module, generate_module = _import_llamagen(reference_path)
    p = config["params"]
    torch.manual_seed(0)
    reference = gpt_module.Transformer(gpt_module.ModelArgs(
        dim=p["dim"], n_layer=p["depth"], n_head=p["num_heads"], vocab_size=p["vocab_size"],
        block_size=p["num_tokens"], num_classes=p["num_classes"], cls_token_num=1,
        ffn_dim_multiplier=p.get("ffn_dim_multiplier"), multiple_of=p.get("ffn_multiple_of", 256))).eval()
    with torch.no_grad():  # the reference zero-initialises its head: random logits sample like a trained model
        reference.output.weight.normal_(0, 0.02)
    model = build_model(config).eval()
    state, _ = convert_llamagen_state_dict(reference.state_dict())
    model.load_state_dict(state)
    labels = torch.arange(batch_size) % p["num_classes"]

    def ours():
        model.generate(labels, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0))

    def ours_sjd():
        model.generate(labels, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                       sjd_window=sjd_window)

    def theirs():
        torch.manual_seed(0)
        generate_module.generate(reference, labels, p["num_tokens"], cfg_scale=guidance_scale, cfg_interval=-1,
                                 temperature=1.0, top_k=0, top_p=1.0, sample_logits=True)

    def timed(fn) -> tuple[float, float]:
        """Wall-clock and CPU seconds of this process: on a shared machine the wall clock carries the other
        processes' load, which changes from one call to the next; the CPU time of a one-thread run much less so."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    per_round = []
    for _ in range(rounds):  # no warm-up call: one call is hundreds of steps, the first step's set-up is noise
        row = {}
        for name, fn in (("vfmtok", ours), ("reference", theirs), *((("vfmtok_sjd", ours_sjd),) if sjd_window
                                                                   else ())):
            row[f"{name}_seconds"], row[f"{name}_cpu_seconds"] = timed(fn)
        row["ratio"] = row["reference_seconds"] / row["vfmtok_seconds"]
        row["cpu_ratio"] = row["reference_cpu_seconds"] / row["vfmtok_cpu_seconds"]
        per_round.append(row)
    report = {"mode": "generate", "config": str(config_path), "reference": str(reference_path), "device": "cpu",
              "precision": "fp32", "batch_size": batch_size, "guidance_scale": guidance_scale,
              "num_tokens": p["num_tokens"], "threads": torch.get_num_threads(), "rounds": per_round,
              "ratio": statistics.median(r["ratio"] for r in per_round),
              "cpu_ratio": statistics.median(r["cpu_ratio"] for r in per_round)}
    if profile:
        report["profile"] = {"vfmtok": operator_seconds(ours), "reference": operator_seconds(theirs)}
    return report


def operator_seconds(fn: Callable[[], Any], top: int = 8) -> dict[str, float]:
    """One call of ``fn`` under ``torch.profiler`` (CPU): the self CPU seconds of its ``top`` costliest operators,
    the rest summed as ``"other"`` and the whole as ``"total"``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    seconds = sorted(((event.key, event.self_cpu_time_total / 1e6) for event in prof.key_averages()),
                     key=lambda item: -item[1])
    total = sum(value for _, value in seconds)
    shown = dict(seconds[:top])
    return {**shown, "other": total - sum(shown.values()), "total": total}
