"""Dataset loading through Hugging Face ``datasets``: images (with robust decoding) and pre-tokenised data.

Typical image pipeline (e.g. for pre-tokenisation or on-the-fly tokenisation)::

    raw = load_image_dataset("timm/imagenet-1k-wds", streaming=True, image_column="jpg", label_column="cls")
    raw = split_and_shuffle(raw, rank, world_size, seed=seed)
    skipped = SkipCounter()
    rows = decode_images(raw, ImageTransform(256), skip_counter=skipped)  # {"pixel_values", "label"}

Pre-tokenised data (rows ``{"tokens": [L ints], "label": int}``) feeds :class:`RARDataCollator`::

    tokens = load_pretokenized_dataset("maskgitvq.jsonl")
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from datasets.distributed import split_dataset_by_node
from PIL import Image

logger = logging.getLogger(__name__)

# Shards made when a map-style dataset is turned into an iterable one. 960 is divisible by every world
# size up to 6 and by 8, 10, 12, 15, 16, 20, 24, 30, 32, 40, 48, 60, 64, so split_dataset_by_node can give
# each rank whole shards, and leaves several shards per DataLoader worker.
_ITERABLE_SHARDS = 960

# What PIL raises on corrupt, truncated or hostile files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_UNDECODED_IMAGE = datasets.Image(decode=False)
_IMAGE_DECODER = datasets.Image()


@dataclass
class SkipCounter:
    """Counts images skipped because they could not be decoded.

    It is updated in the process that decodes: read ``count`` directly when iterating in-process. With
    DataLoader workers each worker updates its own copy, so the training process sees 0; the skips are
    still logged as warnings by the workers.
    """

    count: int = 0
    last_error: str | None = None

    def record(self, error: BaseException, source: str | None = None) -> None:
        """Count one skipped image (from file `source`, when it has one) and remember why."""
        self.count += 1
        self.last_error = f"{source + ': ' if source else ''}{type(error).__name__}: {error}"
        logger.warning("skipping an undecodable image (%d so far): %s", self.count, self.last_error)


def _is_parquet(paths: str | Sequence[str]) -> bool:
    paths = [paths] if isinstance(paths, str) else list(paths)
    return bool(paths) and all(str(p).endswith(".parquet") for p in paths)


def _is_saved_dataset(path: str) -> bool:
    # Folders written by Dataset.save_to_disk / DatasetDict.save_to_disk.
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )


def _as_iterable(ds: Dataset) -> IterableDataset:
    return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), _ITERABLE_SHARDS)))


def _load(
    name_or_path: str | Sequence[str],
    split: str,
    streaming: bool,
    data_files: Any,
    load_kwargs: dict[str, Any],
) -> Dataset | IterableDataset:
    """Load a split from parquet file(s)/globs, a save_to_disk folder, a local folder or a Hub id."""
    if data_files is None and _is_parquet(name_or_path):
        paths = [name_or_path] if isinstance(name_or_path, str) else list(name_or_path)
        if not any(glob.has_magic(p) or "://" in p for p in paths):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"parquet file(s) not found: {missing}")
        # Explicit files are named after the requested split so that `split` keeps working.
        return load_dataset("parquet", data_files={split: paths}, split=split, streaming=streaming, **load_kwargs)
    if not isinstance(name_or_path, str):
        raise ValueError(f"a list of paths must hold .parquet files only, got {list(name_or_path)}")
    if data_files is None and _is_saved_dataset(name_or_path):
        ds = load_from_disk(name_or_path)
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in {name_or_path}; available splits: {list(ds)}")
            ds = ds[split]
        return _as_iterable(ds) if streaming else ds
    return load_dataset(name_or_path, split=split, streaming=streaming, data_files=data_files, **load_kwargs)


def _standard_columns(
    ds: Dataset | IterableDataset, columns: dict[str, str], source: Any
) -> Dataset | IterableDataset:
    """Keep only ``columns`` (source name -> standard name), renamed, with a clear error when one is missing."""
    available = ds.column_names
    if available is None:
        raise ValueError(
            f"the columns of {source!r} are unknown before iteration; pass features=datasets.Features(...) "
            "so they can be checked and selected"
        )
    missing = [name for name in columns if name not in available]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found in {source!r}; available columns: {available}. "
            f"Choose others with the *_column arguments."
        )
    ds = ds.select_columns(list(columns))
    renames = {old: new for old, new in columns.items() if old != new}
    return ds.rename_columns(renames) if renames else ds


def load_image_dataset(
    name_or_path: str | Sequence[str],
    split: str = "train",
    *,
    streaming: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    data_files: Any = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """Load an image classification split with columns ``image`` (undecoded) and ``label``.

    Args:
        name_or_path: a Hub dataset id (e.g. ``"ILSVRC/imagenet-1k"``), a local folder (parquet shards,
            an image folder, or a ``save_to_disk`` folder), or ``.parquet`` file path(s)/glob(s).
        split: split to load; explicit parquet files are read as this split.
        streaming: return an ``IterableDataset`` that reads lazily.
        image_column, label_column: source column names (``"jpg"``, ``"cls"`` for timm/imagenet-1k-wds);
            they are renamed to ``image`` and ``label`` and all other columns are dropped.
        data_files: forwarded to :func:`datasets.load_dataset`.
        **load_kwargs: forwarded to :func:`datasets.load_dataset` (``token``, ``cache_dir``, ``features``...).

    The image column is cast to ``datasets.Image(decode=False)``: decode with :func:`decode_images`, which
    skips corrupt files instead of failing mid-epoch.

    Raises:
        ValueError: naming the available columns when a column is missing.
    """
    ds = _load(name_or_path, split, streaming, data_files, load_kwargs)
    ds = _standard_columns(ds, {image_column: "image", label_column: "label"}, name_or_path)
    return ds.cast_column("image", _UNDECODED_IMAGE)


def split_and_shuffle(
    ds: Dataset | IterableDataset,
    rank: int = 0,
    world_size: int = 1,
    *,
    shuffle: bool = True,
    seed: int = 0,
    buffer_size: int = 1000,
) -> Dataset | IterableDataset:
    """This process's part of ``ds`` (``datasets.distributed.split_dataset_by_node``), shuffled.

    Use it when iterating a dataset yourself (streaming); a map-style dataset given to
    ``accelerator.prepare`` is already split by its distributed sampler. An iterable dataset whose shard
    count is divisible by ``world_size`` gives each rank whole shards; otherwise every rank reads all the
    data and keeps 1/world_size of the rows (correct, but world_size times the I/O).

    Iterable datasets are shuffled by shard order plus a ``buffer_size`` buffer (same seed on all ranks);
    call ``ds.set_epoch(epoch)`` each epoch for a new order. Map-style datasets are fully shuffled.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1:
        if isinstance(ds, IterableDataset) and ds.n_shards % world_size:
            logger.warning(
                "%d shards are not divisible by world_size=%d: every rank reads all the data",
                ds.n_shards,
                world_size,
            )
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if not shuffle:
        return ds
    if isinstance(ds, IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=buffer_size)
    return ds.shuffle(seed=seed)


def _open_image(value: Any) -> Image.Image:
    """Fully decode an image given as an undecoded ``datasets`` dict, raw bytes, or a PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict):
        image = _IMAGE_DECODER.decode_example(value)  # handles embedded bytes and (remote) paths
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    image.load()  # PIL decodes lazily: force it here so truncated files fail inside the try
    return image


def image_source(value: Any) -> str | None:
    """The file an undecoded ``datasets`` image came from, if it has one (image folders do, embedded bytes not)."""
    return value.get("path") if isinstance(value, dict) else getattr(value, "filename", None) or None


def open_image_or_raise(value: Any, where: str = "an image") -> Image.Image:
    """Decode an image like :func:`decode_images` does, but raise a ``ValueError`` naming its file when it is
    corrupted (for training loops that cannot skip a row of a map-style dataset)."""
    try:
        return _open_image(value)
    except _DECODE_ERRORS as error:
        raise ValueError(f"{image_source(value) or where}: not a decodable image ({type(error).__name__}: {error})") from None


class _Decoder:
    """Batched ``datasets`` map function: decodes and transforms images, dropping undecodable rows.

    A class rather than a closure so that it pickles into spawned DataLoader workers.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], skip_counter: SkipCounter):
        self.transform = transform
        self.skip_counter = skip_counter

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values, labels = [], []
        for value, label in zip(batch["image"], batch["label"]):
            try:
                image = _open_image(value)
            except _DECODE_ERRORS as error:
                self.skip_counter.record(error, image_source(value))
                continue
            pixel_values.append(self.transform(image))
            labels.append(int(label))
        return {"pixel_values": pixel_values, "label": labels}


def decode_images(
    ds: Dataset | IterableDataset,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    skip_counter: SkipCounter | None = None,
) -> IterableDataset:
    """Lazily decode the ``image`` column into rows ``{"pixel_values": transform(image), "label": int}``.

    Images that PIL cannot decode are skipped and counted in ``skip_counter`` (see :class:`SkipCounter`
    for its per-process semantics). A map-style ``ds`` is first turned into an iterable one (decoding
    every image up front would store the whole decoded dataset). The result is a torch
    ``IterableDataset``: DataLoader workers split it by shards, so use ``num_workers <= n_shards``.

    Args:
        ds: rows with ``image`` (undecoded ``datasets`` dict, bytes or PIL image) and ``label``, e.g.
            from :func:`load_image_dataset`.
        transform: PIL image -> tensor, e.g. :class:`~rar_hf.data.transforms.ImageTransform`.
        skip_counter: counter to update; a fresh one is used when omitted.
    """
    if isinstance(ds, Dataset):
        ds = _as_iterable(ds)
    if ds.column_names is None or not {"image", "label"} <= set(ds.column_names):
        raise ValueError(f"decode_images needs known columns 'image' and 'label', got {ds.column_names}")
    decoder = _Decoder(transform, skip_counter if skip_counter is not None else SkipCounter())
    # Small batches: a batch is decoded before its first row is yielded.
    return ds.map(decoder, batched=True, batch_size=16, remove_columns=ds.column_names)


def read_official_jsonl(path: str | os.PathLike, num_tokens: int | None = None) -> Iterator[dict[str, Any]]:
    """Rows ``{"tokens": [...], "label": int}`` of the official RAR ``maskgitvq.jsonl``.

    Each line is ``{"class_id": int, "tokens": [ints]}`` (256 tokens for MaskGIT-VQGAN at 256px; pass
    ``num_tokens`` to check the count). Blank lines are ignored.

    Raises:
        ValueError: naming the file and line number of a malformed line.
    """
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or "class_id" not in record or "tokens" not in record:
                raise ValueError(f"{where}: expected an object with 'class_id' and 'tokens', got {line[:80]!r}")
            class_id, tokens = record["class_id"], record["tokens"]
            if type(class_id) is not int:
                raise ValueError(f"{where}: class_id must be an int, got {class_id!r}")
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                raise ValueError(f"{where}: tokens must be a list of ints")
            if num_tokens is not None and len(tokens) != num_tokens:
                raise ValueError(f"{where}: expected {num_tokens} tokens, got {len(tokens)}")
            yield {"tokens": tokens, "label": class_id}


_PRETOKENIZED_FEATURES = datasets.Features(
    {"tokens": datasets.List(datasets.Value("int32")), "label": datasets.Value("int32")}
)


def load_pretokenized_dataset(
    path_or_id: str | Sequence[str],
    split: str = "train",
    *,
    streaming: bool = False,
    tokens_column: str = "tokens",
    label_column: str = "label",
    data_files: Any = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """Load pre-tokenised rows ``{"tokens": [L ints, raster order], "label": int}``.

    Args:
        path_or_id: an official-format ``.jsonl`` file (see :func:`read_official_jsonl`; converted once
            into the ``datasets`` cache and again only when the file changes, or read lazily as a single
            shard with ``streaming=True``), ``.parquet`` file(s)/glob(s), a ``save_to_disk`` folder, a
            local folder of data files or a Hub id.
        split: split to load; explicit files are read as this split.
        streaming: return an ``IterableDataset``.
        tokens_column, label_column: source column names, renamed to ``tokens`` and ``label``.
        data_files, **load_kwargs: forwarded to :func:`datasets.load_dataset` (for ``.jsonl``,
            ``load_kwargs`` go to ``Dataset.from_generator``: ``cache_dir``, ``num_proc``...).
    """
    if isinstance(path_or_id, (str, os.PathLike)) and os.fspath(path_or_id).endswith(".jsonl"):
        path = os.fspath(path_or_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pre-tokenised jsonl not found: {path}")
        if streaming:
            return IterableDataset.from_generator(
                read_official_jsonl, features=_PRETOKENIZED_FEATURES, gen_kwargs={"path": path}, split=split
            )
        # The cache key must change when the file does: by default it only hashes the path.
        stat = os.stat(path)
        fingerprint = f"rar-jsonl-{os.path.abspath(path)}-{stat.st_size}-{stat.st_mtime_ns}"
        return Dataset.from_generator(
            read_official_jsonl,
            features=_PRETOKENIZED_FEATURES,
            gen_kwargs={"path": path},
            split=split,
            fingerprint=hashlib.sha256(fingerprint.encode()).hexdigest()[:16],
            **load_kwargs,
        )
    ds = _load(path_or_id, split, streaming, data_files, load_kwargs)
    return _standard_columns(ds, {tokens_column: "tokens", label_column: "label"}, path_or_id)


# ---- what pre-tokenised shards were made from ----

PRETOKENIZED_METADATA = "rar_pretokenized-{split}.json"


def pretokenized_metadata_path(folder: str | os.PathLike, split: str) -> str:
    """Where examples/pretokenize.py records how the `split` shards of `folder` were made."""
    return os.path.join(os.fspath(folder), PRETOKENIZED_METADATA.format(split=split))


def read_pretokenized_metadata(folder: str | os.PathLike, split: str) -> dict | None:
    """The metadata examples/pretokenize.py wrote beside the `split` shards of a local `folder`, or None (a Hub id,
    files, or a folder made otherwise)."""
    path = pretokenized_metadata_path(folder, split) if os.path.isdir(os.fspath(folder)) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
        metadata["fingerprint"]["image_seq_len"], metadata["fingerprint"]["codebook_size"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a valid pre-tokenisation metadata file ({type(error).__name__}: {error})") from None
    return metadata


def tokenizer_fingerprint(vqvae) -> dict:
    """Hashes of a tokenizer's config and weights: tokens are only comparable when both are equal."""
    config = json.dumps({k: v for k, v in dict(vqvae.config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    weights = hashlib.sha256()
    for name, tensor in sorted(vqvae.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"config_sha256": hashlib.sha256(config.encode()).hexdigest(), "weights_sha256": weights.hexdigest()}


def class_names(ds: Dataset | IterableDataset, column: str = "label") -> list[str] | None:
    """The names of a ``datasets.ClassLabel`` column, or None when the column holds plain integers."""
    feature = (ds.features or {}).get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
