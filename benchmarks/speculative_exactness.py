"""Large-sample exactness check of speculative Jacobi decoding at batch sizes where rows share a pass.

Samples many images from the tiny random models of `tests/test_speculative.py` (whose joint distribution can be
enumerated) with plain sampling and with Jacobi decoding, and prints each chi-square p-value against the exact guided
distribution. The test suite runs 1,200 samples; this runs tens of thousands, at batch 100, the regime of the quality
runs in benchmarks/README.md, where a pass keeps as many tokens as the worst row of the batch.

    python benchmarks/speculative_exactness.py --samples 40000 --batch_size 100   # ~2 min on 2 cores
"""

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_speculative import SAMPLING, chi_square_p_value, exact_distribution, random_rar, sample_counts  # noqa: E402


CASES = [  # (model seed, codebook size, tokens per image, Jacobi window)
    (0, 4, 3, 3),
    (4, 3, 5, 4),
    (4, 3, 5, 16),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40000, help="Images per method and case.")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for seed, codes, length, window in CASES:
        model = random_rar(seed, num_layers=2, codebook_size=codes, image_seq_len=length)
        probs = exact_distribution(model, **SAMPLING)
        jacobi = sample_counts(model, args.samples, batch_size=args.batch_size, seed=7, jacobi_window=window)
        plain = sample_counts(model, args.samples, batch_size=args.batch_size, seed=8)
        print(
            f"{codes} codes x {length} tokens, window {window}, batch {args.batch_size}, {args.samples} samples: "
            f"Jacobi p = {chi_square_p_value(jacobi, probs):.4f}, plain p = {chi_square_p_value(plain, probs):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
