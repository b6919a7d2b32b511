import pytest
import torch
from torch.utils.data import DataLoader

from rar_hf.data import RARDataCollator, get_scan_order, randomness_ratio

V, C = 16, 10  # tiny codebook and class count
H, W = 4, 4
L = H * W


def make_features(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, L), generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    return [{"tokens": t.tolist(), "label": int(c)} for t, c in zip(tokens, labels)]


def make_collator(**kwargs):
    defaults = dict(codebook_size=V, num_classes=C, latent_size=(H, W), anneal_start=0, anneal_end=0)
    return RARDataCollator(**{**defaults, **kwargs})


def is_permutation(row):
    return torch.equal(row.sort().values, torch.arange(row.numel()))


# ---- schedule ----


def test_randomness_ratio_known_schedule():
    expected = {0: 1.0, 9: 1.0, 10: 1.0, 11: 0.9, 15: 0.5, 19: 0.1, 20: 0.0, 1000: 0.0}
    for step, r in expected.items():
        assert randomness_ratio(step, 10, 20) == pytest.approx(r)


def test_randomness_ratio_start_equals_end():
    assert randomness_ratio(4, 5, 5) == 1.0
    assert randomness_ratio(5, 5, 5) == 0.0
    assert randomness_ratio(0, 0, 0) == 0.0  # (0, 0): pure raster training


@pytest.mark.parametrize("start, end", [(-1, 5), (5, 4)])
def test_randomness_ratio_rejects_bad_schedules(start, end):
    with pytest.raises(ValueError, match="anneal_end >= anneal_start >= 0"):
        randomness_ratio(0, start, end)


# ---- collation ----


def test_batch_layout_and_contract():
    features = make_features(8)
    collator = make_collator(anneal_start=100, anneal_end=200, class_dropout_prob=0.0)
    batch = collator(features)
    assert set(batch) == {"input_ids", "orders", "labels", "randomness_ratio", "step"}
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 1 + L)
    assert batch["orders"].shape == (8, L)
    assert batch["input_ids"].dtype == batch["orders"].dtype == batch["labels"].dtype == torch.int64
    assert batch["randomness_ratio"].dim() == 0 and batch["randomness_ratio"].dtype == torch.float32
    assert batch["step"].dim() == 0 and batch["step"].dtype == torch.int64
    tokens = torch.tensor([f["tokens"] for f in features])
    classes = torch.tensor([f["label"] for f in features])
    assert torch.equal(batch["input_ids"][:, 0], classes + V + 1)
    assert torch.equal(batch["input_ids"][:, 1:], tokens.gather(1, batch["orders"]))
    for b in range(8):  # the contract, element by element
        for j in range(L):
            assert batch["input_ids"][b, 1 + j] == tokens[b, batch["orders"][b, j]]
    assert (batch["labels"][:, 0] == -100).all()
    assert torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])


def test_r_one_gives_random_permutations_and_r_zero_the_scan_order():
    features = make_features(64)
    random_batch = make_collator(anneal_start=10, anneal_end=20)(features)
    assert random_batch["randomness_ratio"].item() == 1.0
    orders = random_batch["orders"]
    assert all(is_permutation(row) for row in orders)
    assert len({tuple(row.tolist()) for row in orders}) == 64  # 16! orders: all distinct

    scan = get_scan_order("spiral_in", H, W)
    final_batch = make_collator(anneal_start=0, anneal_end=0, scan_order="spiral_in")(features)
    assert final_batch["randomness_ratio"].item() == 0.0
    assert torch.equal(final_batch["orders"], scan.expand(64, L))


def test_fraction_of_random_orders_matches_r():
    features = make_features(100)
    scan = get_scan_order("raster", H, W)
    # Batches 100..139 are all consumed by optimizer step 1, where r = 0.75.
    collator = make_collator(anneal_start=0, anneal_end=4, gradient_accumulation_steps=100)
    n_random = 0
    for batch_index in range(100, 140):
        batch = collator.collate(features, batch_index)
        assert batch["randomness_ratio"].item() == pytest.approx(0.75)
        assert batch["step"].item() == 1
        n_random += int((batch["orders"] != scan).any(dim=1).sum())  # a random order equal to raster: 1/16!
    assert abs(n_random / 4000 - 0.75) < 0.03  # ~4.4 standard deviations


def test_class_dropout_rate_and_null_id():
    features = make_features(100)
    collator = make_collator(class_dropout_prob=0.3)
    assert collator.null_class_id == V + 1 + C
    classes = torch.tensor([f["label"] for f in features])
    n_dropped = 0
    for batch_index in range(40):
        batch = collator.collate(features, batch_index)
        first = batch["input_ids"][:, 0]
        dropped = first == V + 1 + C
        assert torch.equal(first[~dropped], classes[~dropped] + V + 1)
        assert (batch["labels"][:, 0] == -100).all()
        assert torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])
        n_dropped += int(dropped.sum())
    assert abs(n_dropped / 4000 - 0.3) < 0.03  # ~4.1 standard deviations
    assert not (make_collator(class_dropout_prob=0.0)(features)["input_ids"][:, 0] == V + 1 + C).any()


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_reproducible_from_seed_and_different_across_ranks_and_seeds():
    features = make_features(16)
    kwargs = dict(anneal_start=10, anneal_end=20, class_dropout_prob=0.5)
    first, second = make_collator(seed=3, **kwargs), make_collator(seed=3, **kwargs)
    for _ in range(3):
        assert_batches_equal(first(features), second(features))
    reference = make_collator(seed=3, **kwargs).collate(features, 0)
    for other in (make_collator(seed=3, rank=1, **kwargs), make_collator(seed=4, **kwargs)):
        assert not torch.equal(other.collate(features, 0)["orders"], reference["orders"])
    # consecutive batches of one process differ too
    assert not torch.equal(make_collator(seed=3, **kwargs).collate(features, 1)["orders"], reference["orders"])


def test_call_counts_batches_from_start_batch():
    features = make_features(4)
    collator = make_collator(anneal_start=0, anneal_end=10, gradient_accumulation_steps=2)
    collator.set_start_batch(6)
    for batch_index in range(6, 10):
        batch = collator(features)
        assert_batches_equal(batch, collator.collate(features, batch_index))
        assert batch["step"].item() == batch_index // 2
    collator.set_start_batch(0)  # a new iterator restarts the count
    assert_batches_equal(collator(features), collator.collate(features, 0))


def run_loader(features, collator, num_workers, epochs=1, start_batch=0, batch_size=4):
    loader = DataLoader(
        features,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collator,
        num_workers=num_workers,
        multiprocessing_context="fork" if num_workers else None,
    )
    batches = []
    for _ in range(epochs):
        # what the training loop does before creating each iterator
        collator.set_start_batch(start_batch + len(batches))
        batches.extend(loader)
    return batches


def test_dataloader_workers_and_accumulation_match_the_optimizer_step():
    features = make_features(48)  # 12 batches of 4 per epoch
    kwargs = dict(anneal_start=2, anneal_end=6, gradient_accumulation_steps=2, class_dropout_prob=0.2, seed=1)
    with_workers = run_loader(features, make_collator(**kwargs), num_workers=2, epochs=2)
    in_process = run_loader(features, make_collator(**kwargs), num_workers=0, epochs=2)
    assert len(with_workers) == len(in_process) == 24
    for batch_index, (a, b) in enumerate(zip(with_workers, in_process)):
        assert_batches_equal(a, b)
        assert a["step"].item() == batch_index // 2
        assert a["randomness_ratio"].item() == pytest.approx(randomness_ratio(batch_index // 2, 2, 6))
    ratios = [round(b["randomness_ratio"].item(), 4) for b in with_workers]
    assert ratios[:6] == [1.0] * 6 and ratios[6:8] == [0.75] * 2 and ratios[12:] == [0.0] * 12


def test_resume_reproduces_the_uninterrupted_run():
    features = make_features(40)  # 10 batches of 4
    kwargs = dict(anneal_start=1, anneal_end=4, gradient_accumulation_steps=2, class_dropout_prob=0.2)
    fresh = run_loader(features, make_collator(**kwargs), num_workers=0)
    k = 3  # batches consumed before the interruption; a skipping sampler starts at sample 4k
    resumed = run_loader(features[4 * k :], make_collator(**kwargs), num_workers=2, start_batch=k)
    assert len(resumed) == len(fresh) - k
    for a, b in zip(resumed, fresh[k:]):
        assert_batches_equal(a, b)


# ---- validation ----


@pytest.mark.parametrize(
    "feature, error, message",
    [
        ({"tokens": list(range(L - 1)), "label": 0}, ValueError, r"sample 1: expected 16 tokens"),
        ({"tokens": [0] * 5 + [V] + [0] * 10, "label": 0}, ValueError, r"sample 1: token 16 at raster position 5"),
        ({"tokens": [0] * 3 + [-2] + [0] * 12, "label": 0}, ValueError, r"token -2 at raster position 3"),
        ({"tokens": [0] * L, "label": C}, ValueError, r"sample 1: label 10 is outside \[0, 10\)"),
        ({"tokens": [0] * L, "label": -1}, ValueError, r"label -1 is outside"),
        ({"tokens": [0] * L, "label": 1.5}, TypeError, r"label must be an int, got 1.5"),
        ({"tokens": [0.5] * L, "label": 0}, TypeError, r"tokens must be integers"),
        ({"tokens": [0] * L}, KeyError, r"needs keys 'tokens' and 'label'"),
    ],
)
def test_invalid_features_name_the_problem(feature, error, message):
    features = [{"tokens": [1] * L, "label": 1}, feature]
    with pytest.raises(error, match=message):
        make_collator()(features)


def test_accepts_tensor_and_numpy_features():
    np = pytest.importorskip("numpy")
    features = make_features(3)
    as_tensors = [{"tokens": torch.tensor(f["tokens"]), "label": torch.tensor(f["label"])} for f in features]
    as_numpy = [{"tokens": np.array(f["tokens"], dtype=np.int16), "label": np.int64(f["label"])} for f in features]
    reference = make_collator().collate(features, 5)
    assert_batches_equal(make_collator().collate(as_tensors, 5), reference)
    assert_batches_equal(make_collator().collate(as_numpy, 5), reference)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(anneal_start=5, anneal_end=2), "anneal_end >= anneal_start"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(class_dropout_prob=1.5), "class_dropout_prob"),
        (dict(scan_order="diagonal"), "valid names"),
        (dict(start_batch=-1), "start_batch"),
    ],
)
def test_invalid_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_collator(**kwargs)


class _WorkerShardedStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker yields its own equal share of the samples."""

    def __init__(self, features):
        self.features = features

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(self.features[worker_id::num_workers])


def test_iterable_dataset_with_workers_matches_the_optimizer_step():
    collator = make_collator(anneal_start=1, anneal_end=5, gradient_accumulation_steps=2)
    batches = run_loader(_WorkerShardedStream(make_features(64)), collator, num_workers=2, epochs=2)
    assert len(batches) == 32
    for batch_index, batch in enumerate(batches):
        assert batch["step"].item() == batch_index // 2
        assert batch["randomness_ratio"].item() == pytest.approx(randomness_ratio(batch_index // 2, 1, 5))
