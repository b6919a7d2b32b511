r"""Evaluate generated ImageNet samples with the ADM protocol: FID, sFID, Inception Score, precision, recall.

The protocol of the RAR paper (and ADM, VAR, MAR, ...): 50,000 samples (50 per class) as uint8 NHWC under
`arr_0` of an npz file, against the reference batch VIRTUAL_imagenet256_labeled.npz, with the TF FID
Inception network. Activations are computed here with the PyTorch port of that network
(rar_hf.metrics.inception) and turned into metrics by the `rar_fid` evaluate module.

    rar-hf evaluate \
        --samples samples_50k.npz \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth \
        --output_json outputs/fid.json
"""

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..metrics.fid import iter_npz_batches, read_npz_header, read_npz_statistics
from ..metrics.inception import PYTORCH_FID_WEIGHTS_URL, FIDInceptionV3
from ._loading import positive_int

METRIC_PATH = Path(__file__).resolve().parents[1] / "metrics" / "rar_fid"
PROTOCOL_NUM_SAMPLES = 50_000
K_NEAREST = 3


def add_arguments(parser):
    parser.add_argument(
        "--samples",
        required=True,
        help="Generated images: an npz file with uint8 (N, H, W, 3) images under arr_0, or a folder of RGB PNGs.",
    )
    parser.add_argument(
        "--reference",
        required=True,
        help="ADM reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz): uint8 images under arr_0, and "
        "optionally precomputed mu/sigma/mu_s/sigma_s, which are then used for FID and sFID.",
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--inception_weights",
        help=f"Path of the FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        f"({PYTORCH_FID_WEIGHTS_URL}) or a .safetensors file with the same keys.",
    )
    weights.add_argument(
        "--download_inception_weights",
        action="store_true",
        help="Download pytorch-fid's Inception weights through torch.hub (needs network access).",
    )
    weights.add_argument(
        "--random_inception_weights",
        action="store_true",
        help="TEST ONLY: use a randomly initialised Inception network (seed 0). The numbers are meaningless; "
        "this exists so the pipeline can be tested without the weights.",
    )
    parser.add_argument("--batch_size", type=positive_int, default=64, help="Images per Inception forward pass (ADM: 64).")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Torch device for Inception and the precision/recall distances (default: cuda if available).",
    )
    parser.add_argument("--output_json", help="Where to write the metrics as JSON (they are printed either way).")


def parse_args(argv=None):
    from ..cli import ArgumentParser

    parser = ArgumentParser(description=__doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def check_images(shape: tuple, dtype: np.dtype, source: str) -> None:
    """Raise ``ValueError`` unless ``shape``/``dtype`` describe uint8 NHWC RGB images."""
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{source}: expected images of shape (N, H, W, 3), got {tuple(shape)}{hint}")
    if dtype != np.uint8:
        hint = " (floats in [0, 1]? store (x * 255).round().clip(0, 255).astype(np.uint8))" if dtype.kind == "f" else ""
        raise ValueError(f"{source}: expected uint8 images, got {dtype}{hint}")


def open_images(path: str, batch_size: int) -> tuple[tuple[int, int, int], Iterator[np.ndarray]]:
    """Validate an image source; return ``(N, H, W)`` and an iterator over uint8 NHWC batches."""
    source = Path(path)
    if source.is_dir():
        # Hidden files are partial writes (sample_imagenet.py writes .<name>.<pid>.tmp.png, then renames).
        files = sorted(f for f in source.glob("*.png") if not f.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{source}: no .png files")
        try:
            with Image.open(files[0]) as first:
                width, height = first.size
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{files[0]}: not a readable PNG ({error})") from error
        return (len(files), height, width), _png_batches(files, batch_size, (height, width))
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.suffix != ".npz":
        raise ValueError(f"{source}: expected an .npz file or a folder of PNGs")
    shape, dtype = read_npz_header(source)
    check_images(shape, dtype, str(source))
    return shape[:3], iter_npz_batches(source, batch_size)


def _png_batches(files: list[Path], batch_size: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as image:
                    if image.mode != "RGB":
                        raise ValueError(f"{file}: expected an RGB image, got mode {image.mode}")
                    array = np.asarray(image)
            except (UnidentifiedImageError, OSError) as error:  # truncated or not an image at all
                raise ValueError(f"{file}: not a readable PNG ({error})") from error
            if array.shape[:2] != size:
                raise ValueError(f"{file}: size {array.shape[:2]} differs from the first image's {size}")
            batch.append(array)
        yield np.stack(batch)


@torch.no_grad()
def compute_activations(
    model: FIDInceptionV3, batches: Iterator[np.ndarray], num_images: int, batch_size: int, device: str, desc: str
) -> dict[str, np.ndarray]:
    """Run the Inception network over uint8 NHWC batches; return stacked ``pool``/``spatial``/``logits``."""
    outputs = {"pool": [], "spatial": [], "logits": []}
    for batch in tqdm(batches, total=-(-num_images // batch_size), desc=desc, unit="batch"):
        images = torch.tensor(batch, device=device).permute(0, 3, 1, 2)
        features = model(images)
        for name, values in outputs.items():
            values.append(getattr(features, name).cpu().numpy())
    return {name: np.concatenate(values) for name, values in outputs.items()}


def load_inception(args) -> FIDInceptionV3:
    if args.random_inception_weights:
        torch.manual_seed(0)
        return FIDInceptionV3().eval().requires_grad_(False)
    return FIDInceptionV3.from_pretrained(args.inception_weights, download=args.download_inception_weights)


def main(args) -> dict:
    try:
        import evaluate
    except ImportError as error:
        raise ValueError(f"rar-hf evaluate needs the `eval` extra (pip install 'rar-hf[eval]'): {error}") from error
    # TF32 convolutions would move the activations away from the float32 TF graph.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    sample_shape, sample_batches = open_images(args.samples, args.batch_size)
    reference_shape, reference_batches = open_images(args.reference, args.batch_size)
    if min(sample_shape[0], reference_shape[0]) <= K_NEAREST:
        raise ValueError(f"precision/recall need more than {K_NEAREST} images in each of samples and reference")
    reference_statistics = read_npz_statistics(args.reference) if Path(args.reference).suffix == ".npz" else None
    model = load_inception(args).to(args.device)  # every input is checked before the first warning or result
    if sample_shape[1:] != reference_shape[1:]:
        print(f"warning: samples are {sample_shape[1:]}, reference images {reference_shape[1:]}", file=sys.stderr)
    if sample_shape[0] != PROTOCOL_NUM_SAMPLES:
        print(
            f"warning: {sample_shape[0]} samples; the ADM protocol uses {PROTOCOL_NUM_SAMPLES} "
            "(FID is biased upwards for fewer)",
            file=sys.stderr,
        )

    reference = compute_activations(
        model, reference_batches, reference_shape[0], args.batch_size, args.device, "reference"
    )
    samples = compute_activations(model, sample_batches, sample_shape[0], args.batch_size, args.device, "samples")

    metric = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    results = metric.compute(
        pool=samples["pool"],
        spatial=samples["spatial"],
        logits=samples["logits"],
        reference_pool=reference["pool"],
        reference_spatial=reference["spatial"],
        reference_statistics=reference_statistics,
        k=K_NEAREST,
        device=args.device,
    )
    results.update(
        num_samples=sample_shape[0],
        num_reference=reference_shape[0],
        reference_statistics="stored" if reference_statistics is not None else "computed",
        inception_weights=(
            "random (test only)"
            if args.random_inception_weights
            else args.inception_weights or PYTORCH_FID_WEIGHTS_URL
        ),
    )
    text = json.dumps(results, indent=2)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(text + "\n")
    print(text)
    return results
