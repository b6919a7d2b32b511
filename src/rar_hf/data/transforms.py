"""Image preprocessing for tokenisation, with PIL, numpy and torch only (no torchvision).

The crops follow the official RAR pre-tokenisation script: ADM centre crop for ablations, and for the
final models a centre crop to ``int(1.1 * size)`` followed by TorchVision's TenCrop.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info


def to_rgb(pil_image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB.

    Transparent pixels are composited on white: a plain ``convert("RGB")`` keeps whatever colour the
    transparent pixels happen to store, often black.
    """
    if pil_image.mode == "RGB":
        return pil_image
    if pil_image.mode in ("RGBA", "LA", "PA") or (pil_image.mode == "P" and "transparency" in pil_image.info):
        rgba = pil_image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil_image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop to ``image_size`` x ``image_size`` (RGB).

    Halves the image with BOX filtering while its short side is at least ``2 * image_size`` (cheap
    anti-aliasing), resizes with BICUBIC so the short side equals ``image_size``, then crops the centre.
    """
    pil_image = to_rgb(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _five_crop(pil_image: Image.Image, size: int) -> list[Image.Image]:
    # TorchVision's five_crop: corners tl, tr, bl, br, then the centre (offset rounded half to even).
    width, height = pil_image.size
    left, top = round((width - size) / 2), round((height - size) / 2)
    boxes = [
        (0, 0),
        (width - size, 0),
        (0, height - size),
        (width - size, height - size),
        (left, top),
    ]
    return [pil_image.crop((x, y, x + size, y + size)) for x, y in boxes]


def ten_crop_arr(pil_image: Image.Image, image_size: int, scale: float = 1.1) -> list[Image.Image]:
    """The ten crops of RAR's final-model pre-tokenisation, as RGB images of ``image_size``.

    ADM centre crop to ``int(scale * image_size)`` (281 for 256, truncated as in the official script),
    then TorchVision's TenCrop: the four corners and the centre of the image, followed by the same five
    crops of its horizontal mirror (so crop 5 is the mirror of crop 1, crop 6 of crop 0, ...).
    """
    if scale < 1.0:
        raise ValueError(f"ten-crop scale must be >= 1, got {scale}")
    square = center_crop_arr(pil_image, int(scale * image_size))
    mirrored = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _five_crop(square, image_size) + _five_crop(mirrored, image_size)


def random_flip(pil_image: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """Mirror ``pil_image`` horizontally with probability ``p``, drawing from ``rng``."""
    if rng.random() < p:
        return pil_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_image


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1], the MaskGIT-VQGAN input range."""
    arr = np.array(to_rgb(pil_image), dtype=np.uint8)  # a copy: torch warns on read-only arrays
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(255.0)


class ImageTransform:
    """PIL image (any mode) -> float (3, resolution, resolution) tensor in [0, 1].

    ADM centre crop, then (if ``random_flip``) a horizontal flip with probability 0.5. Flips draw from a
    numpy generator seeded with ``(seed, worker_id)``, created in the process that first uses it, so
    DataLoader workers do not repeat each other's flips. Pass e.g. ``seed + rank`` per process; with
    ``seed=None`` flips come from fresh OS entropy.
    """

    def __init__(self, resolution: int = 256, random_flip: bool = True, seed: int | None = None):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.random_flip = random_flip
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_worker: int | None = None

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        worker_id = -1 if info is None else info.id
        # A worker inherits the parent's generator when it forks; re-seed so workers differ.
        if self._rng is None or self._rng_worker != worker_id:
            entropy = None if self.seed is None else [self.seed, worker_id + 1]
            self._rng = np.random.default_rng(entropy)
            self._rng_worker = worker_id
        return self._rng

    def __call__(self, pil_image: Image.Image) -> torch.Tensor:
        image = center_crop_arr(pil_image, self.resolution)
        if self.random_flip:
            image = random_flip(image, self._generator())
        return to_tensor(image)

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, random_flip={self.random_flip}, seed={self.seed})"
