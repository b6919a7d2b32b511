r"""Evaluate generated images with the ADM protocol: FID, sFID, Inception Score, precision, recall.

The protocol of the RAR paper (and ADM, VAR, MAR, ...): 50,000 samples (50 per class) as uint8 NHWC under
`arr_0` of an npz file, against the reference batch VIRTUAL_imagenet256_labeled.npz, with the TF FID
Inception network. Activations are computed here with the PyTorch port of that network
(rar_hf.metrics.inception) and turned into metrics by the `rar_fid` evaluate module.

    rar-hf evaluate \
        --samples samples_50k.npz \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth \
        --output_json outputs/fid.json

Your own data: `--reference` also takes an image folder (flat, or one sub-folder per class) or a `datasets` folder
(save_to_disk, parquet shards); its images are centre-cropped to the samples' size (as ADM made its reference
batches) and their statistics are computed here, then cached beside the samples in fid_reference-<key>.npz. The key
hashes the reference's pixels and the Inception weights, so a changed reference or setting is never served from an
old cache (it is computed again, into its own file).

    rar-hf evaluate --samples outputs/samples/ --reference data/train --output_json outputs/fid.json

Inception weights offline: put pt_inception-2015-12-05-6726825d.pth in torch.hub's checkpoint folder
($TORCH_HOME/hub/checkpoints/, by default ~/.cache/torch/hub/checkpoints/), where it is used without a flag, or pass
--inception_weights PATH.
"""

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arguments import UserError, check_writable, positive_int
from ..metrics import images as sources
from ..metrics.fid import compute_statistics, read_npz_header, read_npz_statistics
from ..metrics.inception import PYTORCH_FID_WEIGHTS_URL, FIDInceptionV3, cached_weights_path
from ..weights import weights_sha256

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
        help="Real images: an ADM reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz: uint8 images under arr_0, "
        "and optionally precomputed mu/sigma/mu_s/sigma_s, which are then used for FID and sFID), an image folder "
        "(flat or one sub-folder per class) or a `datasets` folder (save_to_disk, parquet shards).",
    )
    parser.add_argument(
        "--reference_split", default=None, help="Split of a --reference dataset with several (default: its only one)."
    )
    parser.add_argument(
        "--reference_cache_dir",
        default=None,
        help="Folder of the cached reference statistics, fid_reference-<key>.npz (default: beside --samples); "
        "`none` to compute them every time.",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--inception_weights",
        help=f"Path of the FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        f"({PYTORCH_FID_WEIGHTS_URL}) or a .safetensors file with the same keys. Default: that file in torch.hub's "
        "checkpoint folder ($TORCH_HOME/hub/checkpoints/), where it can be put for offline use.",
    )
    weights.add_argument(
        "--download_inception_weights",
        action="store_true",
        help="Download pytorch-fid's Inception weights into torch.hub's checkpoint folder if they are not there "
        "(needs network access).",
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


def inception_weights_name(args) -> str:
    if args.random_inception_weights:
        return "random (test only)"
    return str(args.inception_weights or cached_weights_path())


def reference_cache_dir(args) -> Path | None:
    """Where the reference statistics are cached (None: not cached); an explicit folder must be writable."""
    if args.reference_cache_dir is not None:
        if args.reference_cache_dir.lower() == "none":
            return None
        check_writable(args.reference_cache_dir, "--reference_cache_dir", folder=True)
        return Path(args.reference_cache_dir)
    folder = Path(args.samples).resolve().parent
    try:
        check_writable(folder, "beside --samples", folder=True)
    except UserError as error:
        print(f"warning: the reference statistics will not be cached ({error})", file=sys.stderr)
        return None
    return folder


def reference_statistics(model, reference, args, cache_dir: Path | None):
    """Pool activations and FID/sFID statistics of the reference: from the cache when its key matches, else computed
    (and cached). Returns `(pool, statistics, "cached" or "computed", cache path or None)`."""
    digest, count, _ = sources.pixel_digest(reference.batches())  # decodes every image: a bad file fails here
    if count <= K_NEAREST:
        raise ValueError(f"precision/recall need more than {K_NEAREST} images in each of samples and reference")
    settings = {
        "inception_weights_sha256": weights_sha256(model),
        "reference_preprocessing": reference.preprocessing,
        "statistics": "ADM: pool_3 and mixed_6/conv[:7] activations, mean and np.cov",
    }
    key = sources.cache_key(digest, settings)
    path = None if cache_dir is None else sources.cache_path(cache_dir, key)
    if path is not None:
        cached, why_not = sources.read_cache(path, key)
        if cached is not None:
            print(f"reference statistics: read from {path} (same images and settings)", file=sys.stderr)
            return cached["pool"], {name: cached[name] for name in sources.STATISTICS}, "cached", path
        if why_not:
            print(f"warning: {why_not}; computing them again", file=sys.stderr)
    activations = compute_activations(model, reference.batches(), count, args.batch_size, args.device, "reference")
    statistics = dict(zip(("mu", "sigma"), compute_statistics(activations["pool"])))
    statistics.update(zip(("mu_s", "sigma_s"), compute_statistics(activations["spatial"])))
    if path is not None:
        record = {**settings, "pixels_sha256": digest, "num_images": count, "reference": str(args.reference)}
        sources.write_cache(path, key, record, activations["pool"], statistics)
        print(f"reference statistics: computed, cached in {path}", file=sys.stderr)
    return activations["pool"], statistics, "computed", path


def main(args) -> dict:
    try:
        import evaluate
    except ImportError as error:
        raise UserError(f"rar-hf evaluate needs the `eval` extra (pip install 'rar-hf[eval]'): {error}") from error
    # TF32 convolutions would move the activations away from the float32 TF graph.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    # Every input and output path is checked before the first image goes through Inception.
    if args.output_json:
        check_writable(args.output_json, "--output_json")
    sample_shape, sample_batches = sources.open_images(args.samples, args.batch_size)
    if sample_shape[0] <= K_NEAREST:
        raise ValueError(f"precision/recall need more than {K_NEAREST} images in each of samples and reference")
    reference = sources.open_reference(args.reference, args.batch_size, sample_shape[1:], args.reference_split)
    stored = read_npz_statistics(reference.npz) if reference.npz is not None else None
    cache_dir = reference_cache_dir(args)
    model = load_inception(args).to(args.device)
    if reference.npz is not None:
        reference_shape = read_npz_header(reference.npz)[0]
        if tuple(sample_shape[1:]) != tuple(reference_shape[1:3]):
            print(f"warning: samples are {sample_shape[1:]}, reference images {reference_shape[1:3]}", file=sys.stderr)
    if sample_shape[0] != PROTOCOL_NUM_SAMPLES:
        print(
            f"warning: {sample_shape[0]} samples; the ADM protocol uses {PROTOCOL_NUM_SAMPLES} "
            "(FID is biased upwards for fewer)",
            file=sys.stderr,
        )

    reference_pool, statistics, how, cache = reference_statistics(model, reference, args, cache_dir)
    samples = compute_activations(model, sample_batches, sample_shape[0], args.batch_size, args.device, "samples")

    metric = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    results = metric.compute(
        pool=samples["pool"],
        spatial=samples["spatial"],
        logits=samples["logits"],
        reference_pool=reference_pool,
        reference_statistics=stored if stored is not None else statistics,
        k=K_NEAREST,
        device=args.device,
    )
    results.update(
        num_samples=sample_shape[0],
        num_reference=len(reference_pool),
        reference=str(args.reference),
        reference_preprocessing=reference.preprocessing,
        reference_statistics="stored" if stored is not None else how,
        reference_cache=str(cache) if cache is not None else None,
        inception_weights=inception_weights_name(args),
    )
    text = json.dumps(results, indent=2)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(text + "\n")
    print(text)
    return results
