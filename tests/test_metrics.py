"""Tests of the ADM-protocol metrics: fid.py math and npz readers, the Inception port, the evaluate module, the CLI."""

import contextlib
import json
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
from rar_hf.metrics.inception import WEIGHTS_FILENAME, FIDInceptionV3, resize_bilinear_tf1

try:  # installed with scikit-learn (test extra)
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = None

REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_PATH = REPO_ROOT / "src" / "rar_hf" / "metrics" / "rar_fid"


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


def test_from_pretrained_loads_pth_and_safetensors(random_inception, tmp_path, monkeypatch):
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

    # Offline use: the file in torch.hub's checkpoint folder is found without a path (and without a download).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError, match=f"in {tmp_path / 'torch-home' / 'hub' / 'checkpoints'} for offline use"):
        FIDInceptionV3.from_pretrained()
    (tmp_path / "torch-home" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "pt_inception.pth").rename(tmp_path / "torch-home" / "hub" / "checkpoints" / WEIGHTS_FILENAME)
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # no network use
    loaded = FIDInceptionV3.from_pretrained(download=True)
    torch.testing.assert_close(loaded.fc.weight, state_dict["fc.weight"])


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


# CLI: rar-hf evaluate, in-process -------------------------------------------------------------------------


def run_evaluate(*argv):
    """`rar-hf evaluate ARGV` in this process: the results dict it returns (a refused input raises SystemExit(2))."""
    from rar_hf.arguments import command_parser
    from rar_hf.commands import evaluate as command

    return command.main(command_parser(command).parse_args([str(a) for a in argv]))


def test_evaluate_end_to_end_with_an_adm_reference_batch(tmp_path, capsys, tiny_inception):
    from rar_hf import cli

    rng = np.random.default_rng(7)
    samples = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", samples)
    stored = {"mu": np.full(12, 0.5), "sigma": np.eye(12) * 1e-2, "mu_s": np.zeros(8), "sigma_s": np.eye(8) * 1e-2}
    np.savez(tmp_path / "reference.npz", rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8), **stored)
    output = tmp_path / "out" / "metrics.json"
    cli.main(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "reference.npz"),
              "--random_inception_weights", "--batch_size", "3", "--device", "cpu", "--output_json", str(output)])  # fmt: skip
    results = json.loads(output.read_text())
    assert results == json.loads(capsys.readouterr().out)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(results[key]), key
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert results["inception_score"] >= 1.0 - 1e-9
    assert results["num_samples"] == 5 and results["num_reference"] == 5
    assert results["inception_weights"] == "random (test only)"
    # FID and sFID against the stored statistics, not against statistics of the reference images.
    assert results["reference_statistics"] == "stored"
    with torch.no_grad():
        features = TinyInception()(torch.tensor(samples).permute(0, 3, 1, 2))
    assert results["fid"] == pytest.approx(frechet_distance(*compute_statistics(features.pool), stored["mu"], stored["sigma"]))
    assert results["sfid"] == pytest.approx(
        frechet_distance(*compute_statistics(features.spatial), stored["mu_s"], stored["sigma_s"])
    )


def test_evaluate_rejects_bad_inputs(tmp_path):
    reference = tmp_path / "reference.npz"
    np.savez(reference, np.zeros((5, 8, 8, 3), np.uint8))

    def run(samples):
        return run_evaluate("--samples", samples, "--reference", reference, "--random_inception_weights")

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


def test_evaluate_reads_png_folders(tmp_path):
    from PIL import Image

    from rar_hf.metrics.images import open_images

    images = np.random.default_rng(8).integers(0, 256, size=(3, 6, 4, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index:05d}.png")
    shape, batches = open_images(str(tmp_path), batch_size=2)
    assert shape == (3, 6, 4)
    np.testing.assert_array_equal(np.concatenate(list(batches)), images)

    Image.fromarray(np.zeros((6, 4, 4), np.uint8)).save(tmp_path / "00003.png")  # RGBA
    with pytest.raises(ValueError, match="expected an RGB image, got mode RGBA"):
        list(open_images(str(tmp_path), batch_size=2)[1])


# A reference of your own images: computed here, cached beside the samples -------------------------------


class TinyInception(torch.nn.Module):
    """A stand-in for the 24M-parameter network with the same interface: 12-d pool, 8-d spatial, 4 logits."""

    def __init__(self, seed=0):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, 24, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images):
        from rar_hf.metrics.inception import InceptionFeatures

        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj
        return InceptionFeatures(pool=x[:, :12], spatial=x[:, 12:20], logits=x[:, 20:])


@pytest.fixture
def tiny_inception(monkeypatch):
    from rar_hf.commands import evaluate as command

    seeds = {"seed": 0}
    monkeypatch.setattr(command, "load_inception", lambda args: TinyInception(seeds["seed"]))
    return seeds


def write_pngs(folder, images, prefix=""):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}{index:03d}.png")


@pytest.fixture
def own_data(tmp_path):
    """16x16 PNG samples in out/samples/, and a reference image folder data/train/<class>/ of 24x20 images."""
    rng = np.random.default_rng(9)
    write_pngs(tmp_path / "out" / "samples", rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8))
    reference = rng.integers(0, 256, size=(9, 24, 20, 3), dtype=np.uint8)
    for name, part in (("cat", reference[:5]), ("dog", reference[5:])):
        write_pngs(tmp_path / "data" / "train" / name, part, prefix=name)
    return tmp_path / "out" / "samples", tmp_path / "data" / "train", reference


def expected_fid(samples, reference_images, seed=0):
    """FID of the tiny network's activations, with the reference centre-cropped to 16x16 as ADM did."""
    from PIL import Image

    from rar_hf.data import center_crop_arr

    cropped = np.stack([np.asarray(center_crop_arr(Image.fromarray(a), 16)) for a in reference_images])
    model = TinyInception(seed)
    with torch.no_grad():
        pools = [model(torch.tensor(x).permute(0, 3, 1, 2)).pool.numpy() for x in (samples, cropped)]
    return frechet_distance(*compute_statistics(pools[0]), *compute_statistics(pools[1]))


def test_evaluate_computes_a_folders_reference_statistics_and_caches_them(own_data, tiny_inception, capsys):
    samples_dir, reference_dir, reference = own_data
    samples = np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in sorted(samples_dir.glob("*.png"))])
    argv = ["--samples", samples_dir, "--reference", reference_dir, "--random_inception_weights"]

    first = run_evaluate(*argv)
    caches = sorted(samples_dir.parent.glob("fid_reference-*.npz"))
    assert len(caches) == 1 and first["reference_cache"] == str(caches[0])  # beside the samples
    assert first["reference_statistics"] == "computed" and first["num_reference"] == 9
    assert first["fid"] == pytest.approx(expected_fid(samples, reference), rel=1e-5)
    assert "centre crop to 16x16" in first["reference_preprocessing"]

    # The same images and settings: read back, the same numbers, nothing recomputed.
    mtime = caches[0].stat().st_mtime_ns
    second = run_evaluate(*argv)
    assert second["reference_statistics"] == "cached" and caches[0].stat().st_mtime_ns == mtime
    assert {k: second[k] for k in ("fid", "sfid", "precision", "recall")} == {
        k: first[k] for k in ("fid", "sfid", "precision", "recall")
    }
    assert "read from" in capsys.readouterr().err


def test_a_reference_cache_is_never_reused_for_other_images_or_settings(own_data, tiny_inception, capsys):
    samples_dir, reference_dir, reference = own_data
    samples = np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in sorted(samples_dir.glob("*.png"))])
    argv = ["--samples", samples_dir, "--reference", reference_dir, "--random_inception_weights"]
    first = run_evaluate(*argv)
    first_cache = Path(first["reference_cache"])

    # One reference pixel changed: another key, computed again into its own file; the old cache is left alone.
    changed = reference.copy()
    changed[6, 0, 0, 0] ^= 0xFF
    write_pngs(reference_dir / "dog", changed[5:], prefix="dog")
    again = run_evaluate(*argv)
    assert again["reference_statistics"] == "computed" and again["reference_cache"] != str(first_cache)
    assert again["fid"] == pytest.approx(expected_fid(samples, changed), rel=1e-5)
    assert len(list(samples_dir.parent.glob("fid_reference-*.npz"))) == 2

    # Other Inception weights: another key too.
    tiny_inception["seed"] = 1
    other = run_evaluate(*argv)
    assert other["reference_statistics"] == "computed"
    assert other["fid"] == pytest.approx(expected_fid(samples, changed, seed=1), rel=1e-5)

    # A file under the right name that holds another key (copied, or written by something else) is not trusted.
    first_cache.replace(other["reference_cache"])
    capsys.readouterr()
    redone = run_evaluate(*argv)
    assert redone["reference_statistics"] == "computed" and redone["fid"] == other["fid"]
    assert "holds the statistics of other images or settings" in capsys.readouterr().err
    assert run_evaluate(*argv)["reference_statistics"] == "cached"  # the bad file was replaced

    # No cache at all, on request.
    assert run_evaluate(*argv, "--reference_cache_dir", "none")["reference_cache"] is None


def test_evaluate_reads_a_datasets_folder_as_reference(own_data, tiny_inception, tmp_path):
    import datasets

    samples_dir, _, reference = own_data
    samples = np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in sorted(samples_dir.glob("*.png"))])
    from PIL import Image

    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"picture": [Image.fromarray(a) for a in reference], "label": list(range(9))}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split.select(range(4))}).save_to_disk(str(tmp_path / "saved"))
    argv = ["--samples", samples_dir, "--reference", tmp_path / "saved", "--random_inception_weights"]
    with pytest.raises(ValueError, match=r"has several splits \(train, test\): choose one with --reference_split"):
        run_evaluate(*argv)
    results = run_evaluate(*argv, "--reference_split", "train", "--reference_cache_dir", tmp_path / "cache")
    assert results["num_reference"] == 9 and results["reference_cache"].startswith(str(tmp_path / "cache"))
    assert results["fid"] == pytest.approx(expected_fid(samples, reference), rel=1e-5)
    # Parquet shards (what `python -m rar_hf.data.digits` writes) are a dataset folder too.
    (tmp_path / "shards" / "data").mkdir(parents=True)
    split.to_parquet(str(tmp_path / "shards" / "data" / "train-00000-of-00001.parquet"))
    parquet = run_evaluate("--samples", samples_dir, "--reference", tmp_path / "shards", "--random_inception_weights")
    assert parquet["fid"] == pytest.approx(results["fid"], rel=1e-6)


def test_bad_references_are_one_line_before_any_compute(own_data, tmp_path, monkeypatch):
    from rar_hf.commands import evaluate as command

    samples_dir, reference_dir, _ = own_data

    def no_compute(*args, **kwargs):
        raise AssertionError("Inception ran before the bad input was reported")

    monkeypatch.setattr(command, "compute_activations", no_compute)
    monkeypatch.setattr(command, "load_inception", lambda args: TinyInception())
    (reference_dir / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"broken.png: not a decodable image"):
        run_evaluate("--samples", samples_dir, "--reference", reference_dir, "--random_inception_weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="doesn't contain any data files"):
        run_evaluate("--samples", samples_dir, "--reference", tmp_path / "empty", "--random_inception_weights")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"--reference .*notes.txt: expected an ADM reference batch \(.npz\), an image folder"):
        run_evaluate("--samples", samples_dir, "--reference", tmp_path / "notes.txt", "--random_inception_weights")
    from PIL import Image

    wide = tmp_path / "wide"
    write_pngs(wide, np.zeros((4, 8, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="samples are 8x16: .* must be square"):
        run_evaluate("--samples", wide, "--reference", reference_dir, "--random_inception_weights")
    del Image
