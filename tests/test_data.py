"""Tests of pipelines.data: dataset loading, ADM augmentation, broken-file handling, resumable sampling."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vfmtok.pipelines import data as data_module
from vfmtok.pipelines.data import (ImageDataset, ResumableBatchSampler, StreamingImageDataset, adm_center_crop,
                            adm_random_crop, build_dataloader, class_names, collate_images, decode_image,
                            load_image_dataset, sample_seed)

SHARED = Path(os.environ.get("VFMTOK_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SAMPLES = SHARED / "data" / "imagenet-1k-samples-256"
needs_samples = pytest.mark.skipif(not (SAMPLES / "labels.csv").is_file(), reason=f"{SAMPLES} not available")


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def image_bytes(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def tiny_dataset(num: int, labels: bool = True) -> datasets.Dataset:
    """``num`` distinct small PNG images (as bytes) with labels 0..num-1."""
    columns = {"image": [{"bytes": image_bytes(random_image(40 + i % 5, 36 + i % 3, i), "PNG"), "path": None}
                         for i in range(num)]}
    features = {"image": datasets.Image(decode=False)}
    if labels:
        columns["label"], features["label"] = list(range(num)), datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

@needs_samples
def test_labels_csv_folder_loads_the_shared_samples_with_their_labels():
    with (SAMPLES / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dataset = load_image_dataset(str(SAMPLES))
    assert dataset.column_names == ["image", "label"] and len(dataset) == len(rows) == 1000
    assert dataset.features["label"].dtype == "int64"
    assert [Path(x["path"]).name for x in dataset["image"]] == [row["file"] for row in rows]
    assert dataset["label"] == [int(row["class_index"]) for row in rows]
    sample = ImageDataset(dataset, image_size=64)[(5, 1)]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["label"] == int(rows[5]["class_index"]) and sample["index"] == 5


def test_labels_csv_errors(tmp_path):
    random_image(8, 8, 0).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("name,class_index\na.png,0\n")
    with pytest.raises(ValueError, match="'file' and 'class_index'"):
        load_image_dataset(str(tmp_path))
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,0\nmissing.png,1\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image_dataset(str(tmp_path))
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,zero\n")
    with pytest.raises(ValueError, match="'zero'"):
        load_image_dataset(str(tmp_path))


def test_class_subfolders_give_sorted_class_ids(tmp_path):
    layout = {"zebra": ["1.JPG", "2.png"], "ant": ["x.jpeg", "nested/y.webp"], "mole": ["m.BMP"]}
    for folder, files in layout.items():
        for i, name in enumerate(files):
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            suffix = Path(name).suffix.lower()
            format = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[suffix]
            random_image(12, 10, i).save(tmp_path / folder / name, format=format)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    random_image(12, 10, 0).save(tmp_path / ".hidden" / "h.png")

    dataset = load_image_dataset(str(tmp_path))
    names = sorted(layout)
    assert class_names(dataset) == names
    found = {Path(x["path"]).relative_to(tmp_path).as_posix(): label
             for x, label in zip(dataset["image"], dataset["label"])}
    expected = {f"{folder}/{name}": names.index(folder) for folder, files in layout.items() for name in files}
    assert found == expected

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_image_dataset(str(tmp_path))
    (tmp_path / "empty").rmdir()
    random_image(12, 10, 0).save(tmp_path / "top.png")
    with pytest.raises(ValueError, match="top level"):
        load_image_dataset(str(tmp_path))


def test_flat_folder_is_unlabeled(tmp_path):
    for name in ("b.png", "a.jpg", "c.JPEG"):
        random_image(10, 10, 0).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "readme.md").write_text("ignored")
    dataset = load_image_dataset(str(tmp_path))
    assert [Path(x["path"]).name for x in dataset["image"]] == ["a.jpg", "b.png", "c.JPEG"]
    assert dataset["label"] == [-1, -1, -1] and class_names(dataset) is None


def test_missing_local_source_raises():
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_image_dataset("./does-not-exist")


def test_saved_dataset_and_parquet_with_column_detection(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    base = tiny_dataset(6)
    other = datasets.Dataset.from_dict(
        {"jpg": base["image"], "cls": [np.int32(v) for v in base["label"]], "caption": [str(i) for i in range(6)]},
        features=datasets.Features({"jpg": datasets.Image(), "cls": datasets.Value("int32"),
                                    "caption": datasets.Value("string")}))
    other.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": other}).save_to_disk(str(tmp_path / "saved_dict"))
    other.to_parquet(str(tmp_path / "data.parquet"))

    expected_bytes = [x["bytes"] for x in base["image"]]
    for source, split in ((tmp_path / "saved", "train"), (tmp_path / "saved_dict", "validation"),
                          (tmp_path / "data.parquet", "train")):
        dataset = load_image_dataset(str(source), split=split)
        assert dataset.column_names == ["image", "label"], source
        assert dataset.features["image"] == datasets.Image(decode=False)
        assert dataset.features["label"] == datasets.Value("int64")
        assert dataset["label"] == list(range(6))
        assert [x["bytes"] for x in dataset["image"]] == expected_bytes

    with pytest.raises(ValueError, match="available"):
        load_image_dataset(str(tmp_path / "saved_dict"), split="train")
    streamed = load_image_dataset(str(tmp_path / "data.parquet"), streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [example["label"] for example in streamed] == list(range(6))
    # an explicit image column, the label column still auto-detected ('cls'); then no label column at all -> -1
    explicit = load_image_dataset(str(tmp_path / "saved"), image_column="jpg")
    assert explicit["label"] == list(range(6))
    relabeled = load_image_dataset(str(tmp_path / "saved"), image_column="jpg", label_column="caption")
    assert class_names(relabeled) == sorted(str(i) for i in range(6))  # strings -> ClassLabel
    no_labels = datasets.Dataset.from_dict({"picture": base["image"]},
                                           features=datasets.Features({"picture": datasets.Image()}))
    no_labels.save_to_disk(str(tmp_path / "no_labels"))
    loaded = load_image_dataset(str(tmp_path / "no_labels"))
    assert loaded["label"] == [-1] * 6 and loaded.column_names == ["image", "label"]
    streamed = load_image_dataset(str(tmp_path / "no_labels"), streaming=True)
    assert [example["label"] for example in streamed] == [-1] * 6
    assert streamed.features["label"] == datasets.Value("int64")

    text_only = datasets.Dataset.from_dict({"caption": ["a"], "label": [0]})
    text_only.save_to_disk(str(tmp_path / "text_only"))
    with pytest.raises(ValueError, match=r"\['caption', 'label'\]"):
        load_image_dataset(str(tmp_path / "text_only"))
    with pytest.raises(ValueError, match="'photo'"):
        load_image_dataset(str(tmp_path / "saved"), image_column="photo")


# ----------------------------------------------------------------------------------------------------------------
# Decoding and broken files
# ----------------------------------------------------------------------------------------------------------------

def test_broken_files_are_skipped_and_counted(tmp_path):
    good = random_image(50, 40, 0)
    good.save(tmp_path / "good.jpg", quality=95)
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    dataset = ImageDataset(load_image_dataset(str(tmp_path)), image_size=32, augment="center", flip=False)
    names = [Path(x["path"]).name for x in dataset.dataset["image"]]
    assert names == ["empty.png", "good.jpg", "text.jpg", "truncated.jpg"]

    sampler = ResumableBatchSampler(len(dataset), batch_size=2, seed=0, shuffle=False)
    batches = list(build_dataloader(dataset, sampler, batch_size=2, num_workers=0, pin_memory=False))
    assert [b["num_skipped"] for b in batches] == [1, 2]
    assert batches[0]["images"].shape == (1, 3, 32, 32) and batches[0]["indices"].tolist() == [1]
    assert batches[1]["images"].shape == (0, 3, 32, 32) and batches[1]["labels"].shape == (0,)
    skipped = batches[0]["skipped"] + batches[1]["skipped"]
    for name, reason in (("empty.png", "UnidentifiedImageError"), ("text.jpg", "UnidentifiedImageError"),
                         ("truncated.jpg", "truncated")):
        assert any(message.startswith(str(tmp_path / name)) and reason in message for message in skipped), skipped
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ValueError, match="empty list"):
        collate_images([])


@pytest.mark.parametrize("mode,format", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")])
def test_decode_converts_every_mode_to_rgb(mode, format):
    source = random_image(20, 16, 3).convert(mode)
    decoded = decode_image({"bytes": image_bytes(source, format), "path": None})
    assert decoded.mode == "RGB" and decoded.size == (20, 16)
    pixels = np.asarray(decoded)
    if mode == "L":
        expected = np.repeat(np.asarray(source)[..., None], 3, axis=2)
    elif mode == "RGBA":
        expected = np.asarray(source)[..., :3]
    elif mode == "P":
        expected = np.asarray(source.getpalette(), dtype=np.uint8).reshape(-1, 3)[np.asarray(source)]
    else:
        return  # CMYK -> RGB is PIL's colour conversion; only the mode and size are checked
    np.testing.assert_array_equal(pixels, expected)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------

def naive_short_side_resize(image: Image.Image, short_side: int) -> np.ndarray:
    """ADM's resize written out step by step: BOX halvings while the short side allows, then one BICUBIC resize."""
    width, height = image.size
    while width >= 2 * short_side and height >= 2 * short_side:
        width, height = width // 2, height // 2
        image = image.resize((width, height), Image.BOX)
    if width <= height:
        new_size = (short_side, round(height * short_side / width))
    else:
        new_size = (round(width * short_side / height), short_side)
    return np.array(image.resize(new_size, Image.BICUBIC))


@pytest.mark.parametrize("size", [32, 64, 256, 600])
def test_adm_center_crop_matches_naive_reference(size):
    image = random_image(700, 500, 7)
    resized = naive_short_side_resize(image, size)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    expected = resized[top:top + size, left:left + size]
    np.testing.assert_array_equal(np.asarray(adm_center_crop(image, size)), expected)
    portrait = image.transpose(Image.Transpose.ROTATE_90)  # 500 x 700
    resized = naive_short_side_resize(portrait, size)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    expected = resized[top:top + size, left:left + size]
    np.testing.assert_array_equal(np.asarray(adm_center_crop(portrait, size)), expected)


def test_adm_random_crop_range_windows_and_reproducibility(monkeypatch):
    size = 30
    image = random_image(97, 61, 11)
    drawn: list[int] = []
    original = data_module._resize_short_side

    def recording(image: Image.Image, short_side: int) -> Image.Image:
        drawn.append(short_side)
        return original(image, short_side)

    monkeypatch.setattr(data_module, "_resize_short_side", recording)
    tops, lefts = set(), set()
    for seed in range(150):
        crop = np.asarray(adm_random_crop(image, size, np.random.default_rng(seed)))
        assert crop.shape == (size, size, 3)
        resized = naive_short_side_resize(image, drawn[-1])
        windows = [(t, l) for t in range(resized.shape[0] - size + 1) for l in range(resized.shape[1] - size + 1)
                   if np.array_equal(resized[t:t + size, l:l + size], crop)]
        assert windows, f"seed {seed}: the crop is no window of the resized image"
        tops.add(windows[0][0])
        lefts.add(windows[0][1])
        again = adm_random_crop(image, size, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.asarray(again), crop)
    # ADM: short side uniform over [ceil(S / max_crop_frac), ceil(S / min_crop_frac)] with fractions 1.0 and 0.8.
    assert set(drawn) == set(range(math.ceil(size / 1.0), math.ceil(size / 0.8) + 1))
    assert 0 in tops and 0 in lefts and max(lefts) >= 10  # positions vary over the whole long side
    with pytest.raises(ValueError, match="min_scale"):
        adm_random_crop(image, size, np.random.default_rng(0), min_scale=0.9)
    with pytest.raises(ValueError, match="positive integer"):
        adm_center_crop(image, 0)


def test_image_dataset_seed_controls_crop_and_flip():
    dataset = ImageDataset(tiny_dataset(3), image_size=32, augment="adm", flip=True)
    first = [dataset[(1, seed)]["image"] for seed in range(40)]
    assert all(torch.equal(a, dataset[(1, seed)]["image"]) for seed, a in enumerate(first))
    assert len({a.numpy().tobytes() for a in first}) > 20
    centre = ImageDataset(tiny_dataset(3), image_size=32, augment="center", flip=True)
    plain = ImageDataset(tiny_dataset(3), image_size=32, augment="center", flip=False)[1]["image"]
    outputs = [centre[(1, seed)]["image"] for seed in range(40)]
    flips = sum(torch.equal(o, plain.flip(-1)) for o in outputs)
    assert flips + sum(torch.equal(o, plain) for o in outputs) == 40 and 5 < flips < 35
    expected = np.asarray(adm_center_crop(decode_image(dataset.dataset[1]["image"]), 32), dtype=np.float64)
    np.testing.assert_allclose(plain.permute(1, 2, 0).numpy(), expected / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="augment"):
        ImageDataset(tiny_dataset(1), image_size=32, augment="random")
    with pytest.raises(ValueError, match="decode=False"):
        ImageDataset(tiny_dataset(1).cast_column("image", datasets.Image()), image_size=32)


# ----------------------------------------------------------------------------------------------------------------
# Sampler and loader
# ----------------------------------------------------------------------------------------------------------------

def epoch_batches(sampler: ResumableBatchSampler, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch)
    sampler.set_start_batch(start)
    return list(sampler)


def test_sampler_shards_cover_every_index_once():
    samplers = [ResumableBatchSampler(48, batch_size=4, seed=5, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [[i for batch in epoch_batches(s, 2) for i, _ in batch] for s in samplers]
    assert all(len(s) == 4 for s in samplers) and all(len(p) == 16 for p in per_rank)
    assert sorted(sum(per_rank, [])) == list(range(48))
    # strided shares of one permutation: the single-rank order, interleaved
    whole = [i for batch in epoch_batches(ResumableBatchSampler(48, 4, seed=5), 2) for i, _ in batch]
    assert per_rank == [whole[r::3] for r in range(3)]

    padded = [ResumableBatchSampler(50, batch_size=4, seed=5, drop_last=False, num_replicas=3, rank=r)
              for r in range(3)]
    shares = [[i for batch in epoch_batches(s, 0) for i, _ in batch] for s in padded]
    assert [len(s) for s in padded] == [5, 5, 5] and [len(s) for s in shares] == [17, 17, 17]
    assert set(sum(shares, [])) == set(range(50))
    trimmed = [ResumableBatchSampler(50, batch_size=4, seed=5, num_replicas=3, rank=r) for r in range(3)]
    shares = [[i for batch in epoch_batches(s, 0) for i, _ in batch] for s in trimmed]
    assert [len(s) for s in shares] == [16, 16, 16] and len(set(sum(shares, []))) == 48


def test_sampler_order_is_a_pure_function_of_seed_and_epoch():
    sampler = ResumableBatchSampler(64, batch_size=8, seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    order = epoch_batches(sampler, 3)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)  # the global RNG has no influence
    assert epoch_batches(ResumableBatchSampler(64, batch_size=8, seed=1), 3) == order
    assert epoch_batches(sampler, 4) != order
    assert epoch_batches(ResumableBatchSampler(64, batch_size=8, seed=2), 3) != order
    assert sorted(i for batch in order for i, _ in batch) == list(range(64))
    seeds = [s for batch in order for _, s in batch]
    assert all(0 <= s < 2 ** 63 for s in seeds) and len(set(seeds)) == 64
    assert all(s == sample_seed(1, 3, i) for batch in order for i, s in batch)
    assert sample_seed(1, 3, 0) != sample_seed(1, 4, 0) != sample_seed(2, 3, 0)
    unshuffled = ResumableBatchSampler(10, batch_size=5, seed=0, shuffle=False)
    assert [[i for i, _ in batch] for batch in epoch_batches(unshuffled, 7)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_sampler_start_batch_yields_the_tail():
    sampler = ResumableBatchSampler(70, batch_size=8, seed=9, num_replicas=2, rank=1)
    full = epoch_batches(sampler, 1)
    assert len(full) == len(sampler) == 4
    for start in range(len(full) + 1):
        assert epoch_batches(sampler, 1, start) == full[start:]
    sampler.set_start_batch(2)
    sampler.set_epoch(1)  # a new epoch starts from its first batch
    assert list(sampler) == full
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        sampler.set_start_batch(5)
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(70, batch_size=8, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="no full batch"):
        ResumableBatchSampler(7, batch_size=8, seed=0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader_leaves_the_global_rng_alone(num_workers):
    dataset = ImageDataset(tiny_dataset(8), image_size=16)
    sampler = ResumableBatchSampler(len(dataset), batch_size=4, seed=0)
    loader = build_dataloader(dataset, sampler, batch_size=4, num_workers=num_workers, pin_memory=False)
    torch.manual_seed(42)
    state = torch.get_rng_state()
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["images"].shape == (4, 3, 16, 16)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="sampler's batch_size"):
        build_dataloader(dataset, sampler, batch_size=8, num_workers=0, pin_memory=False)
    with pytest.raises(ValueError, match="ResumableBatchSampler"):
        build_dataloader(dataset, None, batch_size=4, num_workers=0, pin_memory=False)


def run_epoch(dataset: ImageDataset, epoch: int, start: int, num_workers: int, seed: int = 3):
    sampler = ResumableBatchSampler(len(dataset), batch_size=4, seed=seed, num_replicas=2, rank=1)
    loader = build_dataloader(dataset, sampler, batch_size=4, num_workers=num_workers, pin_memory=False)
    sampler.set_epoch(epoch)
    sampler.set_start_batch(start)
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["indices"], y["indices"]) and x["skipped"] == y["skipped"]


def test_pipeline_is_bitwise_reproducible_and_resumable():
    dataset = ImageDataset(tiny_dataset(20), image_size=24, augment="adm", flip=True)
    full = run_epoch(dataset, epoch=1, start=0, num_workers=0)
    assert len(full) == 2
    assert_same_batches(full, run_epoch(dataset, epoch=1, start=0, num_workers=1))  # worker processes too
    assert_same_batches(full[1:], run_epoch(dataset, epoch=1, start=1, num_workers=0))  # resume mid-epoch
    # each sample equals its independent decode with the sampler's seed
    for batch in full:
        for image, index in zip(batch["images"], batch["indices"].tolist()):
            assert torch.equal(image, dataset[(index, sample_seed(3, 1, index))]["image"])
    other = run_epoch(dataset, epoch=1, start=0, num_workers=0, seed=4)
    assert not torch.equal(full[0]["images"], other[0]["images"])


# ----------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------

def stream(num: int, world_size: int, rank: int, shuffle_buffer: int, seed: int = 0) -> StreamingImageDataset:
    return StreamingImageDataset(tiny_dataset(num).to_iterable_dataset(num_shards=4), image_size=16, seed=seed,
                                 shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size)


def test_streaming_shards_cover_everything_and_are_reproducible():
    for world_size, shuffle_buffer in ((2, 4), (3, 0)):
        labels = []
        for rank in range(world_size):
            samples = list(stream(12, world_size, rank, shuffle_buffer))
            again = list(stream(12, world_size, rank, shuffle_buffer))
            assert all(torch.equal(a["image"], b["image"]) and a["label"] == b["label"] for a, b in zip(samples, again))
            assert [s["index"] for s in samples] == list(range(len(samples)))
            labels += [s["label"] for s in samples]
        assert sorted(labels) == list(range(12)), (world_size, shuffle_buffer)
    epoch0 = stream(12, 1, 0, 4)
    order0 = [s["label"] for s in epoch0]
    epoch0.set_epoch(1)
    assert sorted(s["label"] for s in epoch0) == sorted(order0)
    assert [s["label"] for s in epoch0] != order0


def test_streaming_state_dict_resumes_exactly_without_shuffle_buffer():
    full_run = stream(12, 1, 0, shuffle_buffer=0)
    full_run.set_epoch(2)
    full = list(build_dataloader(full_run, None, batch_size=3, num_workers=0, pin_memory=False))
    interrupted = stream(12, 1, 0, shuffle_buffer=0)
    interrupted.set_epoch(2)
    loader = build_dataloader(interrupted, None, batch_size=3, num_workers=0, pin_memory=False)
    for step, batch in enumerate(loader):
        if step == 1:
            state = interrupted.state_dict()
            break
    assert state["epoch"] == 2 and state["num_yielded"] == 6
    resumed = stream(12, 1, 0, shuffle_buffer=0)
    resumed.load_state_dict(state)
    rest = list(build_dataloader(resumed, None, batch_size=3, num_workers=0, pin_memory=False))
    assert_same_batches(full[2:], rest)
    with pytest.raises(ValueError, match="num_yielded"):
        resumed.load_state_dict({"epoch": 0})
