"""The images an evaluation reads, and the cache of a reference's statistics.

- Samples: an ADM npz (uint8 NHWC under ``arr_0``) or a folder of RGB PNGs, all of one size (as ``rar-hf sample``
  writes them).
- Reference: an ADM reference batch npz (used as stored), or images of your own: an image folder (flat, or one
  sub-folder per class) or a ``datasets`` dataset folder (``save_to_disk``, parquet shards, ``imagefolder``). Those
  are brought to the samples' resolution as ADM prepared its reference batches (:func:`rar_hf.data.center_crop_arr`:
  RGB, short side resized, centre crop).
- The reference's Inception statistics (pool activations, FID and sFID means and covariances) are cached in an npz
  whose name and content carry a key: a hash of the exact pixels fed to Inception and of every setting that changes
  the numbers (Inception weights, preprocessing, format). A cache whose key does not match is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .fid import iter_npz_batches, read_npz_header

CACHE_FORMAT = 1
CACHE_PREFIX = "fid_reference-"
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


def check_images(shape: tuple, dtype: np.dtype, source: str) -> None:
    """Raise ``ValueError`` unless ``shape``/``dtype`` describe uint8 NHWC RGB images."""
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{source}: expected images of shape (N, H, W, 3), got {tuple(shape)}{hint}")
    if dtype != np.uint8:
        hint = " (floats in [0, 1]? store (x * 255).round().clip(0, 255).astype(np.uint8))" if dtype.kind == "f" else ""
        raise ValueError(f"{source}: expected uint8 images, got {dtype}{hint}")


def open_images(path: str, batch_size: int) -> tuple[tuple[int, int, int], Iterator[np.ndarray]]:
    """Validate a sample source (npz or PNG folder); return ``(N, H, W)`` and an iterator over uint8 NHWC batches."""
    source = Path(path)
    if source.is_dir():
        # Hidden files are partial writes (rar-hf sample writes .<name>.<pid>.tmp.png, then renames).
        files = sorted(f for f in source.glob("*.png") if not f.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{source}: no .png files")
        try:
            with Image.open(files[0]) as first:
                width, height = first.size
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{files[0]}: not a readable PNG ({error})") from error
        return (len(files), height, width), _png_batches(files, batch_size, (height, width))
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.suffix != ".npz":
        raise ValueError(f"{source}: expected an .npz file or a folder of PNGs")
    shape, dtype = read_npz_header(source)
    check_images(shape, dtype, str(source))
    return shape[:3], iter_npz_batches(source, batch_size)


def _png_batches(files: list[Path], batch_size: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as image:
                    if image.mode != "RGB":
                        raise ValueError(f"{file}: expected an RGB image, got mode {image.mode}")
                    array = np.asarray(image)
            except (UnidentifiedImageError, OSError) as error:  # truncated or not an image at all
                raise ValueError(f"{file}: not a readable PNG ({error})") from error
            if array.shape[:2] != size:
                raise ValueError(f"{file}: size {array.shape[:2]} differs from the first image's {size}")
            batch.append(array)
        yield np.stack(batch)


# ---- the reference ----


@dataclass
class ReferenceImages:
    """A reference image source: `batches()` iterates over it (again) as uint8 NHWC batches."""

    batches: Callable[[], Iterator[np.ndarray]]
    preprocessing: str
    npz: Path | None = None  # the ADM reference batch, when it is one (it may store its own statistics)


def open_reference(path: str, batch_size: int, image_size: tuple[int, int], split: str | None = None) -> ReferenceImages:
    """Validate a reference (ADM npz, image folder or `datasets` folder) without decoding its images.

    Images of a folder or dataset are centre-cropped to `image_size` (the samples' `(H, W)`, which must be square).
    """
    source = Path(path)
    if source.is_file():
        if source.suffix != ".npz":
            raise ValueError(
                f"--reference {source}: expected an ADM reference batch (.npz), an image folder or a `datasets` folder"
            )
        shape, dtype = read_npz_header(source)
        check_images(shape, dtype, str(source))
        return ReferenceImages(lambda: iter_npz_batches(source, batch_size), "none (an ADM npz is used as stored)", source)
    if not source.is_dir():
        raise FileNotFoundError(f"--reference {source}: no such file or folder")
    height, width = image_size
    if height != width:
        raise ValueError(
            f"samples are {height}x{width}: the images of a reference folder are centre-cropped to the samples' "
            "square size, so the samples must be square (or pass an ADM .npz reference)"
        )
    dataset, column = _image_dataset(source, split)
    preprocessing = f"RGB, ADM centre crop to {height}x{width} (rar_hf.data.center_crop_arr)"
    return ReferenceImages(lambda: _dataset_batches(dataset, column, height, batch_size, source), preprocessing)


def _image_dataset(folder: Path, split: str | None):
    """The split of a `save_to_disk` folder, or of `datasets.load_dataset(folder)` (streamed: nothing is copied into
    the datasets cache), and the name of its image column."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except FileNotFoundError:  # not a save_to_disk folder: image folder, parquet shards, ...
        dataset = datasets.load_dataset(str(folder), streaming=True)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            wanted = "has several splits" if split is None else f"has no split {split!r}"
            raise ValueError(f"--reference {folder} {wanted} ({', '.join(dataset)}): choose one with --reference_split")
        dataset = dataset[split]
    features = dataset.features or {}
    columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise ValueError(f"--reference {folder}: no image column among {list(features)}")
    return dataset.select_columns(columns[:1]).cast_column(columns[0], datasets.Image(decode=False)), columns[0]


def _dataset_batches(dataset, column: str, size: int, batch_size: int, source: Path) -> Iterator[np.ndarray]:
    from ..data import center_crop_arr
    from ..data.datasets import open_image_or_raise

    batch = []
    for index, row in enumerate(dataset):
        image = open_image_or_raise(row[column], where=f"{source} (row {index})")
        batch.append(np.asarray(center_crop_arr(image, size)))
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def pixel_digest(batches: Iterator[np.ndarray]) -> tuple[str, int, tuple[int, ...]]:
    """sha256 of the images (each one's shape and bytes, in order), their count and the shape of the first."""
    digest, count, shape = hashlib.sha256(), 0, None
    for batch in batches:
        for image in batch:
            digest.update(f"{image.shape}|".encode())
            digest.update(np.ascontiguousarray(image).tobytes())
            shape = shape or image.shape
            count += 1
    if count == 0:
        raise ValueError("the reference holds no images")
    return digest.hexdigest(), count, shape


# ---- the cache ----


def cache_key(pixels_sha256: str, settings: dict) -> str:
    """The key of a reference's statistics: its pixels and every setting that changes them."""
    text = json.dumps({"format": CACHE_FORMAT, "pixels_sha256": pixels_sha256, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(folder, key: str) -> Path:
    return Path(folder) / f"{CACHE_PREFIX}{key[:16]}.npz"


def read_cache(path: Path, key: str) -> tuple[dict | None, str | None]:
    """``(entries, None)`` when `path` holds the statistics of exactly this key, else ``(None, why not)``."""
    if not path.is_file():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            entries = {name: npz[name] for name in npz.files}
    except Exception as error:  # zipfile, zlib, ValueError: a corrupted or foreign file
        return None, f"{path} is not a readable cache ({type(error).__name__}: {error})"
    stored = str(entries.get("key", ""))
    if stored != key:
        return None, f"{path} holds the statistics of other images or settings (key {stored[:16] or 'missing'})"
    missing = [name for name in ("pool", *STATISTICS) if name not in entries]
    if missing:
        return None, f"{path} lacks {missing}"
    return entries, None


def write_cache(path: Path, key: str, settings: dict, pool: np.ndarray, statistics: dict) -> None:
    """Write the cache atomically (a temporary file renamed), so that a killed run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, key=np.array(key), settings=np.array(json.dumps(settings, sort_keys=True)), pool=pool, **statistics)
    os.replace(tmp, path)
