"""Tests of the ADM-protocol metrics: fid.py math and npz readers, the Inception port, the evaluate module, the CLI."""

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import evaluate
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from safetensors.torch import save_file

from rar_hf.metrics.fid import (
    compute_statistics,
    frechet_distance,
    inception_score,
    iter_npz_batches,
    precision_recall,
    read_npz_header,
    read_npz_statistics,
)
from rar_hf.metrics.inception import FIDInceptionV3, resize_bilinear_tf1

try:  # installed with scikit-learn (test extra)
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = None

REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_PATH = REPO_ROOT / "src" / "rar_hf" / "metrics" / "rar_fid"
CLI_PATH = REPO_ROOT / "examples" / "evaluate_fid.py"


@pytest.fixture(autouse=True, scope="module")
def _single_blas_thread():
    # On a shared CPU, OpenBLAS worker threads spin against other processes: LAPACK runs ~10x slower.
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        yield


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's float64 formula with scipy.linalg.sqrtm, as an independent reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def adm_precision_recall(reference, samples, k=3):
    """Brute-force ManifoldEstimator: squared distances, k-th neighbour counting the point itself."""

    def squared_distances(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    reference_radii = np.sort(squared_distances(reference, reference), axis=1)[:, k]
    sample_radii = np.sort(squared_distances(samples, samples), axis=1)[:, k]
    cross = squared_distances(samples, reference)
    precision = (cross <= reference_radii[None, :]).any(axis=1).mean()
    recall = (cross.T <= sample_radii[None, :]).any(axis=1).mean()
    return precision, recall


# Frechet distance -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_a, num_b, dim, duplicated",
    [
        (400, 300, 16, False),  # well conditioned
        (10, 12, 64, False),  # fewer samples than dimensions: singular covariances
        (5, 7, 128, False),  # rank 4 and 6 out of 128
        (60, 50, 32, True),  # duplicated feature columns: exactly singular
    ],
)
def test_frechet_distance_matches_scipy_sqrtm(num_a, num_b, dim, duplicated):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(num_a, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    b = rng.normal(size=(num_b, dim)) + 0.5
    if duplicated:
        a[:, dim // 2 :] = a[:, : dim // 2]
        b[:, dim // 2 :] = b[:, : dim // 2]
    stats_a, stats_b = compute_statistics(a), compute_statistics(b)
    expected = adm_frechet_distance(*stats_a, *stats_b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(*stats_b, *stats_a) == pytest.approx(expected, rel=1e-6)


def test_compute_statistics_matches_numpy():
    features = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    mu, sigma = compute_statistics(features)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))


@pytest.mark.parametrize("num, dim", [(200, 32), (10, 256)])
def test_fid_of_identical_sets_is_zero(num, dim):
    features = np.random.default_rng(1).normal(size=(num, dim)).astype(np.float32)
    mu, sigma = compute_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_rejects_bad_statistics():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="not a covariance"):
        frechet_distance(mu, sigma, mu, -np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, mu + np.nan, sigma)


# Inception Score ------------------------------------------------------------------------------------------


def test_inception_score_matches_numpy_formula():
    logits = np.random.default_rng(2).normal(scale=3.0, size=(25, 7)).astype(np.float32)
    scores = []
    for start in range(0, 25, 10):  # chunks of 10, 10 and 5 samples
        probs = scipy.special.softmax(logits[start : start + 10].astype(np.float64), axis=1)
        kl = probs * (np.log(probs) - np.log(probs.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-10)


def test_inception_score_bounds():
    assert inception_score(np.zeros((8, 5))) == pytest.approx(1.0)
    confident = np.full((10, 10), -1e4)
    np.fill_diagonal(confident, 0.0)  # every sample certain of a different class: log p underflows to -1e4
    assert inception_score(confident) == pytest.approx(10.0)


# Precision / recall ---------------------------------------------------------------------------------------


def test_precision_recall_matches_adm_manifold_estimator():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(60, 8)).astype(np.float32)
    samples = (rng.normal(size=(50, 8)) * 1.3 + 0.4).astype(np.float32)
    expected = adm_precision_recall(reference, samples)
    assert precision_recall(reference, samples, chunk_size=7) == pytest.approx(expected)
    assert precision_recall(reference, samples) == pytest.approx(expected)


def test_precision_recall_constructed_cases():
    rng = np.random.default_rng(4)
    modes = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    reference = np.concatenate([mode + rng.normal(size=(100, 2)) for mode in modes]).astype(np.float32)

    assert precision_recall(reference, reference) == (1.0, 1.0)
    assert precision_recall(reference, reference + 1000.0) == (0.0, 0.0)

    # Samples on two of the four modes: what is generated is realistic, half of the data is covered.
    assert precision_recall(reference, reference[:200].copy()) == (1.0, 0.5)
    fresh = np.concatenate([mode + rng.normal(size=(100, 2)) for mode in modes[:2]]).astype(np.float32)
    precision, recall = precision_recall(reference, fresh)
    assert precision > 0.9 and 0.45 < recall <= 0.5


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# Inception port -------------------------------------------------------------------------------------------


def test_resize_bilinear_tf1_has_no_half_pixel_offset():
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    expected = torch.tensor([[0.0, 2 / 3, 1.0], [4 / 3, 2.0, 7 / 3], [2.0, 8 / 3, 3.0]])
    torch.testing.assert_close(resize_bilinear_tf1(image, 3)[0, 0], expected)


@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval().requires_grad_(False)


@pytest.mark.parametrize("size, dtype", [(64, torch.float32), (256, torch.uint8)])
def test_inception_output_shapes(random_inception, size, dtype):
    images = torch.rand(2, 3, size, size)
    if dtype == torch.uint8:
        images = (images * 255).round().to(torch.uint8)
    captured = []
    hook = random_inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            features = random_inception(images)
    finally:
        hook.remove()
    assert features.pool.shape == (2, 2048)
    assert features.spatial.shape == (2, 7 * 17 * 17)
    assert features.logits.shape == (2, 1008)
    assert all(torch.isfinite(x).all() for x in (features.pool, features.spatial, features.logits))
    # sFID reads TF's mixed_6/conv (Mixed_6d's 1x1 branch, 17x17x192): 7 channels, flattened in NHWC order.
    torch.testing.assert_close(features.spatial, captured[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(features.logits, features.pool @ random_inception.fc.weight.T)


def test_inception_matches_torchvision_layout(random_inception):
    # torchvision's Inception3 without AuxLogits, 1008 classes: the key names and sizes of pytorch-fid's file.
    assert sum(p.numel() for p in random_inception.parameters()) == 23_850_960
    shapes = {key: tuple(value.shape) for key, value in random_inception.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)


def test_inception_rejects_wrong_layout(random_inception):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        random_inception(torch.zeros(1, 64, 64, 3))


def test_from_pretrained_loads_pth_and_safetensors(random_inception, tmp_path):
    # The pytorch-fid file predates BatchNorm's num_batches_tracked counter.
    state_dict = {k: v for k, v in random_inception.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state_dict, tmp_path / "pt_inception.pth")
    save_file(state_dict, tmp_path / "inception.safetensors")
    for name in ("pt_inception.pth", "inception.safetensors"):
        loaded = FIDInceptionV3.from_pretrained(tmp_path / name)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        for key, value in state_dict.items():
            torch.testing.assert_close(loaded.state_dict()[key], value)

    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys"):
        FIDInceptionV3.from_pretrained(tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        FIDInceptionV3.from_pretrained(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="download=True"):
        FIDInceptionV3.from_pretrained()


# npz files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_iter_npz_batches_streams_arr_0(tmp_path, save):
    images = np.random.default_rng(5).integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    save(tmp_path / "samples.npz", images, labels=np.arange(7))
    assert read_npz_header(tmp_path / "samples.npz") == ((7, 4, 5, 3), np.dtype(np.uint8))
    batches = list(iter_npz_batches(tmp_path / "samples.npz", batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert read_npz_statistics(tmp_path / "samples.npz") is None
    with pytest.raises(KeyError, match="no array 'images'"):
        read_npz_header(tmp_path / "samples.npz", key="images")


def test_read_npz_statistics(tmp_path):
    stats = {"mu": np.ones(3), "sigma": np.eye(3), "mu_s": np.zeros(2), "sigma_s": np.eye(2)}
    np.savez(tmp_path / "ref.npz", np.zeros((1, 2, 2, 3), np.uint8), **stats)
    loaded = read_npz_statistics(tmp_path / "ref.npz")
    assert set(loaded) == set(stats)
    for key, value in stats.items():
        np.testing.assert_array_equal(loaded[key], value)
    np.savez(tmp_path / "partial.npz", mu=np.ones(3))
    with pytest.raises(ValueError, match="lacks"):
        read_npz_statistics(tmp_path / "partial.npz")


# evaluate module ------------------------------------------------------------------------------------------


def test_evaluate_module_loads_offline_and_matches_fid_py(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(6)
    pool, spatial, logits = (rng.normal(size=(40, d)).astype(np.float32) for d in (24, 12, 10))
    reference_pool, reference_spatial = (rng.normal(size=(30, d)).astype(np.float32) + 0.2 for d in (24, 12))

    metric = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    for start in range(0, 40, 16):  # accumulated batch by batch, as during sampling
        batch = slice(start, start + 16)
        metric.add_batch(pool=pool[batch], spatial=spatial[batch], logits=logits[batch])
    results = metric.compute(reference_pool=reference_pool, reference_spatial=reference_spatial, split_size=20)

    expected_fid = frechet_distance(*compute_statistics(pool), *compute_statistics(reference_pool))
    assert results["fid"] == pytest.approx(expected_fid, rel=1e-12)
    assert results["sfid"] == pytest.approx(
        frechet_distance(*compute_statistics(spatial), *compute_statistics(reference_spatial)), rel=1e-12
    )
    assert results["inception_score"] == pytest.approx(inception_score(logits, split_size=20), rel=1e-12)
    assert (results["precision"], results["recall"]) == precision_recall(reference_pool, pool)

    # Stored reference statistics (as in VIRTUAL_imagenet256_labeled.npz) take precedence over activations.
    stats = dict(zip(("mu", "sigma"), compute_statistics(reference_pool + 1.0)))
    stats.update(zip(("mu_s", "sigma_s"), compute_statistics(reference_spatial + 1.0)))
    stored = metric.compute(
        pool=pool, spatial=spatial, logits=logits, reference_pool=reference_pool, reference_statistics=stats
    )
    assert stored["fid"] == pytest.approx(frechet_distance(*compute_statistics(pool), stats["mu"], stats["sigma"]))
    assert stored["sfid"] == pytest.approx(
        frechet_distance(*compute_statistics(spatial), stats["mu_s"], stats["sigma_s"])
    )


# CLI ------------------------------------------------------------------------------------------------------


def _load_cli():
    from rar_hf.commands import evaluate as module

    return module


def test_evaluate_fid_cli_end_to_end(tmp_path):
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8))
    np.savez(
        tmp_path / "reference.npz",
        rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8),
        mu=np.zeros(2048),
        sigma=np.eye(2048) * 1e-4,
        mu_s=np.zeros(7 * 17 * 17),
        sigma_s=np.eye(7 * 17 * 17) * 1e-4,
    )
    output = tmp_path / "out" / "metrics.json"
    # One BLAS/OpenMP thread: on a shared CPU, oversubscribed LAPACK threads make the 2048-d FID crawl.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, str(CLI_PATH), "--samples", str(tmp_path / "samples.npz")]
    command += ["--reference", str(tmp_path / "reference.npz"), "--random_inception_weights"]
    command += ["--batch_size", "3", "--device", "cpu", "--output_json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr

    results = json.loads(output.read_text())
    assert results == json.loads(completed.stdout)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(results[key]), key
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert results["inception_score"] >= 1.0 - 1e-9
    assert results["num_samples"] == 5 and results["num_reference"] == 5
    assert results["reference_statistics"] == "stored"
    assert results["inception_weights"] == "random (test only)"


def test_evaluate_fid_cli_rejects_bad_inputs(tmp_path):
    cli = _load_cli()
    reference = tmp_path / "reference.npz"
    np.savez(reference, np.zeros((5, 8, 8, 3), np.uint8))

    def run(samples):
        args = ["--samples", str(samples), "--reference", str(reference), "--random_inception_weights"]
        return cli.main(cli.parse_args(args))

    np.savez(tmp_path / "floats.npz", np.zeros((5, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected uint8 images, got float32 \(floats in \[0, 1\]"):
        run(tmp_path / "floats.npz")
    np.savez(tmp_path / "nchw.npz", np.zeros((5, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        run(tmp_path / "nchw.npz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(tmp_path / "missing.npz")
    (tmp_path / "pngs").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png files"):
        run(tmp_path / "pngs")
    np.savez(tmp_path / "few.npz", np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="more than 3 images"):
        run(tmp_path / "few.npz")


def test_evaluate_fid_cli_reads_png_folders(tmp_path):
    from PIL import Image

    cli = _load_cli()
    images = np.random.default_rng(8).integers(0, 256, size=(3, 6, 4, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index:05d}.png")
    shape, batches = cli.open_images(str(tmp_path), batch_size=2)
    assert shape == (3, 6, 4)
    np.testing.assert_array_equal(np.concatenate(list(batches)), images)

    Image.fromarray(np.zeros((6, 4, 4), np.uint8)).save(tmp_path / "00003.png")  # RGBA
    with pytest.raises(ValueError, match="expected an RGB image, got mode RGBA"):
        list(cli.open_images(str(tmp_path), batch_size=2)[1])
