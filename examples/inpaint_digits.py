#!/usr/bin/env python
r"""The README's inpainting picture: held-out digits, a mask each, and three completions by the shipped tiny-digits
pipeline (offline, CPU, a few seconds).

    python examples/inpaint_digits.py                       # -> docs/inpainting-digits.png
    python examples/inpaint_digits.py --seed 1 --output_path outputs/inpainting.png

Each row is `pipe(label, image=digit, mask_image=mask, num_images_per_prompt=3, generator=...)`: the black part of
the mask keeps the digit's tokens, the white part is generated anew for the label of the row (the digit's own, or
another one). The digits come from the held-out split of `rar_hf.data.digits`, which the model never saw.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from rar_hf import RARPipeline
from rar_hf.arguments import ArgumentParser, check_writable, run_script
from rar_hf.commands.generate import DEFAULT_MODEL, labelled_grid
from rar_hf.data.digits import digits_to_images, split_digits

REPO = Path(__file__).resolve().parents[1]
# (index of a held-out digit, region to regenerate, label to ask for: None = the digit's own)
ROWS = [(3, "bottom half", None), (14, "right half", None), (24, "centre box", None), (9, "bottom half", None),
        (9, "bottom half", 2), (9, "bottom half", 8)]


def region_mask(region: str, size: int) -> Image.Image:
    """A `size` x `size` mask, white (regenerate) on `region`."""
    mask = np.zeros((size, size), dtype=np.uint8)
    half, quarter = size // 2, size // 4
    if region == "bottom half":
        mask[half:] = 255
    elif region == "right half":
        mask[:, half:] = 255
    elif region == "centre box":
        mask[quarter : size - quarter, quarter : size - quarter] = 255
    else:
        raise ValueError(f"unknown region {region!r}")
    return Image.fromarray(mask)


def framed(mask: Image.Image) -> Image.Image:
    """The mask with a one-pixel grey frame, so that its white part shows on the grid's white background."""
    return ImageOps.expand(ImageOps.crop(mask, 1), border=1, fill=128).convert("RGB")


def make_picture(pipe: RARPipeline, seed: int = 0, num_completions: int = 3) -> Image.Image:
    digits, labels = split_digits()["test"]
    size = pipe.image_size[0]
    rows, names = [], []
    for index, region, asked in ROWS:
        image, mask = digits_to_images(digits[index : index + 1], size)[0], region_mask(region, size)
        label = int(labels[index]) if asked is None else asked
        generator = torch.Generator().manual_seed(seed)
        completions = pipe(label, image=image, mask_image=mask, num_images_per_prompt=num_completions,
                           generator=generator).images  # fmt: skip
        rows.append([image, framed(mask), *completions])
        names.append(f"a {labels[index]}, {region} -> {label}")
    return labelled_grid(rows, names)


def main(args):
    check_writable(args.output_path, "--output_path")
    pipe = RARPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    picture = make_picture(pipe, args.seed)
    Path(args.output_path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.output_path)
    print(args.output_path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="RARPipeline folder or Hub id (default: tiny digits).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every row's generator.")
    parser.add_argument("--output_path", default=str(REPO / "docs" / "inpainting-digits.png"), help="Where to write the PNG.")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main, parse_args())
