"""scikit-learn's bundled digits as a ``datasets`` image dataset: the offline data of the tiny default model.

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 digits (values 0..16, 10 classes) with the library,
so a model trained on them can be rebuilt anywhere without a download. The digits are scaled to 0..255,
smoothly upscaled (BICUBIC) to ``image_size`` and stored as RGB images, so the tokenizer sees ordinary
image data. With ``output_dir`` they are written as parquet shards that ``datasets.load_dataset(folder)``
and :func:`rar_hf.data.load_image_dataset` read like any other dataset::

    python -m rar_hf.data.digits --output_dir data/digits --image_size 32
"""

from __future__ import annotations

import argparse
import os
import sys

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..arguments import check_writable, command_parser, positive_int, run_script

DIGITS_MAX_VALUE = 16  # load_digits pixels are counts of set pixels in 4x4 blocks: 0..16
LABEL_NAMES = [str(digit) for digit in range(10)]


def digits_to_images(digits: np.ndarray, image_size: int) -> list[Image.Image]:
    """Grey 8x8 digits (values 0..16, shape (N, 8, 8)) -> RGB PIL images of ``image_size`` x ``image_size``."""
    grey = np.clip(np.rint(digits * (255.0 / DIGITS_MAX_VALUE)), 0, 255).astype(np.uint8)
    # BICUBIC rather than NEAREST: blocky 4x4 squares are not what a tokenizer should learn to draw.
    return [
        Image.fromarray(image).resize((image_size, image_size), resample=Image.BICUBIC).convert("RGB")
        for image in grey
    ]


def images_to_digits(images: torch.Tensor) -> np.ndarray:
    """Images (N, C, S, S) in [0, 1] -> (N, 64) features on the 0..16 scale of the real 8x8 digits.

    The inverse of :func:`digits_to_images` up to its smoothing: channels are averaged (a model's RGB output
    need not stay exactly grey), then area-averaged down to 8x8 (S/8 x S/8 pixels per cell). A classifier
    trained on the real 8x8 digits can then judge generated or reconstructed ones.
    """
    grey = images.float().mean(dim=1, keepdim=True)
    return (F.adaptive_avg_pool2d(grey, 8) * DIGITS_MAX_VALUE).flatten(1).cpu().numpy()


def digits_features() -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABEL_NAMES)})


def split_digits(test_size: float = 0.2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The raw stratified split: ``{"train": (images (N, 8, 8) in 0..16, labels), "test": (...)}``.

    Shared by :func:`build_digits_dataset` and evaluation code that needs the original 8x8 digits of the
    same split (e.g. to train a classifier on the real training digits).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def build_digits_dataset(
    output_dir: str | os.PathLike | None = None,
    image_size: int = 32,
    test_size: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Build the digits ``DatasetDict`` with splits ``train`` and ``test``.

    Args:
        output_dir: if given, write ``data/{split}-00000-of-00001.parquet`` there and return the dataset
            loaded back with ``datasets.load_dataset(output_dir)``; otherwise return it in memory.
        image_size: side of the square RGB images (at least 8).
        test_size: held-out fraction (or count, as in scikit-learn), stratified by class.
        seed: seed of the split, so the same images are held out on every machine.
        cache_dir: ``datasets`` cache used when loading ``output_dir`` back.

    Returns:
        ``DatasetDict`` with columns ``image`` (``datasets.Image``) and ``label`` (``ClassLabel`` "0".."9").
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (the digits are 8x8), got {image_size}")
    features = digits_features()
    dataset = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": digits_to_images(images, image_size), "label": labels.tolist()}, features=features
            )
            for split, (images, labels) in split_digits(test_size, seed).items()
        }
    )
    if output_dir is None:
        return dataset
    data_dir = os.path.join(os.fspath(output_dir), "data")
    os.makedirs(data_dir, exist_ok=True)
    for split, ds in dataset.items():
        # The Hub's shard naming, so load_dataset(folder) infers the splits from the file names.
        ds.to_parquet(os.path.join(data_dir, f"{split}-00000-of-00001.parquet"))
    return datasets.load_dataset(os.fspath(output_dir), cache_dir=cache_dir)


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", required=True, help="Folder to write data/{train,test}-*.parquet into.")
    parser.add_argument("--image_size", type=positive_int, default=32, help="Side of the square RGB images (>= 8).")
    parser.add_argument("--test_size", type=float, default=0.2, help="Held-out fraction, stratified by class.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the train/test split.")


def main(args) -> None:
    """Write the digits (``args`` from :func:`add_arguments`, or a list of command-line arguments)."""
    if not isinstance(args, argparse.Namespace):
        args = command_parser(sys.modules[__name__], prog=PROG).parse_args(args)
    check_writable(args.output_dir, "--output_dir", folder=True)
    dataset = build_digits_dataset(args.output_dir, args.image_size, args.test_size, args.seed)
    sizes = ", ".join(f"{split}: {len(ds)}" for split, ds in dataset.items())
    print(f"wrote {args.image_size}x{args.image_size} digits to {args.output_dir} ({sizes})")


PROG = "python -m rar_hf.data.digits"

if __name__ == "__main__":
    run_script(main, command_parser(sys.modules[__name__], prog=PROG).parse_args(), PROG)
