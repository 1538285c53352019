"""Tokenizer reconstruction metrics (``vfmtok eval recon``): rFID against the centre-cropped originals, PSNR and
SSIM on [0, 1] with data range 1, LPIPS where its weights can be had, and codebook usage / perplexity (per codebook)
for discrete tokenizers.

Protocol (recorded in the report): each image is ADM centre-cropped to the tokenizer's input size, encoded and
decoded at ``eval_size`` (e.g. VFMTok: 336 in, 256 out); the original crop is resized to ``eval_size`` with the same
antialiased bicubic filter; both are compared in [0, 1] and, for rFID, converted to uint8 by rounding.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vfmtok.pipelines.data import ImageDataset, collate_images, load_image_dataset
from vfmtok.tokenizer.utils.atomic import atomic_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError, VFMTokError
from vfmtok.tokenizer.vfm import resize_images
from vfmtok.evaluation.metrics import codebook_statistics, feature_statistics, frechet_distance_of, psnr, ssim, warn_if_few

__all__ = ["reconstruction_metrics", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], rounded (not truncated)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _lpips_or_reason(vgg_weights: Optional[str] = None, lin_weights: Optional[str] = None):
    from vfmtok.tokenizer.lpips import LPIPS

    try:
        return LPIPS.pretrained(vgg_weights, lin_weights), None
    except VFMTokError as error:  # no local copy and no network: the whole reason, on one line
        return None, " ".join(line.strip() for line in str(error).splitlines())


@torch.no_grad()
def reconstruction_metrics(tokenizer, data: str, output_dir: str | Path, batch_size: int = 16, eval_size: int = 256,
                           limit: Optional[int] = None, device: str | torch.device = "cpu",
                           inception_weights: Optional[str] = None, num_workers: int = 0,
                           lpips: bool = True, grid_images: int = 8, grid_cell: Optional[int] = None,
                           lpips_vgg_weights: Optional[str] = None,
                           lpips_lin_weights: Optional[str] = None) -> dict[str, Any]:
    """Reconstruct every image of ``data`` with ``tokenizer`` (any tokenizer family) and write ``report.json`` and
    ``reconstructions.png`` (the first ``grid_images`` originals above their reconstructions, each shown
    ``grid_cell`` pixels wide, nearest-neighbour, when given) into ``output_dir`` (atomically). Returns the report.
    ``lpips=False`` skips LPIPS; ``lpips_vgg_weights`` / ``lpips_lin_weights``: its local weight files (default:
    downloaded on first use, see :meth:`vfmtok.tokenizer.lpips.LPIPS.load_pretrained`). Unavailable weights leave
    LPIPS out, with the reason in the report's ``lpips_unavailable``."""
    from vfmtok.evaluation.fid import InceptionFeatures

    if batch_size < 1 or eval_size < 1:
        raise InvalidValueError(f"batch_size and eval_size must be >= 1, got {batch_size} and {eval_size}")
    if limit is not None and limit < 2:
        raise InvalidValueError(f"limit must be at least 2 images (FID needs two), got {limit}")
    device = torch.device(device)
    tokenizer = tokenizer.to(device).eval()
    source = load_image_dataset(data)
    if limit is not None:
        source = source.select(range(min(limit, len(source))))
    dataset = ImageDataset(source, tokenizer.input_size, augment="center", flip=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_images, generator=torch.Generator())
    extractor = InceptionFeatures(inception_weights, device=device)
    lpips, lpips_reason = _lpips_or_reason(lpips_vgg_weights, lpips_lin_weights) if lpips else \
        (None, "not asked for (lpips=False, --no-lpips)")
    if lpips is not None:
        lpips = lpips.to(device)
    real, fake, psnrs, ssims, lpipses, codes, shown = [], [], [], [], [], [], ([], [])
    start, skipped = time.perf_counter(), 0
    for batch in loader:
        skipped += len(batch["skipped"])
        if len(batch["images"]) == 0:
            continue
        images = batch["images"].to(device)
        tokens = tokenizer.encode(images)
        reconstructions = tokenizer.decode(tokens, output_size=eval_size).float()
        originals = resize_images(images.float(), eval_size).clamp(-1, 1)
        psnrs.append(psnr((originals + 1) / 2, (reconstructions + 1) / 2))
        ssims.append(ssim((originals + 1) / 2, (reconstructions + 1) / 2))
        if lpips is not None:
            lpipses.append(lpips(reconstructions, originals).double())
        if tokenizer.is_discrete:
            codes.append(tokens.cpu())
        real.append(extractor(to_uint8(originals))["pool"])
        fake.append(extractor(to_uint8(reconstructions))["pool"])
        room = grid_images - sum(len(x) for x in shown[0])
        if room > 0:
            shown[0].append(originals[:room].cpu())
            shown[1].append(reconstructions[:room].cpu())
    count = sum(len(x) for x in real)
    if count < 2:
        raise InvalidValueError(f"{data}: fewer than 2 readable images ({count}); nothing to evaluate")
    real_stats, fake_stats = feature_statistics(np.concatenate(real)), feature_statistics(np.concatenate(fake))
    report: dict[str, Any] = {
        "rfid": frechet_distance_of(fake_stats, real_stats),
        "psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
        "lpips": float(torch.cat(lpipses).mean()) if lpipses else None,
        "num_images": count, "unreadable_images": skipped,
        "tokenizer": tokenizer.tokenizer_summary(),
        "protocol": {
            "data": str(data), "crop": f"ADM centre crop to {tokenizer.input_size}",
            "resolution": f"encoded at {tokenizer.input_size}, decoded at {eval_size}; originals resized to "
                          f"{eval_size} (bicubic, antialiased)",
            "pixel_range": "[0, 1]; PSNR and SSIM with data_range 1.0 (SSIM: 11x11 Gaussian window, sigma 1.5)",
            "uint8_conversion": "round", "fid_reference": "the same images' originals (centre crops)",
            "extractor_sha256": extractor.sha256, "extractor_weights_source": extractor.weights.source,
        },
        "images_per_s": count / (time.perf_counter() - start),
        "warnings": [w for w in [warn_if_few(count)] if w],
    }
    if lpips_reason is not None:
        report["lpips_unavailable"] = lpips_reason
    if tokenizer.is_discrete:
        layout = tokenizer.code_layout
        all_codes = torch.cat(codes)
        offsets = np.cumsum([0, *layout.codebook_sizes])
        report["codebooks"] = [
            codebook_statistics(all_codes[:, k::layout.tokens_per_position] - int(offsets[k]), size)
            for k, size in enumerate(layout.codebook_sizes)]
    originals, reconstructions = torch.cat(shown[0]), torch.cat(shown[1])
    grid = torch.cat([originals, reconstructions])
    if grid_cell is not None:
        grid = F.interpolate(grid, size=(grid_cell, grid_cell), mode="nearest")
    _write(report, (grid, len(originals)), Path(output_dir))
    return report


def _write(report: dict[str, Any], grid, output_dir: Path) -> None:
    from torchvision.utils import save_image

    with atomic_directory(output_dir, replace=True) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=1, default=str))
        images, per_row = grid
        save_image(images * 0.5 + 0.5, str(staging / "reconstructions.png"), nrow=per_row)
