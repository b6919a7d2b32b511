"""Final scan orders of an (height, width) token grid (RAR ablation, Table 3 of arXiv 2411.00776).

Every order is an int64 permutation of raster indices: ``order[j]`` is the raster position
(``row * width + col``) visited ``j``-th, the same convention as the model's ``orders`` input.
"""

from __future__ import annotations

import numpy as np
import torch

SCAN_ORDERS = ("raster", "spiral_in", "spiral_out", "z_curve", "subsample", "alternate")


def _raster(height: int, width: int) -> np.ndarray:
    return np.arange(height * width)


def _spiral_in(height: int, width: int) -> np.ndarray:
    # Clockwise from the top-left corner, ring by ring, ending at the centre.
    order = []
    top, bottom, left, right = 0, height - 1, 0, width - 1
    while top <= bottom and left <= right:
        order += [top * width + c for c in range(left, right + 1)]
        order += [r * width + right for r in range(top + 1, bottom + 1)]
        if top < bottom:  # a one-row ring has no separate bottom edge
            order += [bottom * width + c for c in range(right - 1, left - 1, -1)]
        if left < right:  # a one-column ring has no separate left edge
            order += [r * width + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return np.array(order)


def _spiral_out(height: int, width: int) -> np.ndarray:
    return _spiral_in(height, width)[::-1]


def _z_curve(height: int, width: int) -> np.ndarray:
    # Morton key: interleave the bits of (row, col), col in the lowest bit, so each 2x2 block is
    # visited top-left, top-right, bottom-left, bottom-right. Sorting by the key also handles grids
    # whose sides are not powers of two (positions outside the grid are simply absent).
    rows, cols = np.divmod(np.arange(height * width), width)
    key = np.zeros_like(rows)
    for bit in range(max(height, width).bit_length()):
        key |= ((cols >> bit) & 1) << (2 * bit)
        key |= ((rows >> bit) & 1) << (2 * bit + 1)
    return np.argsort(key, kind="stable")


def _subsample(height: int, width: int) -> np.ndarray:
    # Four interleaved 2x sub-sampled grids, each in raster order: first (even row, even col), which
    # alone is a half-resolution image, then (even, odd), (odd, even), (odd, odd).
    rows, cols = np.divmod(np.arange(height * width), width)
    phase = 2 * (rows % 2) + cols % 2
    return np.argsort(phase, kind="stable")


def _alternate(height: int, width: int) -> np.ndarray:
    # Boustrophedon: even rows left to right, odd rows right to left.
    grid = np.arange(height * width).reshape(height, width)
    grid[1::2] = grid[1::2, ::-1]
    return grid.reshape(-1)


_BUILDERS = {
    "raster": _raster,
    "spiral_in": _spiral_in,
    "spiral_out": _spiral_out,
    "z_curve": _z_curve,
    "subsample": _subsample,
    "alternate": _alternate,
}


def get_scan_order(name: str, height: int, width: int) -> torch.Tensor:
    """Scan order ``name`` of a ``height`` x ``width`` grid as an int64 permutation of raster indices.

    Orders (see :data:`SCAN_ORDERS`):
        ``raster``: row by row, left to right.
        ``spiral_in``: clockwise from the top-left corner inwards to the centre.
        ``spiral_out``: ``spiral_in`` reversed, from the centre outwards to the top-left corner.
        ``z_curve``: Morton order (2x2 blocks top-left, top-right, bottom-left, bottom-right, recursively).
        ``subsample``: the four 2x sub-sampled grids one after another, each in raster order:
            (even row, even col), (even, odd), (odd, even), (odd, odd).
        ``alternate``: boustrophedon, even rows left to right, odd rows right to left.

    Raises:
        ValueError: for an unknown name or a non-positive size.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown scan order {name!r}; valid names: {', '.join(SCAN_ORDERS)}")
    if height < 1 or width < 1:
        raise ValueError(f"scan order needs a positive grid size, got {height}x{width}")
    # np.array copies, so reversed (negative-stride) views become valid torch storage.
    return torch.from_numpy(np.array(_BUILDERS[name](height, width), dtype=np.int64, order="C"))
