"""``vfmtok compare-tokenizers``: train several tokenizer presets on the same data with the same steps and batch,
then measure each with ``vfmtok eval recon``'s protocol; one table (``comparison.md`` / ``comparison.json``).

Every preset gets the same training overrides (``max_steps``, ``batch_size``, no trackers, one checkpoint at the end,
no worker processes) and the same evaluation (the first ``eval_limit`` images, centre crops, decoded at the
tokenizers' resolution). Family recipes inside the budget:

* DINO-Tok VQ (``DINOTokModel`` with ``bottleneck: vq``): the paper's two stages in the same total steps: the AE
  (its config: the VQ config with ``bottleneck: continuous``) for half the steps, ``pca-stats`` over the training
  images, then the VQ for the other half, initialised from the AE, fusion frozen (``train_encoder: false``).
* GloTok: the histogram teacher is built first (k-means of the config's ``params.vfm`` features over the training
  images: a random VFM for the tiny presets, so the "semantic" geometry is only exercised, not meaningful); the
  teacher is not counted in the training time.

Train images/s is the mean of the trainer's logged ``images_per_s`` after the first logged step (per stage,
combined by total images over total time for the two-stage recipe).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from vfmtok.pipelines.config import config_path, load_config
from vfmtok.tokenizer.utils.atomic import write_text_atomically
from vfmtok.tokenizer.utils.errors import InvalidValueError

__all__ = ["compare_tokenizers", "DEFAULT_PRESETS", "format_table"]

logger = logging.getLogger(__name__)

DEFAULT_PRESETS = tuple(f"configs/tokenizer/{name}.yaml"  # shipped configs (config_path finds them)
                        for name in ("vfmtok-tiny", "dinotok-ae-tiny", "dinotok-vq-tiny", "glotok-tiny"))


def _write_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _throughput(run_dir: Path) -> tuple[int, float]:
    """(steps, seconds per step) of the logged steps after the first (log_every 1), from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"] for r in records]
    return len(records), len(rates) / sum(1.0 / r for r in rates)  # harmonic mean rate, in images/s


def _train(config: Path, data: str, output: Path, overrides: dict[str, Any], init_from: Optional[str] = None
           ) -> tuple[Path, float, float]:
    from vfmtok.pipelines.train.tokenizer import train_tokenizer

    exported = train_tokenizer(config, data, output, overrides=overrides, init_from=init_from)
    steps, rate = _throughput(output)
    images = steps * overrides["batch_size"]
    return exported, images, images / rate


def compare_tokenizers(output_dir: str | Path, data: str, configs: Sequence[str] = DEFAULT_PRESETS,
                       steps: int = 200, batch_size: int = 8, eval_limit: int = 500, stats_limit: int = 256,
                       eval_batch_size: int = 50, teacher_clusters: int = 64,
                       inception_weights: Optional[str] = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Train and evaluate every config (see the module docstring); returns the table rows and writes
    ``comparison.json`` and ``comparison.md`` into ``output_dir``."""
    from vfmtok.evaluation.recon import reconstruction_metrics
    from vfmtok.pipelines.train.extract import load_tokenizer
    from vfmtok.pipelines.train.tokenizer_stats import build_glotok_teacher, pca_statistics

    if steps < 2 or batch_size < 1:
        raise InvalidValueError(f"steps must be >= 2 and batch_size >= 1, got {steps} and {batch_size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for given in configs:
        path = config_path(given)
        run = load_config(path)
        raw = yaml.safe_load(path.read_text())
        name = path.stem
        work = output_dir / name
        overrides = {"max_steps": steps, "batch_size": batch_size, "log_every": 1, "log_with": ["none"],
                     "checkpoint_every": steps, "sample_every": steps, "num_workers": 0}
        logger.info("compare-tokenizers: %s", name)
        if run["model"] == "DINOTokModel" and run["params"].get("bottleneck", "vq") == "vq":
            ae = {**raw, "params": {**raw["params"], "bottleneck": "continuous"}}
            for key in ("num_codebooks", "codebook_size", "commitment_beta", "pca_rank", "pca_power",
                        "train_encoder"):
                ae["params"].pop(key, None)
            half = {**overrides, "max_steps": steps // 2, "checkpoint_every": steps // 2,
                    "sample_every": steps // 2}
            ae_export, ae_images, ae_seconds = _train(_write_config(ae, work / "ae.yaml"), data, work / "ae", half)
            pca_statistics(load_tokenizer(str(ae_export)), data, work / "ae-pca", limit=stats_limit)
            vq = {**raw, "params": {**raw["params"], "train_encoder": False}}
            rest = {**half, "max_steps": steps - steps // 2, "checkpoint_every": steps - steps // 2,
                    "sample_every": steps - steps // 2}
            exported, images, seconds = _train(_write_config(vq, work / "vq.yaml"), data, work / "vq", rest,
                                               init_from=str(work / "ae-pca"))
            images, seconds = images + ae_images, seconds + ae_seconds
            recipe = f"AE {steps // 2} steps -> pca-stats ({stats_limit} images) -> VQ {steps - steps // 2} steps"
        elif run["model"] == "GloTokModel" and run["loss"].get("histogram_teacher") is None:
            teacher = build_glotok_teacher(work / "teacher.safetensors", clusters=teacher_clusters, data=data,
                                           config=path, random_vfm=True, limit=stats_limit)
            glo = {**raw, "loss": {**raw.get("loss", {}), "histogram_weight": 0.01,
                                   "histogram_teacher": teacher["output"]}}
            exported, images, seconds = _train(_write_config(glo, work / "glotok.yaml"), data, work / "train",
                                               overrides)
            recipe = f"teacher: k-means ({teacher_clusters}) of the random tiny VFM's features; histogram weight 0.01"
        else:
            exported, images, seconds = _train(path, data, work / "train", overrides)
            recipe = "as configured"
        tokenizer = load_tokenizer(str(exported))
        report = reconstruction_metrics(tokenizer, data, work / "eval", batch_size=eval_batch_size,
                                        eval_size=tokenizer.output_size, limit=eval_limit, device=device,
                                        inception_weights=inception_weights)
        codebooks = report.get("codebooks")
        rows.append({
            "tokenizer": name, "model": run["model"], "discrete": tokenizer.is_discrete,
            "tokens": tokenizer.token_shape(), "params": sum(p.numel() for p in tokenizer.parameters()),
            "psnr": report["psnr"], "ssim": report["ssim"], "rfid": report["rfid"],
            "codebook_usage": None if not codebooks else [round(c["usage"], 4) for c in codebooks],
            "train_images_per_s": images / seconds, "eval_images": report["num_images"], "recipe": recipe,
        })
        write_text_atomically(output_dir / "comparison.json", json.dumps(
            {"steps": steps, "batch_size": batch_size, "data": str(data), "eval_limit": eval_limit, "rows": rows},
            indent=1, default=str))
    write_text_atomically(output_dir / "comparison.md", format_table(rows, steps, batch_size, data))
    return rows


def format_table(rows: Sequence[dict[str, Any]], steps: int, batch_size: int, data: str) -> str:
    lines = [f"{steps} steps at batch {batch_size} on {data}; evaluated on {rows[0]['eval_images'] if rows else 0} "
             "images (centre crops, native resolution).", "",
             "| tokenizer | tokens per image | params | PSNR | SSIM | rFID | codebook usage | train images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        usage = "-" if r["codebook_usage"] is None else " / ".join(f"{u:.2f}" for u in r["codebook_usage"])
        tokens = "x".join(map(str, r["tokens"]))
        lines.append(f"| {r['tokenizer']} | {tokens} | {r['params'] / 1e6:.2f}M | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {r['rfid']:.1f} | {usage} | {r['train_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"
