"""The official VFMTok releases, as plain data, and ``vfmtok convert pipeline --official NAME``.

``RELEASES`` has one entry per release that becomes a pipeline: where its files are (a Hugging Face Hub repo, or a
pinned URL for a file the authors keep in their GitHub repo), the configs that fit them, the sha256 of each file
where known (else it is computed at download and recorded in the model card), the published gFID with and without
guidance and the sampling protocol behind those numbers. ``CONVERTERS`` has one function per release *kind* (which
checkpoints, which converter, which pipeline); adding a release of a known kind is one ``Release(...)`` entry, a new
kind one converter function.

:func:`convert_release` downloads the files through huggingface_hub (its cache; ``HF_HUB_OFFLINE``, ``revision``
and ``cache_dir`` honoured), checks their sha256, converts them strictly, loads the VFM weights the tokenizer needs,
applies the release's sampling protocol as the pipeline's defaults and writes the pipeline folder atomically, with a
model card naming the source files and their sha256, the published numbers and the protocol.

Published numbers and file names are those of the authors' READMEs (CVMI-Lab/VFMTok, CVMI-Lab/VFMTok2) and
sampling configs; the protocols are read from their evaluation code (VFMTok ``test_net.py``, VFMTok2 ``test_c2i.py``
with ``configs/denoise/sampling/ImageNet256/*.yaml``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError, MissingFileError, OutputExistsError

__all__ = ["Release", "RELEASES", "PROTOCOLS", "CONVERTERS", "convert_release", "download_release_files",
           "file_sha256", "release_table_markdown"]

VFMTOK_HUB = "yexiguafu/VFMTok"
# VFMTok2 keeps the latent statistics of its VFMAE in its GitHub repository (stats/stats-500.pt), pinned here.
VFMTOK2_STATS_URL = ("https://raw.githubusercontent.com/CVMI-Lab/VFMTok2/6bc7af4ceaa903bf1471b92420c832a578090a9d/"
                     "stats/stats-500.pt")
VFMTOK2_STATS_SHA256 = "c2f9469af1e6b71e328ebf9704067f0364d62b966f2fb2157d54ac590ca9a704"

# The sampling protocol of each family's own evaluation: what the converted pipeline does by default.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # VFMTok test_net.py: codes sampled at 336 px (temperature 1, top-k 0, top-p 1, constant CFG), decoded and resized
    # to 256 with plain bicubic F.interpolate (decode_codes_to_img, no antialiasing), uint8 = clamp(127.5 x + 128).
    "vfmtok-ar": {"output_size": 256, "resize_antialias": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                  "description": "codes at 336 px, temperature 1, top-k 0, top-p 1, constant CFG; decoded and "
                                 "resized 336 -> 256 by plain bicubic F.interpolate (no antialiasing)"},
    # VFMTok2 test_c2i.py + sampling yaml: ODE Euler over t = 1 - linspace(0, 0.999, 100) (t = 1 noise), shifted by
    # time_dist_shift = sqrt(65536 / 4096) = 4: 99 steps ending at t = 0.004 (no final step to 0); latents
    # denormalised as x * (var + 1e-5) + mean; guidance over the whole time range (t-min 0, t-max 1).
    "vfmtok2-flow": {"num_inference_steps": 99, "shift": 4.0, "final_sigma": 0.001,
                     "description": "Euler ODE, 99 steps over sigma = 1 - linspace(0, 0.999, 100) shifted by "
                                    "sqrt(65536 / 4096) = 4 (ends at sigma 0.004), guidance at every step, latents "
                                    "denormalised as x * (var + 1e-5) + mean"},
}


@dataclass(frozen=True)
class Release:
    """One official release that becomes one pipeline. ``files`` maps a role (``tokenizer``, ``generator``,
    ``weak_generator``, ``latent_stats``) to a path in ``repo_id`` or to an ``https://`` URL; ``configs`` maps
    ``tokenizer`` / ``generator`` to a shipped config; ``sha256`` maps a file (path or URL) to its digest where
    known. ``published``: the authors' numbers (ImageNet 256, 50k samples); ``guidance_scale``: the default scale of
    the pipeline (None: no guidance)."""

    kind: str
    repo_id: str
    files: Mapping[str, str]
    configs: Mapping[str, str]
    published: Mapping[str, Any]
    protocol: str
    guidance_scale: Optional[float] = None
    sha256: Mapping[str, str] = field(default_factory=dict)
    code: str = ""
    sampler_options: Mapping[str, Any] = field(default_factory=dict)  # AR defaults (schedule, power, temperature)


def _gpt(size: str, checkpoint: str, guided: float, unguided: float) -> Release:
    return Release(
        kind="vfmtok-gpt", repo_id=VFMTOK_HUB,
        files={"tokenizer": "DINOv2/tokenizer/vfmtok-tokenizer.pt", "generator": f"DINOv2/GPT-{size}/{checkpoint}"},
        configs={"tokenizer": "configs/tokenizer/vfmtok-l.yaml", "generator": f"configs/ar/gpt-{size.lower()}.yaml"},
        published={"gFID with CFG": guided, "gFID without CFG": unguided,
                   "guidance": "CFG, scale not published"},
        protocol="vfmtok-ar", code="https://github.com/CVMI-Lab/VFMTok")


def _ditdh(epochs: int, guided: float, unguided: float, autoguidance: bool) -> Release:
    files = {"tokenizer": "tokenizer/vfmae-tokenizer.pt", "generator": f"DiTDH-XL/DiTDH-XL_{epochs}e.pt",
             "latent_stats": VFMTOK2_STATS_URL}
    if autoguidance:  # the weak model of configs/denoise/sampling/ImageNet256/DiTDHXL-DINOv2-B_AG.yaml
        files["weak_generator"] = "DiTDH-XL/DiTDH-XL_20e.pt"
    return Release(
        kind="vfmae-ditdh", repo_id=VFMTOK_HUB, files=files,
        configs={"tokenizer": "configs/tokenizer/vfmae-l.yaml", "generator": "configs/flow/ditdh-xl.yaml"},
        published={"gFID with autoguidance": guided, "gFID without guidance": unguided,
                   "guidance": "autoguidance 1.37 with the 20-epoch model (DiTDHXL-DINOv2-B_AG.yaml)" if autoguidance
                   else "none"},
        protocol="vfmtok2-flow", guidance_scale=1.37 if autoguidance else None,
        sha256={VFMTOK2_STATS_URL: VFMTOK2_STATS_SHA256}, code="https://github.com/CVMI-Lab/VFMTok2")


def _rar(name: str) -> Release:
    """A VFMTok-RAR release; its facts (files, configs, published numbers, sampling) are data in
    :data:`vfmtok.generators.convert_rar.RAR_RELEASES`."""
    from vfmtok.generators.convert_rar import RAR_RELEASES, TOKENIZER_RELEASE

    facts = RAR_RELEASES[name]
    sampling = dict(facts["sampling"])
    scale = sampling.pop("guidance_scale")
    with_cfg, without = facts["published"]["with_cfg"], facts["published"]["without_cfg"]
    return Release(
        kind="vfmtok-rar", repo_id=VFMTOK_HUB,
        files={"tokenizer": TOKENIZER_RELEASE["path"], "generator": facts["path"]},
        configs={"tokenizer": TOKENIZER_RELEASE["config"], "generator": facts["config"]},
        published={"gFID with CFG": with_cfg["gfid"], "gFID without CFG": without["gfid"],
                   "guidance": f"{sampling['guidance_schedule']} CFG, scale {scale:g}, power {sampling['guidance_power']:g} "
                               f"(the released training config's)"},
        protocol="vfmtok-ar", guidance_scale=scale, sampler_options=sampling,
        code="https://github.com/CVMI-Lab/VFMTok-RAR")


RELEASES: dict[str, Release] = {
    "vfmtok-gpt-b": _gpt("B", "GPT-B-300e.pt", 3.43, 3.09),
    "vfmtok-gpt-l": _gpt("L", "GPT-L-300e.pt", 2.76, 2.15),
    "vfmtok-gpt-xl": _gpt("XL", "GPT-XL-200e.pt", 2.38, 2.06),
    "vfmtok-gpt-xxl": _gpt("XXL", "GPT-XXL-200e.pt", 2.28, 2.09),
    "vfmtok-gpt-2b": _gpt("2B", "GPT-2B-200e.pt", 2.27, 2.20),
    "vfmtok-gpt-3b": _gpt("3B", "GPT-3B-200e.pt", 2.07, 2.04),
    "vfmae-ditdh-xl-80ep": _ditdh(80, 1.68, 3.29, autoguidance=False),
    "vfmae-ditdh-xl-80ep-ag": _ditdh(80, 1.68, 3.29, autoguidance=True),
    "vfmae-ditdh-xl-800ep": _ditdh(800, 1.25, 1.65, autoguidance=False),
    "vfmae-ditdh-xl-800ep-ag": _ditdh(800, 1.25, 1.65, autoguidance=True),
    "vfmtok-rar-l-ultra": _rar("RAR-L-ultra"),
    "vfmtok-rar-l": _rar("RAR-L"),
    "vfmtok-rar-xl": _rar("RAR-XL"),
    "vfmtok-rar-xxl": _rar("RAR-XXL"),
}


# -- downloading ----------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _download_url(url: str, sha256: str, cache_dir: Optional[str | Path]) -> Path:
    """A file outside the Hub, kept in the Hub cache folder under its sha256 (known in advance: a URL file without
    one in the table is refused), downloaded once; offline only the cached copy counts."""
    from huggingface_hub import constants

    from vfmtok.tokenizer.utils.atomic import atomic_file

    target = Path(cache_dir or constants.HF_HUB_CACHE) / "vfmtok-url-files" / sha256 / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    if _hub_offline():
        raise MissingFileError(f"{url} is not in the cache ({target}) and HF_HUB_OFFLINE is set")
    import torch

    with atomic_file(target) as temporary:
        try:
            torch.hub.download_url_to_file(url, str(temporary), progress=False)
        except Exception as error:  # network errors of every kind
            raise MissingFileError(f"cannot download {url}: {type(error).__name__}: {error}") from error
    return target


def download_release_files(release: Release, revision: Optional[str] = None,
                           cache_dir: Optional[str | Path] = None) -> dict[str, tuple[Path, str]]:
    """role -> (local path, sha256) of every file of ``release``; a file missing from the repo (or the cache,
    offline) is a :class:`MissingFileError` naming it, a digest that differs from the table's a
    :class:`CheckpointError` naming the file and both digests."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    found = {}
    for role, name in release.files.items():
        if name.startswith("https://"):
            if name not in release.sha256:
                raise InvalidValueError(f"the release table names {name} without its sha256")
            path = _download_url(name, release.sha256[name], cache_dir)
        else:
            try:
                path = Path(hf_hub_download(release.repo_id, name, revision=revision, cache_dir=cache_dir))
            except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, FileNotFoundError) as error:
                where = f"{release.repo_id}/{name}" + (f" (revision {revision})" if revision else "")
                offline = " (HF_HUB_OFFLINE is set and it is not in the cache)" if _hub_offline() else ""
                raise MissingFileError(f"release file {where} is not available{offline}: "
                                       f"{type(error).__name__}") from error
        digest = file_sha256(path)
        expected = release.sha256.get(name)
        if expected is not None and digest != expected:
            raise CheckpointError(f"release file {name} has sha256 {digest}, expected {expected}: a different or "
                                  f"corrupt file")
        found[role] = (path, digest)
    return found


# -- converters, one per release kind -------------------------------------------------------------------------------
def _build(config: str):
    from vfmtok.pipelines.config import build_model, config_path

    return build_model(config_path(config))


def _convert_vfmtok_gpt(files: Mapping[str, Path], release: Release, prefer: str):
    """VFMTok ``VQModel`` + LlamaGen GPT (CVMI-Lab/VFMTok) -> (tokenizer, generator, weak generator)."""
    from vfmtok.generators.convert_gpt import convert_llamagen_checkpoint
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    tokenizer, generator = _build(release.configs["tokenizer"]), _build(release.configs["generator"])
    convert_reference_checkpoint(files["tokenizer"], tokenizer, prefer=prefer)
    convert_llamagen_checkpoint(files["generator"], generator, prefer=prefer)
    return tokenizer, generator, None


def _convert_vfmae_denoiser(files: Mapping[str, Path], release: Release, prefer: str):
    """VFMAE ``AutoencoderAE`` + DiT^DH or LightningDiT (+ its weak model) with the release's latent statistics
    (CVMI-Lab/VFMTok2)."""
    from vfmtok.generators.convert_dit import convert_ddt_checkpoint, convert_lightningdit_checkpoint
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    convert_denoiser = convert_lightningdit_checkpoint if release.kind == "vfmae-lightningdit" else \
        convert_ddt_checkpoint

    tokenizer = _build(release.configs["tokenizer"])
    convert_reference_checkpoint(files["tokenizer"], tokenizer, prefer=prefer)
    models = []
    for role in ("generator", "weak_generator"):
        if role in files:
            model = _build(release.configs["generator"])
            convert_denoiser(files[role], model, prefer=prefer, latent_stats=files["latent_stats"],
                             stats_convention="vfmtok2")
            models.append(model)
    return tokenizer, models[0], models[1] if len(models) > 1 else None


def _convert_vfmtok_rar(files: Mapping[str, Path], release: Release, prefer: str):
    """VFMTok ``VQModel`` + RAR ``model.safetensors`` (CVMI-Lab/VFMTok-RAR) -> (tokenizer, generator, None)."""
    from vfmtok.generators.convert_rar import convert_rar_checkpoint
    from vfmtok.tokenizer.convert import convert_reference_checkpoint

    tokenizer, generator = _build(release.configs["tokenizer"]), _build(release.configs["generator"])
    convert_reference_checkpoint(files["tokenizer"], tokenizer, prefer=prefer)
    convert_rar_checkpoint(files["generator"], generator, prefer=prefer)
    return tokenizer, generator, None


CONVERTERS: dict[str, Callable[[Mapping[str, Path], Release, str], tuple]] = {
    "vfmtok-gpt": _convert_vfmtok_gpt,
    "vfmtok-rar": _convert_vfmtok_rar,
    "vfmae-ditdh": _convert_vfmae_denoiser,
    # VFMTok2's code trains LightningDiT too (configs/flow/lightningdit-*.yaml), but no checkpoint is published yet:
    # a release of it is one Release(kind="vfmae-lightningdit", ...) entry.
    "vfmae-lightningdit": _convert_vfmae_denoiser,
}


def apply_protocol(pipe, protocol: str, guidance_scale: Optional[float] = None) -> None:
    """Make ``PROTOCOLS[protocol]`` the pipeline's defaults (saved with it)."""
    settings = PROTOCOLS[protocol]
    if "resize_antialias" in settings:
        pipe.set_resize_protocol(settings["resize_antialias"], settings.get("output_size"))
    if "num_inference_steps" in settings:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=settings["shift"])
        pipe.set_sampling_protocol(settings["num_inference_steps"], settings["final_sigma"])
    if guidance_scale is not None:
        pipe.set_default_guidance_scale(guidance_scale)


def _source_record(name: str, release: Release, files: Mapping[str, tuple[Path, str]],
                   revision: Optional[str]) -> dict[str, Any]:
    return {"release": name, "repo_id": release.repo_id, "revision": revision or "main", "code": release.code,
            "files": {role: {"file": release.files[role], "sha256": digest} for role, (_, digest) in files.items()},
            "published": dict(release.published), "sampling_protocol": PROTOCOLS[release.protocol]["description"],
            "default_guidance_scale": release.guidance_scale,
            **({"default_sampler_options": dict(release.sampler_options)} if release.sampler_options else {})}


def convert_release(name: str, output_dir: str | Path, revision: Optional[str] = None,
                    cache_dir: Optional[str | Path] = None, prefer: str = "ema", vfm_source: Optional[str] = None,
                    releases: Optional[Mapping[str, Release]] = None) -> Path:
    """Download, check, convert and save the release ``name`` as a pipeline folder ``output_dir``.

    ``vfm_source``: where the tokenizer's VFM weights come from (default: the config's, e.g.
    ``facebook/dinov2-with-registers-large`` through the same Hub cache; a config naming none keeps its random VFM).
    ``releases``: the table to use (default :data:`RELEASES`)."""
    from vfmtok.pipelines.convert import assemble_pipeline
    from vfmtok.tokenizer.utils.atomic import atomic_directory

    table = RELEASES if releases is None else releases
    if name not in table:
        raise InvalidValueError(f"unknown release {name!r}; known: {', '.join(sorted(table))}")
    release = table[name]
    if release.kind not in CONVERTERS:
        raise InvalidValueError(f"release {name!r} has kind {release.kind!r}, which no converter handles "
                                f"({', '.join(sorted(CONVERTERS))})")
    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(f"output directory {str(output)!r} already exists and is not empty")
    files = download_release_files(release, revision=revision, cache_dir=cache_dir)
    tokenizer, generator, weak = CONVERTERS[release.kind]({role: path for role, (path, _) in files.items()},
                                                          release, prefer)
    if vfm_source is not None or (tokenizer.vfm is not None and tokenizer.vfm.pretrained is not None):
        tokenizer.load_vfm_weights(vfm_source)
    pipe = assemble_pipeline(tokenizer, generator, weak_generator=weak)
    apply_protocol(pipe, release.protocol, release.guidance_scale)
    if release.sampler_options:
        pipe.set_default_sampler_options(dict(release.sampler_options))
    pipe.set_source(_source_record(name, release, files, revision))
    with atomic_directory(output) as staging:
        pipe.save_pretrained(staging)
    return output


def release_table_markdown(releases: Optional[Mapping[str, Release]] = None) -> str:
    """The README's table of releases."""
    rows = ["| name | files | published gFID | protocol |", "|---|---|---|---|"]
    for name, release in (RELEASES if releases is None else releases).items():
        files = ", ".join(f"`{f.rsplit('/', 1)[-1]}`" for f in release.files.values())
        numbers = "; ".join(f"{k} {v}" for k, v in release.published.items())
        rows.append(f"| `{name}` | {files} | {numbers} | {release.protocol} |")
    return "\n".join(rows)
