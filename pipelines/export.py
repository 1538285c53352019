"""``vfmtok export pipeline``: a pipeline folder (and optionally a Hub repo) from your own trained runs.

The tokenizer run's ``tokenizer/`` and the generator run's ``generator/`` (or any saved folders / Hub ids of them)
become one diffusers pipeline: :class:`VFMTokARPipeline` for a GPT, :class:`VFMTokFlowPipeline` for a flow denoiser.
Class names come from a JSON file or from the training data's labels (ImageNet's for 1000 classes otherwise); a
``vfmtok benchmark`` report, given or found in the generator's run folder, becomes the model card's evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from vfmtok.evaluation.benchmark import card_results
from vfmtok.pipelines.convert import assemble_pipeline
from vfmtok.tokenizer.utils.atomic import atomic_directory
from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingFileError, OutputExistsError

__all__ = ["export_pipeline", "run_model_folder"]

BENCHMARK_REPORT = "report.json"


def run_model_folder(path: str, export_name: str) -> str:
    """A training run folder (holding ``<export_name>/config.json``) -> that exported model folder; a model folder
    or a Hub id as given."""
    folder = Path(path)
    if (folder / export_name / "config.json").is_file():
        return str(folder / export_name)
    if folder.exists() and not (folder / "config.json").is_file():
        raise MissingFileError(f"{path!r} is neither a saved model (no config.json) nor a training run (no "
                               f"{export_name}/config.json)")
    return str(path)


def _load_generator(path: str):
    from vfmtok.generators import load_generator

    return load_generator(path)


def _id2label(id2label_file: Optional[str], data: Optional[str]) -> Optional[dict[str, str]]:
    if id2label_file is not None and data is not None:
        raise InvalidValueError("give class names once: --id2label FILE or --class-names-from DATA")
    if id2label_file is not None:
        try:
            names = json.loads(Path(id2label_file).read_text())
        except FileNotFoundError:
            raise MissingFileError(f"--id2label file {id2label_file!r} does not exist") from None
        except json.JSONDecodeError as error:
            raise InvalidValueError(f"--id2label {id2label_file!r} is not valid JSON: {error}") from None
        if isinstance(names, list):
            names = dict(enumerate(names))
        if not isinstance(names, dict):
            raise InvalidValueError(f"--id2label {id2label_file!r} must hold {{id: name}} or a list of names")
        return {str(k): v for k, v in names.items()}
    if data is not None:
        from vfmtok.pipelines.data import class_names, load_image_dataset

        names = class_names(load_image_dataset(data))
        if names is None:
            raise InvalidValueError(f"{data!r} has integer labels without class names; pass --id2label FILE")
        return {str(i): name for i, name in enumerate(names)}
    return None  # the pipeline's default: ImageNet's names for 1000 classes, else ids only


def _evaluation(report: Optional[str], generator_run: str) -> Optional[dict[str, Any]]:
    """The model card's evaluation from a ``vfmtok benchmark`` report.json: the one given, else one in the generator's
    run folder (``<run>/report.json`` or ``<run>/*/report.json``), else none."""
    if report is None:
        run = Path(generator_run)
        found = sorted([*run.glob(BENCHMARK_REPORT), *run.glob(f"*/{BENCHMARK_REPORT}")]) if run.is_dir() else []
        found = [p for p in found if _is_benchmark_report(p)]
        if not found:
            return None
        report = str(found[0])
    path = Path(report)
    if not path.is_file():
        raise MissingFileError(f"--evaluation report {report!r} does not exist")
    if not _is_benchmark_report(path):
        raise InvalidValueError(f"--evaluation {report!r} is not a `vfmtok benchmark` report.json (no 'settings')")
    return card_results(json.loads(path.read_text()))


def _is_benchmark_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and isinstance(report.get("settings"), list) and bool(report["settings"])


def export_pipeline(tokenizer: str, generator: str, output_dir: str | Path, id2label_file: Optional[str] = None,
                    class_names_from: Optional[str] = None, evaluation: Optional[str] = None,
                    weak_generator: Optional[str] = None, push_to_hub: Optional[str] = None,
                    private: bool = False) -> dict[str, Any]:
    """Assemble, check and save the pipeline into ``output_dir`` (atomically); with ``push_to_hub`` (``org/name``)
    also upload it. Returns what was done (for the command's JSON line)."""
    from vfmtok.tokenizer.interface import load_tokenizer

    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(f"output directory {str(output)!r} already exists and is not empty")
    generator_path = run_model_folder(generator, "generator")
    pipe = assemble_pipeline(load_tokenizer(run_model_folder(tokenizer, "tokenizer")), _load_generator(generator_path),
                             id2label=_id2label(id2label_file, class_names_from),
                             evaluation=_evaluation(evaluation, generator),
                             weak_generator=(_load_generator(run_model_folder(weak_generator, "generator"))
                                             if weak_generator is not None else None))
    with atomic_directory(output) as staging:
        pipe.save_pretrained(staging)
    result = {"output_dir": str(output), "pipeline": type(pipe).__name__, "classes": len(pipe.id2label),
              "evaluation": bool(pipe.config.get("evaluation"))}
    if push_to_hub is not None:
        commit = pipe.push_to_hub(push_to_hub, private=private)
        result["hub"] = {"repo_id": push_to_hub, "commit": str(getattr(commit, "oid", commit))}
    return result
