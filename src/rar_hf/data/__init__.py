"""Data layer of RAR training: schedules, scan orders, collation, image transforms and datasets.

The ``datasets``-based loaders are imported on first use, so the rest works without the ``data`` extra.
"""

from importlib import import_module

from .collator import RARDataCollator
from .scan_orders import SCAN_ORDERS, get_scan_order
from .schedule import randomness_ratio
from .transforms import ImageTransform, center_crop_arr, random_flip, ten_crop_arr, to_rgb, to_tensor

_DATASETS_EXPORTS = (
    "SkipCounter",
    "class_names",
    "decode_images",
    "load_image_dataset",
    "load_pretokenized_dataset",
    "pretokenized_metadata_path",
    "read_official_jsonl",
    "read_pretokenized_metadata",
    "split_and_shuffle",
    "tokenizer_fingerprint",
)

__all__ = [
    "RARDataCollator",
    "SCAN_ORDERS",
    "get_scan_order",
    "randomness_ratio",
    "ImageTransform",
    "center_crop_arr",
    "random_flip",
    "ten_crop_arr",
    "to_rgb",
    "to_tensor",
    *_DATASETS_EXPORTS,
]


def __getattr__(name: str):
    if name in _DATASETS_EXPORTS:
        return getattr(import_module(".datasets", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
