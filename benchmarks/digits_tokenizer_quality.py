"""Is a digits tokenizer good enough for the generator? Reconstruction quality of held-out digits.

The generator can only draw what the tokenizer can decode, so a tokenizer for the tiny digits model must
reconstruct digits that are still recognisable. This script encodes and decodes the held-out digits of the
split used for training (``rar_hf.data.digits``, same ``--test_size``/``--seed``), and reports:

* the reconstruction MSE (pixels in [0, 1], at the tokenizer's resolution);
* codebook usage: the fraction of codes used on the held-out set, and the perplexity of their distribution;
* the accuracy of an SVC trained on the real 8x8 training digits, on
  - the real held-out 8x8 digits (the classifier's own accuracy),
  - the held-out images as the tokenizer sees them, area-averaged back to 8x8 (the resampling ceiling),
  - their reconstructions, area-averaged back to 8x8 and rescaled to 0..16 the same way.

Usage::

    python benchmarks/digits_tokenizer_quality.py --model_path outputs/tiny-digits/vqgan
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from sklearn.svm import SVC

from rar_hf.data.digits import digits_to_images, images_to_digits, split_digits
from rar_hf.data.transforms import to_tensor
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel


def parse_args():
    parser = argparse.ArgumentParser(description="Held-out reconstruction quality of a digits tokenizer.")
    parser.add_argument("--model_path", required=True, help="Folder (or Hub id) of the trained MaskGITVQModel.")
    parser.add_argument(
        "--image_size", type=int, default=None, help="Digit image size; defaults to the model's sample_size."
    )
    parser.add_argument("--test_size", type=float, default=0.2, help="Held-out fraction used to build the split.")
    parser.add_argument("--seed", type=int, default=0, help="Seed used to build the split.")
    parser.add_argument("--batch_size", type=int, default=128, help="Images encoded/decoded at once.")
    parser.add_argument("--output_json", default=None, help="Also write the results to this JSON file.")
    return parser.parse_args()


@torch.no_grad()
def reconstruct(model: MaskGITVQModel, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    samples, indices = [], []
    for batch in images.split(batch_size):
        output = model(batch)  # eval mode: clamped to [0, 1]
        samples.append(output.sample)
        indices.append(output.indices)
    return torch.cat(samples), torch.cat(indices)


def main():
    args = parse_args()
    model = MaskGITVQModel.from_pretrained(args.model_path).eval()
    sample_size = model.config.sample_size
    image_size = args.image_size or (sample_size if isinstance(sample_size, int) else sample_size[0])

    split = split_digits(args.test_size, args.seed)
    (train_x, train_y), (test_x, test_y) = split["train"], split["test"]
    images = torch.stack([to_tensor(image) for image in digits_to_images(test_x, image_size)])

    start = time.perf_counter()
    reconstructions, indices = reconstruct(model, images, args.batch_size)
    seconds = time.perf_counter() - start

    counts = torch.bincount(indices.flatten(), minlength=model.config.codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    # gamma=0.001 is scikit-learn's classic setting for these digits (~99% on held-out 8x8 digits).
    classifier = SVC(gamma=0.001).fit(train_x.reshape(len(train_x), -1), train_y)
    results = {
        "model_path": args.model_path,
        "image_size": image_size,
        "num_test_images": len(test_y),
        "tokens_per_image": indices.shape[1],
        "reconstruction_mse": F.mse_loss(reconstructions, images).item(),
        "codebook_usage": (counts > 0).double().mean().item(),
        "codebook_perplexity": torch.exp(-(probs * probs.log()).sum()).item(),
        "accuracy_real_8x8": classifier.score(test_x.reshape(len(test_x), -1), test_y),
        "accuracy_real_resampled": classifier.score(images_to_digits(images), test_y),
        "accuracy_reconstructed": classifier.score(images_to_digits(reconstructions), test_y),
        "reconstruction_seconds": seconds,
    }
    for name, value in results.items():
        print(f"{name:>26}: {value:.4f}" if isinstance(value, float) else f"{name:>26}: {value}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
