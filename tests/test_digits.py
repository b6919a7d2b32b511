import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from rar_hf.data import load_image_dataset  # noqa: E402
from rar_hf.data.digits import (  # noqa: E402
    build_digits_dataset,
    digits_to_images,
    images_to_digits,
    main,
    split_digits,
)
from rar_hf.data.transforms import to_tensor  # noqa: E402

LABEL_NAMES = [str(digit) for digit in range(10)]


@pytest.fixture(scope="module")
def digits16():
    return build_digits_dataset(image_size=16)


def test_splits_sizes_and_features(digits16):
    assert set(digits16) == {"train", "test"}
    # 1,797 digits, 20% held out (scikit-learn rounds the test share up).
    assert (len(digits16["train"]), len(digits16["test"])) == (1437, 360)
    for ds in digits16.values():
        assert ds.column_names == ["image", "label"]
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["label"].names == LABEL_NAMES


def test_images_are_grey_rgb_of_the_requested_size(digits16):
    for row in digits16["test"].select(range(5)):
        image = row["image"]
        assert image.mode == "RGB" and image.size == (16, 16)
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
        assert pixels.max() > 128  # strokes are bright, the background black


def test_values_are_scaled_to_the_full_byte_range():
    # At 8x8 the resize is the identity, so the pixels are exactly the 0..16 digits scaled to 0..255.
    ds = build_digits_dataset(image_size=8)["test"]
    test_x, test_y = split_digits()["test"]
    pixels = np.stack([np.asarray(row["image"])[..., 0] for row in ds.select(range(20))])
    np.testing.assert_array_equal(pixels, np.rint(test_x[:20] * 255 / 16).astype(np.uint8))
    assert ds["label"] == test_y.tolist()


def test_images_map_back_to_the_8x8_digits():
    digits = split_digits()["test"][0][:50]
    for size, tolerance in ((8, 0.5 * 16 / 255), (32, 1.0)):
        images = torch.stack([to_tensor(image) for image in digits_to_images(digits, size)])
        features = images_to_digits(images)
        assert features.shape == (50, 64)
        # Exact up to byte rounding at 8x8; at 32x32 the bicubic smoothing blurs strokes a little.
        assert np.abs(features - digits.reshape(50, 64)).mean() <= tolerance


def test_split_is_stratified_and_seeded(digits16):
    train, test = (np.bincount(digits16[split]["label"], minlength=10) for split in ("train", "test"))
    assert (train > 0).all() and (test > 0).all()
    # Every class is held out in (almost) the same proportion.
    np.testing.assert_allclose(test / (train + test), 0.2, atol=0.01)
    assert split_digits(seed=0)["test"][1].tolist() == digits16["test"]["label"]
    assert split_digits(seed=1)["test"][1].tolist() != digits16["test"]["label"]


def test_parquet_folder_loads_like_any_dataset(tmp_path):
    folder = tmp_path / "digits"
    main(["--output_dir", str(folder), "--image_size", "12"])
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert {split: len(ds) for split, ds in loaded.items()} == {"train": 1437, "test": 360}
    assert loaded["train"].features["label"].names == LABEL_NAMES
    assert loaded["train"][0]["image"].size == (12, 12)
    # The project's loader reads the folder too (as the training scripts do).
    test = load_image_dataset(str(folder), split="test", cache_dir=str(tmp_path / "cache"))
    assert len(test) == 360 and test.column_names == ["image", "label"]


def test_returns_the_loaded_folder(tmp_path):
    built = build_digits_dataset(tmp_path / "digits", image_size=8, cache_dir=str(tmp_path / "cache"))
    assert built["test"]["label"] == split_digits()["test"][1].tolist()


def test_rejects_images_smaller_than_the_digits():
    with pytest.raises(ValueError, match="at least 8"):
        build_digits_dataset(image_size=4)
