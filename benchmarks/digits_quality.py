"""Did the tiny digits model learn? Class-conditional accuracy and a Frechet distance of generated digits.

An SVC trained on the real 8x8 training digits of the split the model was trained on (`rar_hf.data.digits`) classifies
generated digits brought back to 8x8; the Frechet distance compares generated and held-out real digits in a fixed
feature space (PCA-16 of the real training digits, fitted once). Both are reported per guidance scale, for the shipped
model and, with `--twin`, a twin trained on the same budget in raster order only (no permutations), which measures
the paper's claim at toy scale.

    python benchmarks/digits_quality.py                                   # the shipped model
    python benchmarks/digits_quality.py --twin outputs/tiny-digits-raster --train_twin   # + a raster-only twin
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from rar_hf import RARPipeline
from rar_hf.data.digits import DIGITS_MAX_VALUE, images_to_digits, split_digits
from rar_hf.metrics.fid import compute_statistics, frechet_distance

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "rar_hf" / "pretrained" / "tiny-digits"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHIPPED), help="Pipeline folder to evaluate (default: the shipped one).")
    p.add_argument("--twin", default=None, help="Raster-only twin pipeline folder to compare with.")
    p.add_argument("--train_twin", action="store_true", help="Train the twin into --twin first (make tiny-digits recipe, r = 0).")
    p.add_argument("--num_per_class", type=int, default=100, help="Generated digits per class and setting.")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=None, help="Default: the model's own, 1, 1.5, 2, 3.")
    p.add_argument("--work_dir", default="outputs/tiny-digits", help="Recipe work folder (data, tokenizer) that --train_twin reuses.")
    p.add_argument("--batch_size", type=int, default=250, help="Images per pipeline call.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--output_json", default=None, help="Also write the results here.")
    return p.parse_args(argv)


class DigitsJudge:
    """The fixed yardsticks: a classifier and a feature space fitted on the real training digits only."""

    def __init__(self):
        split = split_digits()
        train_x, train_y = split["train"]
        self.test_x, self.test_y = split["test"][0].reshape(-1, 64), split["test"][1]
        train_x = train_x.reshape(-1, 64)
        # gamma=0.001 is scikit-learn's classic setting for these digits (~99% on held-out real digits).
        self.classifier = SVC(gamma=0.001).fit(train_x, train_y)
        self.pca = PCA(n_components=16, random_state=0).fit(train_x / DIGITS_MAX_VALUE)
        self.reference = compute_statistics(self.pca.transform(self.test_x / DIGITS_MAX_VALUE))
        self.train_x = train_x

    def frechet(self, digits: np.ndarray) -> float:
        return float(frechet_distance(*compute_statistics(self.pca.transform(digits / DIGITS_MAX_VALUE)), *self.reference))

    def score(self, digits: np.ndarray, labels: np.ndarray) -> dict:
        predicted = self.classifier.predict(digits)
        per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
        return {"accuracy": float((predicted == labels).mean()), "per_class": per_class, "frechet": self.frechet(digits)}


def generate_digits(pipe, guidance_scale, num_per_class, batch_size, seed):
    labels = np.repeat(np.arange(pipe.transformer.config.num_classes), num_per_class)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size].tolist()
        out = pipe(class_labels=chunk, guidance_scale=guidance_scale, generator=generator, output_type="pt")
        images.append(out.images.float().cpu())
    return images_to_digits(torch.cat(images)), labels


def train_twin(path, work_dir):
    # Same data, tokenizer, model and steps as the shipped model; only the schedule differs (r = 0 throughout).
    env = {**os.environ, "OUT": str(work_dir), "ANNEAL": "raster", "PACKAGE_DIR": str(path), "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "examples" / "tiny_digits" / "train_tiny_digits.sh")], check=True, env=env)


def evaluate_model(path, judge, args):
    pipe = RARPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    default = pipe.transformer.generation_config.guidance_scale
    scales = args.guidance_scales or list(dict.fromkeys([default, 1.0, 1.5, 2.0, 3.0]))
    rows = []
    for scale in scales:
        start = time.perf_counter()
        digits, labels = generate_digits(pipe, scale, args.num_per_class, args.batch_size, args.seed)
        rows.append({"model": str(path), "guidance_scale": scale, **judge.score(digits, labels),
                     "seconds": time.perf_counter() - start})  # fmt: skip
    return rows


def main(args):
    judge = DigitsJudge()
    real = {"accuracy": judge.classifier.score(judge.test_x, judge.test_y), "frechet": judge.frechet(judge.train_x)}
    rows = evaluate_model(args.model, judge, args)
    if args.twin:
        if args.train_twin:
            train_twin(args.twin, args.work_dir)
        rows += evaluate_model(args.twin, judge, args)
    print(f"real held-out digits: classifier accuracy {real['accuracy']:.4f}; Frechet(train, held-out) {real['frechet']:.4f}")
    print("| model | guidance | accuracy | " + " | ".join(str(c) for c in range(10)) + " | Frechet |")
    print("|---|---|---|" + "---|" * 10 + "---|")
    for row in rows:
        per_class = " | ".join(f"{row['per_class'][c]:.2f}" for c in range(10))
        print(f"| {Path(row['model']).name} | {row['guidance_scale']:g} | {row['accuracy']:.4f} | {per_class} | {row['frechet']:.4f} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"real": real, "generated": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main(parse_args()))
