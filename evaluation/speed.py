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

from pipelines.config import build_model, load_config
from tokenizer.utils.errors import InvalidValueError

__all__ = ["speed_tokenizer", "speed_ar", "speed_flow", "speed_eval", "time_call"]


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
    from tokenizer.deformable_attention import MultiScaleDeformableAttention

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

    from tokenizer.feature_cache import VFMFeatureCache

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
    (:mod:`tokenizer.feature_cache`, built in a temporary directory; reading is part of the timed step). Train rows
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
             warmup: int = 1, windows: int = 3, precision: str | None = None) -> dict[str, Any]:
    """Class-conditional generation throughput of a GPT config (random weights): every call samples ``num_tokens``
    tokens for ``batch_size`` images (CFG doubles the model batch but not the counted tokens)."""
    model, device_t, precision, common = _build_for_speed(config_path, device, precision, batch_size)
    model.eval()
    labels = torch.arange(batch_size, device=device_t) % model.config.num_classes
    generator = torch.Generator(device=device_t).manual_seed(0)

    def generate():
        with _autocast(device_t, precision):
            model.generate(labels, guidance_scale=guidance_scale if cfg else 1.0, generator=generator,
                           use_kv_cache=kv_cache, compile_decode=compile)

    seconds = time_call(generate, device_t, steps, warmup, windows=windows)
    tokens = batch_size * model.config.num_tokens
    return {**common, "cfg": cfg, "kv_cache": kv_cache, "compiled": compile, "tokens_per_s": tokens / seconds,
            "images_per_s": batch_size / seconds, "seconds_per_batch": seconds}


def speed_flow(config_path: str, device: str = "cpu", batch_size: int = 8, sampler: str = "euler", steps: int = 50,
               cfg: bool = True, guidance_scale: float = 1.5, warmup: int = 1, windows: int = 3,
               precision: str | None = None) -> dict[str, Any]:
    """Class-conditional sampling throughput of a denoiser config (random weights). ``nfe`` counts model evaluations
    per image, the conditional and unconditional ones of CFG separately."""
    from generators.transport import guided_model, sample_ode, sample_sde

    if steps < 1:
        raise InvalidValueError(f"steps must be >= 1, got {steps}")
    if sampler not in ("euler", "heun", "sde"):
        raise InvalidValueError(f"sampler must be euler, heun or sde, got {sampler!r}")
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
                sample_ode(velocity, noise, labels, steps, method=sampler)

    sample()  # counts the model calls of one sampling run
    nfe = calls[0] * (2 if cfg else 1)
    seconds = time_call(sample, device_t, 1, warmup, windows=windows)
    return {**common, "sampler": sampler, "steps": steps, "cfg": cfg, "nfe": nfe,
            "images_per_s": batch_size / seconds, "seconds_per_batch": seconds}


def speed_eval(samples: str, reference: str, inception_weights: str | None = None, batch_size: int = 50,
               device: str = "cpu") -> dict[str, Any]:
    """FID of two image folders through this suite (:mod:`evaluation.fid`) and through torch-fidelity's own
    ``calculate_metrics`` on the same images, the same network and weights, side by side in one run: images/s of
    each (feature extraction of both sets plus the distance) and both FIDs.

    torch-fidelity loads its weights strictly, with the classification layer: it gets a temporary copy of the same
    weights whose missing fc layer is filled with zeros (used for timing and FID only, which never read it)."""
    import tempfile

    import torch_fidelity

    from .fid import InceptionFeatures, compare_sources, load_source
    from .inception_weights import resolve_inception_weights

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
