"""Dataset statistics that tokenizer families store or train against.

* ``vfmtok pca-stats`` (:func:`pca_statistics`): the mean and principal directions of a DINO-Tok's pre-quantization
  latent over a dataset, accumulated in float64 (:class:`vfmtok.tokenizer.dinotok.LatentMoments`), sharded across the
  processes of ``accelerate launch`` (process r takes images r, r + P, ...) and merged in process order; written into
  a copy of the tokenizer (its ``pca_*`` buffers) saved to the output directory, with ``pca_stats.json``.
* ``vfmtok glotok-teacher`` (:func:`build_glotok_teacher`): GloTok's histogram teacher, the k-means centroids of a
  frozen VFM's last-layer patch features over a dataset (:class:`vfmtok.tokenizer.glotok.StreamingKMeans`), or the codebook
  of a trained tokenizer; one safetensors file with ``centroids``, ``histogram`` and ``histogram_settings``.
* :func:`init_from_pretrained`: start a model from the matching weights of a saved tokenizer folder
  (``vfmtok train tokenizer --init-from``), e.g. DINO-Tok VQ from the AE with its PCA statistics.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vfmtok.pipelines.data import ImageDataset, collate_images, load_image_dataset
from vfmtok.tokenizer.utils.atomic import atomic_file, save_pretrained_atomically, write_text_atomically
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError

__all__ = ["pca_statistics", "build_glotok_teacher", "init_from_pretrained"]

logger = logging.getLogger(__name__)


def _loader(data: str, size: int, batch_size: int, limit: Optional[int], rank: int = 0, world: int = 1,
            num_workers: int = 0):
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InvalidValueError(f"limit must be a positive number of images, got {limit}")
    source = load_image_dataset(data)
    if limit is not None:
        source = source.select(range(min(limit, len(source))))
    dataset = ImageDataset(source, size, augment="center", flip=False)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate_images, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------------------------------
# DINO-Tok PCA statistics
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def pca_statistics(tokenizer: nn.Module, data: str, output_dir: str | Path, batch_size: int = 32,
                   limit: Optional[int] = None, num_workers: int = 0) -> dict[str, Any]:
    """Measure the latent statistics of ``tokenizer`` (a :class:`vfmtok.tokenizer.dinotok.DINOTokModel`) over ``data``,
    store them in the model and save it to ``output_dir`` (main process). Runs on every process of an
    ``accelerate launch``; returns the summary written to ``pca_stats.json``."""
    from accelerate import Accelerator

    from vfmtok.tokenizer.dinotok import LatentMoments

    if not hasattr(tokenizer, "set_pca_statistics"):
        raise InvalidValueError(f"`vfmtok pca-stats` measures the latent of a DINO-Tok tokenizer; got "
                                f"{type(tokenizer).__name__}")
    state = Accelerator()  # reads `accelerate launch`'s environment (ACCELERATE_USE_CPU included)
    tokenizer = tokenizer.to(state.device).eval()
    dim = tokenizer.config.latent_channels
    moments = LatentMoments(dim)
    for batch in _loader(data, tokenizer.input_size, batch_size, limit, state.process_index, state.num_processes,
                         num_workers):
        if len(batch["images"]):
            latent = tokenizer.latent_tokens(batch["images"].to(state.device))
            moments.update(latent.reshape(-1, dim))
    packed = moments.to_tensor().to(state.device)
    if state.num_processes > 1:
        packed = state.gather(packed[None])  # (processes, 1 + dim + dim^2), in process order
    merged = LatentMoments(dim)
    for row in packed.reshape(-1, packed.shape[-1]):
        merged.merge(LatentMoments.from_tensor(row, dim))
    if merged.count < 2:
        raise InvalidValueError(f"{data}: fewer than 2 latent vectors ({merged.count}); nothing to measure")
    tokenizer.set_pca_statistics(merged)
    variances = tokenizer.pca_variances.double()
    summary = {"num_vectors": merged.count, "num_processes": state.num_processes, "latent_channels": dim,
               "rank": tokenizer.rank, "data": str(data),
               "explained_variance_of_rank": float(variances[:tokenizer.rank].sum() / variances.sum().clamp_min(1e-30)),
               "largest_variances": [float(v) for v in variances[:8]],
               "smallest_variances": [float(v) for v in variances[-4:]]}
    if state.is_main_process:
        save_pretrained_atomically(tokenizer, output_dir)
        write_text_atomically(Path(output_dir) / "pca_stats.json", json.dumps(summary, indent=1))
    state.wait_for_everyone()
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# GloTok teacher
# ----------------------------------------------------------------------------------------------------------------------
def _teacher_vfm(config: str, vfm_weights: Optional[str], random_vfm: bool, seed: int):
    """The frozen VFM named by ``params.vfm`` of a tokenizer config."""
    from vfmtok.pipelines.config import load_config
    from vfmtok.tokenizer.vfm import FrozenVFM
    from vfmtok.tokenizer.vfmtok import _vfm_spec

    run = load_config(config)
    spec = run["params"].get("vfm")
    if not spec:
        raise InvalidValueError(f"{config}: params.vfm names no VFM (the teacher's model)")
    torch.manual_seed(seed)  # a random VFM (tests) is then reproducible
    vfm = FrozenVFM(**_vfm_spec(spec))
    if not random_vfm:
        if vfm_weights is None and vfm.pretrained is None:
            raise InvalidValueError(f"{config}: the VFM spec names no weights (vfm.pretrained); pass --vfm-weights, "
                                    f"or --random-vfm for a random VFM (tests)")
        vfm.load_pretrained(vfm_weights)
    return vfm, int(run["params"].get("image_size") or vfm.image_size)


def _codebook_of(folder: str) -> torch.Tensor:
    """The (semantic) codebook of a saved discrete tokenizer: GloTok's semantic one, VFMTok's, DINO-Tok's first."""
    from vfmtok.tokenizer.interface import load_tokenizer

    model = load_tokenizer(folder, load_vfm_weights=False)
    for name in ("semantic_quantizer", "quantizer"):
        if hasattr(model, name):
            return getattr(model, name).codebook().detach().float()
    if hasattr(model, "quantizers"):
        return model.quantizers[0].codebook().detach().float()
    raise InvalidValueError(f"{folder}: a {type(model).__name__} has no codebook to use as the teacher")


@torch.no_grad()
def build_glotok_teacher(output: str | Path, clusters: int = 4096, data: Optional[str] = None,
                         config: Optional[str] = None, from_codebook: Optional[str] = None,
                         vfm_weights: Optional[str] = None, random_vfm: bool = False, batch_size: int = 32,
                         limit: Optional[int] = None, seed: int = 0, bins: int = 40,
                         sharpness: Optional[float] = None, device: str | torch.device = "cpu",
                         num_workers: int = 0) -> dict[str, Any]:
    """Write GloTok's teacher file (see the module docstring) and return its summary."""
    from safetensors.torch import save_file

    from vfmtok.tokenizer.glotok import StreamingKMeans, default_sharpness, similarity_histogram

    output = Path(output)
    if output.suffix != ".safetensors":
        raise InvalidValueError(f"the teacher file must end in .safetensors, got {str(output)!r}")
    if (from_codebook is None) == (config is None):
        raise InvalidValueError("give either a config whose params.vfm is the teacher's model (with --data), or "
                                "--from-codebook TOKENIZER")
    sharpness = default_sharpness(bins) if sharpness is None else float(sharpness)
    summary: dict[str, Any] = {"bins": bins, "sharpness": sharpness}
    if from_codebook is not None:
        if not Path(from_codebook).exists():
            raise MissingFileError(f"tokenizer folder {from_codebook!r} does not exist")
        centroids = _codebook_of(from_codebook)
        summary.update(source=f"codebook of {from_codebook}", clusters=len(centroids))
    else:
        if data is None:
            raise InvalidValueError("k-means of VFM features needs --data")
        device = torch.device(device)
        vfm, size = _teacher_vfm(config, vfm_weights, random_vfm, seed)
        vfm = vfm.to(device)
        kmeans = StreamingKMeans(clusters, seed=seed)
        images = 0
        for batch in _loader(data, size, batch_size, limit, num_workers=num_workers):
            if len(batch["images"]):
                features = vfm(batch["images"].to(device)).levels[-1]  # (B, N, C), last requested layer
                kmeans.update(features.reshape(-1, features.shape[-1]))
                images += len(batch["images"])
        centroids = kmeans.centroids()
        summary.update(source=f"k-means of {config} params.vfm features over {data}", clusters=clusters,
                       images=images, feature_vectors=kmeans.seen, random_vfm=random_vfm)
    histogram = similarity_histogram(centroids.double(), bins, sharpness).float()
    tensors = {"centroids": centroids.contiguous(), "histogram": histogram,
               "histogram_settings": torch.tensor([float(bins), sharpness], dtype=torch.float64)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as temporary:
        save_file(tensors, str(temporary), metadata={k: str(v) for k, v in summary.items()})
    return {**summary, "output": str(output), "centroids_shape": list(centroids.shape)}


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation from a saved tokenizer
# ----------------------------------------------------------------------------------------------------------------------
def init_from_pretrained(model: nn.Module, folder: str | Path) -> dict[str, Any]:
    """Copy every weight and buffer of the saved tokenizer ``folder`` whose name and shape match one of ``model``'s
    (the others keep their initialisation). Refuses a folder that shares no weight with the model."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    from vfmtok.tokenizer.utils.loading import read_state_dict

    path = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        raise MissingFileError(f"--init-from {str(folder)!r}: no {SAFETENSORS_WEIGHTS_NAME} (a save_pretrained "
                               f"tokenizer folder is expected)")
    source = read_state_dict(path)
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise InvalidValueError(f"--init-from {str(folder)!r}: none of its weights matches the model "
                                f"{type(model).__name__} (names and shapes)")
    model.load_state_dict({**own, **matched})
    kept = sorted(set(own) - set(matched))
    logger.info("initialised %d of %d tensors from %s; kept the initialisation of %d (e.g. %s)", len(matched),
                len(own), folder, len(kept), kept[:5])
    return {"copied": len(matched), "kept": len(kept), "kept_examples": kept[:10]}
