import pytest
import torch

from rar_hf.data import SCAN_ORDERS, get_scan_order


@pytest.mark.parametrize("name", SCAN_ORDERS)
@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1), (4, 4), (3, 5), (16, 16), (6, 7)])
def test_every_order_is_an_int64_permutation(name, size):
    order = get_scan_order(name, *size)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(size[0] * size[1]))


def test_raster_is_arange():
    assert torch.equal(get_scan_order("raster", 16, 16), torch.arange(256))


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (16, 16)])
def test_spiral_out_is_spiral_in_reversed(size):
    assert torch.equal(get_scan_order("spiral_out", *size), get_scan_order("spiral_in", *size).flip(0))


def test_spiral_in_known_values():
    # 3x4 grid:  0  1  2  3 / 4  5  6  7 / 8  9 10 11
    assert get_scan_order("spiral_in", 3, 4).tolist() == [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]


def test_spiral_in_consecutive_positions_are_neighbours():
    order = get_scan_order("spiral_in", 7, 6)
    rows, cols = order // 6, order % 6
    steps = (rows.diff().abs() + cols.diff().abs()).tolist()
    assert steps == [1] * (len(order) - 1)


def test_z_curve_4x4():
    assert get_scan_order("z_curve", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_alternate_known_values():
    assert get_scan_order("alternate", 3, 4).tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]


def test_subsample_visits_the_even_grid_first():
    assert get_scan_order("subsample", 4, 4).tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    order = get_scan_order("subsample", 16, 16)
    first = order[:64]
    assert ((first // 16) % 2 == 0).all() and ((first % 16) % 2 == 0).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: raster, spiral_in"):
        get_scan_order("hilbert", 4, 4)


def test_non_positive_size_rejected():
    with pytest.raises(ValueError, match="positive"):
        get_scan_order("raster", 0, 4)
