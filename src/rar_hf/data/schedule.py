"""Annealing schedule of the randomness ratio r (RAR, arXiv 2411.00776, Sec. 3.2)."""

from __future__ import annotations


def randomness_ratio(step: int, anneal_start: int, anneal_end: int) -> float:
    """Probability ``r`` that a sample at optimizer step ``step`` is trained on a random permutation.

    ``r`` is 1.0 before ``anneal_start``, decays linearly to 0.0 between ``anneal_start`` and
    ``anneal_end``, and is 0.0 from ``anneal_end`` on. With ``anneal_start == anneal_end`` the switch is
    abrupt: 1.0 before, 0.0 from that step on (the paper's (0, 0) ablation is pure raster training).

    The official RAR configuration anneals between steps 125,000 and 187,500 of 250,000.

    Raises:
        ValueError: if not ``anneal_end >= anneal_start >= 0``.
    """
    if anneal_start < 0 or anneal_end < anneal_start:
        raise ValueError(
            f"randomness annealing needs anneal_end >= anneal_start >= 0, got "
            f"anneal_start={anneal_start}, anneal_end={anneal_end}"
        )
    if step < anneal_start:
        return 1.0
    if step >= anneal_end:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)
