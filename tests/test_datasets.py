import json

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from rar_hf.data import (  # noqa: E402
    ImageTransform,
    RARDataCollator,
    SkipCounter,
    center_crop_arr,
    decode_images,
    load_image_dataset,
    load_pretokenized_dataset,
    random_flip,
    read_official_jsonl,
    split_and_shuffle,
    ten_crop_arr,
    to_rgb,
    to_tensor,
)

IMAGE_FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def noise_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def image_rows():
    """Six images of assorted modes and sizes; row 3 is not an image at all."""
    images = [
        noise_image(40, 30, seed=0),
        noise_image(30, 44, "L", seed=1),
        noise_image(36, 36, "RGBA", seed=2),
        {"bytes": b"not an image", "path": None},
        noise_image(50, 20, "P", seed=4),
        noise_image(24, 32, "CMYK", seed=5),
    ]
    return {"image": images, "label": [10, 11, 12, 13, 14, 15]}


@pytest.fixture(scope="module")
def parquet_images(tmp_path_factory):
    """Two parquet shards of three rows each."""
    folder = tmp_path_factory.mktemp("images")
    ds = datasets.Dataset.from_dict(image_rows(), features=IMAGE_FEATURES)
    paths = [str(folder / "part-0.parquet"), str(folder / "part-1.parquet")]
    ds.select(range(3)).to_parquet(paths[0])
    ds.select(range(3, 6)).to_parquet(paths[1])
    return paths


# ---- image datasets ----


@pytest.mark.parametrize("streaming", [True, False])
def test_decode_skips_and_counts_corrupt_images(parquet_images, tmp_path, streaming):
    raw = load_image_dataset(parquet_images, streaming=streaming, cache_dir=str(tmp_path))
    assert raw.column_names == ["image", "label"]
    counter = SkipCounter()
    rows = list(decode_images(raw, ImageTransform(16, random_flip=False), skip_counter=counter))
    assert [row["label"] for row in rows] == [10, 11, 12, 14, 15]
    for row in rows:
        assert set(row) == {"pixel_values", "label"}
        pixels = row["pixel_values"]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert counter.count == 1
    assert "UnidentifiedImageError" in counter.last_error


def test_column_names_are_configurable_and_checked(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"jpg": [noise_image(20, 20)], "cls": [7], "json": ["{}"]},
        features=datasets.Features(
            {"jpg": datasets.Image(), "cls": datasets.Value("int64"), "json": datasets.Value("string")}
        ),
    )
    path = str(tmp_path / "wds-like.parquet")
    ds.to_parquet(path)
    raw = load_image_dataset(path, streaming=True, image_column="jpg", label_column="cls")
    assert raw.column_names == ["image", "label"]
    (row,) = decode_images(raw, ImageTransform(8, random_flip=False))
    assert row["label"] == 7 and row["pixel_values"].shape == (3, 8, 8)
    expected = r"\['image', 'label'\] not found .* available columns: \['jpg', 'cls', 'json'\]"
    with pytest.raises(ValueError, match=expected):
        load_image_dataset(path, streaming=True)


def test_local_folder_loads_like_a_hub_repo(tmp_path):
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict({"image": [noise_image(10, 10)] * 2, "label": [3, 4]}, features=IMAGE_FEATURES)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    raw = load_image_dataset(str(folder), split="train", streaming=True)
    assert [row["label"] for row in decode_images(raw, ImageTransform(4, random_flip=False))] == [3, 4]


def test_missing_parquet_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_image_dataset(str(tmp_path / "nope.parquet"))


def test_split_by_node_gives_disjoint_rows(parquet_images, monkeypatch):
    # Shuffled parquet streams sleep 5 s when their reader threads shut down (an arrow workaround).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    raw = load_image_dataset(parquet_images, streaming=True)
    labels = []
    for rank in range(2):
        part = split_and_shuffle(raw, rank, 2, seed=0, buffer_size=4)
        labels.append([row["label"] for row in part])
    assert set(labels[0]).isdisjoint(labels[1])
    assert sorted(labels[0] + labels[1]) == [10, 11, 12, 13, 14, 15]
    assert len(labels[0]) == len(labels[1]) == 3  # whole shards per rank
    with pytest.raises(ValueError, match="rank"):
        split_and_shuffle(raw, 2, 2)


def test_decoded_stream_through_dataloader_workers(parquet_images):
    raw = load_image_dataset(parquet_images, streaming=True)
    rows = decode_images(raw, ImageTransform(8, random_flip=False))
    loader = torch.utils.data.DataLoader(rows, batch_size=2, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    labels = sorted(int(label) for batch in batches for label in batch["label"])
    assert labels == [10, 11, 12, 14, 15]
    assert all(batch["pixel_values"].shape[1:] == (3, 8, 8) for batch in batches)


# ---- transforms ----


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_any_mode_becomes_rgb(mode):
    image = noise_image(12, 10, mode)
    assert to_rgb(image).mode == "RGB"
    assert center_crop_arr(image, 8).mode == "RGB"
    assert to_tensor(image).shape == (3, 10, 12)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("size", [(600, 400), (400, 600), (300, 200), (100, 100), (90, 120)])
def test_center_crop_shape(size):
    assert center_crop_arr(noise_image(*size), 100).size == (100, 100)


def test_center_crop_is_centred():
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 100:200] = 255  # a white middle third
    crop = np.array(center_crop_arr(Image.fromarray(arr), 100))
    assert (crop[:, 2:-2] == 255).all()


def test_ten_crop_matches_torchvision_tencrop():
    # A 281x281 input (int(1.1 * 256)) is not resized, so every crop is an exact slice of it.
    arr = np.array(noise_image(281, 281))
    crops = [np.array(crop) for crop in ten_crop_arr(Image.fromarray(arr), 256)]
    assert len(crops) == 10 and all(crop.shape == (256, 256, 3) for crop in crops)
    mirrored = arr[:, ::-1]
    expected = [
        arr[:256, :256], arr[:256, 25:], arr[25:, :256], arr[25:, 25:], arr[12:268, 12:268],
        mirrored[:256, :256], mirrored[:256, 25:], mirrored[25:, :256], mirrored[25:, 25:], mirrored[12:268, 12:268],
    ]  # fmt: skip
    for crop, reference in zip(crops, expected):
        np.testing.assert_array_equal(crop, reference)
    np.testing.assert_array_equal(crops[5], crops[1][:, ::-1])  # mirrored top-left = flipped top-right


def test_ten_crop_shapes_on_non_square_input():
    crops = ten_crop_arr(noise_image(400, 300, "L"), 64)
    assert [crop.size for crop in crops] == [(64, 64)] * 10
    assert all(crop.mode == "RGB" for crop in crops)


def test_random_flip_and_to_tensor():
    image = noise_image(6, 4)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(np.array(random_flip(image, rng, p=1.0)), np.array(image)[:, ::-1])
    assert random_flip(image, rng, p=0.0) is image
    tensor = to_tensor(image)
    assert tensor.shape == (3, 4, 6) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)


def test_image_transform_flips_reproducibly():
    image = noise_image(20, 16)
    plain = ImageTransform(8, random_flip=False)(image)
    transforms = [ImageTransform(8, seed=3), ImageTransform(8, seed=3), ImageTransform(8, seed=4)]
    outputs = [[t(image) for _ in range(30)] for t in transforms]
    assert all(torch.equal(out, plain) or torch.equal(out, plain.flip(-1)) for out in outputs[0])
    flips = [[torch.equal(out, plain.flip(-1)) for out in outs] for outs in outputs]
    assert flips[0] == flips[1] != flips[2]
    assert 0 < sum(flips[0]) < 30


# ---- pre-tokenised data ----


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(record) for record in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


OFFICIAL = [{"class_id": i, "tokens": [(i * 7 + j) % 1024 for j in range(16)]} for i in range(5)]


def test_read_official_jsonl(tmp_path):
    path = tmp_path / "maskgitvq.jsonl"
    write_jsonl(path, OFFICIAL, extra_lines=[""])
    rows = list(read_official_jsonl(path, num_tokens=16))
    assert rows == [{"tokens": r["tokens"], "label": r["class_id"]} for r in OFFICIAL]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"class_id": 1, "tokens": [1, 2', r"maskgitvq.jsonl:3: not valid JSON"),
        ('{"tokens": [1, 2]}', r":3: expected an object with 'class_id' and 'tokens'"),
        ('{"class_id": "cat", "tokens": [1]}', r":3: class_id must be an int"),
        ('{"class_id": 1, "tokens": [1, 2.5]}', r":3: tokens must be a list of ints"),
        ('{"class_id": 1, "tokens": [1, 2]}', r":3: expected 16 tokens, got 2"),
    ],
)
def test_read_official_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "maskgitvq.jsonl"
    write_jsonl(path, OFFICIAL[:2], extra_lines=[bad_line])
    with pytest.raises(ValueError, match=message):
        list(read_official_jsonl(path, num_tokens=16))


@pytest.mark.parametrize("streaming", [False, True])
def test_load_pretokenized_jsonl_feeds_the_collator(tmp_path, streaming):
    path = tmp_path / "maskgitvq.jsonl"
    write_jsonl(path, OFFICIAL)
    kwargs = {} if streaming else {"cache_dir": str(tmp_path / "cache")}
    ds = load_pretokenized_dataset(str(path), streaming=streaming, **kwargs)
    rows = list(ds)
    assert [row["label"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["tokens"] == OFFICIAL[2]["tokens"]
    collator = RARDataCollator(latent_size=(4, 4), anneal_start=0, anneal_end=0, class_dropout_prob=0.0)
    batch = collator(rows)
    assert batch["input_ids"].shape == (5, 17)
    assert batch["input_ids"][:, 0].tolist() == [1025 + i for i in range(5)]


def test_load_pretokenized_jsonl_cache_follows_file_changes(tmp_path):
    path = tmp_path / "maskgitvq.jsonl"
    write_jsonl(path, OFFICIAL[:2])
    assert len(load_pretokenized_dataset(str(path), cache_dir=str(tmp_path / "cache"))) == 2
    write_jsonl(path, OFFICIAL)
    assert len(load_pretokenized_dataset(str(path), cache_dir=str(tmp_path / "cache"))) == 5


def test_load_pretokenized_parquet_and_saved_folder(tmp_path):
    ds = datasets.Dataset.from_list(OFFICIAL)  # official column names: class_id, tokens
    path = str(tmp_path / "tokens.parquet")
    ds.to_parquet(path)
    loaded = load_pretokenized_dataset(path, label_column="class_id", cache_dir=str(tmp_path / "cache"))
    assert loaded.column_names == ["tokens", "label"] and loaded[4]["label"] == 4
    with pytest.raises(ValueError, match=r"\['label'\] not found .* available columns: \['class_id', 'tokens'\]"):
        load_pretokenized_dataset(path, streaming=True)

    loaded.save_to_disk(str(tmp_path / "saved"))
    streamed = load_pretokenized_dataset(str(tmp_path / "saved"), streaming=True)
    assert [row["label"] for row in streamed] == [0, 1, 2, 3, 4]
    assert len(load_pretokenized_dataset(str(tmp_path / "saved"))) == 5
