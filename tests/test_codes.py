"""Code / latent extraction for stage-two training and the dataset that reads it back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vfmtok.pipelines.cli import main
from vfmtok.pipelines.train.extract import CodesDataset, extract_tokens
from vfmtok.pipelines.config import build_model
from vfmtok.pipelines.data import adm_center_crop
from test_trainer import ROOT, needs_samples, small_image_folder


def saved_tokenizer(tmp_path, name="vfmtok-tiny"):
    """A random tiny tokenizer saved with its (random) VFM, so that loading it back gives the same model."""
    torch.manual_seed(0)
    model = build_model(ROOT / "configs" / "tokenizer" / f"{name}.yaml")
    model.save_pretrained(tmp_path / name)
    model.vfm.model.save_pretrained(tmp_path / f"{name}-vfm")
    return model.eval(), tmp_path / name, tmp_path / f"{name}-vfm"


def image_tensor(path, size):
    array = np.asarray(adm_center_crop(Image.open(path).convert("RGB"), size), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


@needs_samples
def test_codes_are_the_tokenizer_codes_of_the_crop_and_its_flip(tmp_path):
    model, path, vfm = saved_tokenizer(tmp_path)
    data = small_image_folder(tmp_path / "data", count=5, corrupt=1)
    assert main(["extract", "--tokenizer", str(path), "--data", str(data), "--output-dir", str(tmp_path / "codes"),
                 "--vfm-weights", str(vfm), "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert (meta["kind"], meta["num_images"], meta["num_views"], meta["unreadable"]) == ("codes", 6, 2, 1)
    codes = np.load(tmp_path / "codes" / "codes.npy")
    assert codes.shape == (6, 2, 16)
    files = [line.split(",")[0] for line in (data / "labels.csv").read_text().splitlines()[1:]]
    for row in (0, 3):
        image = image_tensor(data / files[row], 64)
        expected = model.encode(torch.cat([image, image.flip(-1)]))
        assert np.array_equal(codes[row], expected.numpy())
    dataset = CodesDataset(tmp_path / "codes")
    assert len(dataset) == 5  # the unreadable image is left out
    picks = {dataset[(0, seed)]["values"].tolist() == codes[0, 1].tolist() for seed in range(20)}
    assert picks == {True, False}  # both views get drawn
    assert dataset[(2, 7)]["values"].tolist() == dataset[(2, 7)]["values"].tolist()
    batch = CodesDataset.collate([dataset[(i, 1)] for i in range(3)])
    assert batch["values"].shape == (3, 16) and batch["values"].dtype == torch.long


@needs_samples
def test_ten_crop_views_and_continuous_latents(tmp_path):
    model, _, _ = saved_tokenizer(tmp_path, "vfmae-tiny")
    data = small_image_folder(tmp_path / "data", count=2)
    output = extract_tokens(model, str(data), tmp_path / "latents", ten_crop=True, batch_size=2, num_workers=0)
    latents = np.load(output / "latents.npy")
    size = model.config.image_size
    assert latents.shape == (2, 10, *model.latent_shape) and latents.dtype == np.float16
    files = [line.split(",")[0] for line in (data / "labels.csv").read_text().splitlines()[1:]]
    big = image_tensor(data / files[1], int(size * 1.1))
    top_left = big[..., :size, :size]
    offset = (big.shape[-1] - size + 1) // 2
    centre = big[..., offset:offset + size, offset:offset + size]
    expected = model.encode(torch.cat([top_left, centre, top_left.flip(-1)])).numpy()
    # views: 0 = top-left, 4 = centre, 5 = top-left crop of the flipped image, which is the flip of the top-right
    assert np.allclose(latents[1, 0], expected[0], atol=2e-2)
    assert np.allclose(latents[1, 4], expected[1], atol=2e-2)
    top_right_flipped = model.encode(big[..., :size, -size:].flip(-1)).numpy()
    assert np.allclose(latents[1, 5], top_right_flipped[0], atol=2e-2)


def test_missing_extraction_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vfmtok extract"):
        CodesDataset(tmp_path)


@needs_samples
def test_no_flip_stores_only_unflipped_views(tmp_path):
    """`extract --no-flip` (digits, text): one centre view, or LlamaGen's five crops without their mirror images."""
    model, _, _ = saved_tokenizer(tmp_path, "vfmtok-tiny")
    data = small_image_folder(tmp_path / "data", count=2)
    flipped = np.load(extract_tokens(model, str(data), tmp_path / "both", batch_size=2, num_workers=0) / "codes.npy")
    single = extract_tokens(model, str(data), tmp_path / "one", batch_size=2, num_workers=0, flip=False)
    codes = np.load(single / "codes.npy")
    assert codes.shape == (2, 1, 16) and np.array_equal(codes[:, 0], flipped[:, 0])
    assert json.loads((single / "meta.json").read_text())["flip"] is False
    five = np.load(extract_tokens(model, str(data), tmp_path / "five", ten_crop=True, flip=False, batch_size=2,
                                  num_workers=0) / "codes.npy")
    ten = np.load(extract_tokens(model, str(data), tmp_path / "ten", ten_crop=True, batch_size=2,
                                 num_workers=0) / "codes.npy")
    assert five.shape == (2, 5, 16) and np.array_equal(five, ten[:, :5])


@needs_samples
def test_a_full_disk_during_extraction_is_a_disk_full_error_not_a_bus_error(tmp_path, monkeypatch):
    """The memory-mapped outputs reserve their blocks first, so a full disk fails at creation with a clear error
    (a sparse map would die of SIGBUS while being filled) and leaves no staging directory."""
    import errno
    import os

    from vfmtok.tokenizer.utils.errors import DiskFullError

    model, _, _ = saved_tokenizer(tmp_path, "vfmtok-tiny")
    data = small_image_folder(tmp_path / "data", count=2)
    reserved = []

    def no_space(descriptor, offset, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError, match=r"disk is full.*codes"):
        extract_tokens(model, str(data), tmp_path / "out" / "codes", batch_size=2, num_workers=0)
    assert reserved and list((tmp_path / "out").iterdir()) == []
