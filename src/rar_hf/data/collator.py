"""Batch collation for RAR training: scan-order permutation, randomness annealing, class dropout."""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import get_worker_info

from .scan_orders import get_scan_order
from .schedule import randomness_ratio


def _batch_generator(seed: int, rank: int, batch_index: int) -> torch.Generator:
    """A generator whose state is a pure function of (seed, rank, batch_index).

    Hashing (rather than e.g. ``seed + rank + batch_index``) keeps nearby triples, such as
    (seed, rank 1, batch 0) and (seed, rank 0, batch 1), from sharing a stream.
    """
    digest = hashlib.blake2b(f"rar-collator/{seed}/{rank}/{batch_index}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


@dataclass(kw_only=True)
class RARDataCollator:
    """Collates pre-tokenised samples into RAR training batches.

    Each feature is a mapping with ``tokens`` (``latent_size[0] * latent_size[1]`` ints in raster order,
    each in ``[0, codebook_size)``) and ``label`` (class id in ``[0, num_classes)``). The batch holds:

    - ``input_ids`` (B, 1+L) int64: the class token ``codebook_size + 1 + label`` (or, with probability
      ``class_dropout_prob``, the null token ``codebook_size + 1 + num_classes``) followed by the image
      tokens in generation order, ``input_ids[:, 1 + j] == tokens[:, orders[:, j]]``;
    - ``orders`` (B, L) int64: per sample, with probability r a uniformly random permutation of the
      raster positions, else the final ``scan_order``;
    - ``labels`` (B, 1+L) int64: ``input_ids`` with ``labels[:, 0] = -100`` (causal-LM convention, shifted
      inside the model; the class token is never predicted);
    - ``randomness_ratio`` (0-dim float32): the r used, and ``step`` (0-dim int64): the optimizer step
      that consumes this batch. Pop both before calling the model.

    r is ``randomness_ratio(step, anneal_start, anneal_end)`` for the optimizer step that consumes the
    batch, ``step = batch_index // gradient_accumulation_steps``, where ``batch_index`` is the global
    index of the batch in this process's stream. The collator counts the batches it has collated and sets
    ``batch_index = start_batch + local_count * num_workers + worker_id``, which is exact because a
    DataLoader hands batches out to its workers round-robin (map-style and iterable datasets; in the main
    process ``num_workers = 1, worker_id = 0``). All randomness of a batch comes from a fresh generator
    seeded by (seed, rank, batch_index): permutations differ across ranks, are reproducible, and a resumed
    run replays exactly the batches of the uninterrupted run without saving any RNG state.

    Training loop contract:

    - Call ``set_start_batch(n)`` before creating each DataLoader iterator (every epoch and on resume),
      with ``n`` the global index of the first batch this iterator will *collate*: workers receive a fresh
      copy of the collator when the iterator is created, so the count restarts there. On resume with a
      sampler that skips the consumed batches (no collation of them), ``n`` = batches already consumed; if
      instead the loop skips by iterating through the loader, ``n`` = index of the epoch's first batch.
    - Do not use ``persistent_workers=True`` (workers would keep stale counters across epochs) nor
      ``in_order=False`` (batches would no longer arrive round-robin).
    - With accelerate, keep each process collating its own batches: pass ``dispatch_batches=False``
      (the default only for map-style datasets); with dispatching, rank 0 collates ``num_processes``
      batches per step. ``accelerator.skip_first_batches`` on a map-style loader skips in the sampler.
    - An iterable dataset whose worker shards hold unequal numbers of batches breaks round-robin once
      the first worker runs out: the last batches of the epoch then get indices up to
      ``num_workers - 1`` ahead of their position (r up to one step early, and a few seeds repeated at
      the next epoch's start). Give each worker an equal share to stay exact.
    """

    codebook_size: int = 1024
    num_classes: int = 1000
    latent_size: tuple[int, int] = (16, 16)
    anneal_start: int = 125_000
    anneal_end: int = 187_500
    gradient_accumulation_steps: int = 1
    class_dropout_prob: float = 0.1
    scan_order: str = "raster"
    seed: int = 0
    rank: int = 0
    start_batch: int = 0
    _local_count: int = field(default=0, init=False, repr=False, compare=False)
    _scan: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        randomness_ratio(0, self.anneal_start, self.anneal_end)  # validates the schedule now, not mid-run
        if self.codebook_size < 1 or self.num_classes < 1:
            raise ValueError(
                f"codebook_size and num_classes must be positive, got {self.codebook_size}, {self.num_classes}"
            )
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")
        if self.start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {self.start_batch}")
        self.latent_size = tuple(self.latent_size)  # configs deserialised from JSON give lists
        height, width = self.latent_size
        self._scan = get_scan_order(self.scan_order, height, width)

    @property
    def image_seq_len(self) -> int:
        """Number of image tokens L per sample."""
        return self._scan.numel()

    @property
    def null_class_id(self) -> int:
        """Token id of the null (unconditional) class."""
        return self.codebook_size + 1 + self.num_classes

    def set_start_batch(self, start_batch: int) -> None:
        """Make the next collated batch (of a new DataLoader iterator) global batch ``start_batch``."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.start_batch = start_batch
        self._local_count = 0

    def step_for_batch(self, batch_index: int) -> int:
        """Optimizer step that consumes global batch ``batch_index``."""
        return batch_index // self.gradient_accumulation_steps

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        batch = self.collate(features, self.start_batch + self._local_count * num_workers + worker_id)
        self._local_count += 1
        return batch

    def collate(self, features: Sequence[Mapping[str, Any]], batch_index: int) -> dict[str, torch.Tensor]:
        """Collate ``features`` as global batch ``batch_index``; a pure function of its arguments and fields."""
        tokens, class_labels = self._validate(features)
        batch_size, seq_len = tokens.shape
        step = self.step_for_batch(batch_index)
        ratio = randomness_ratio(step, self.anneal_start, self.anneal_end)

        generator = _batch_generator(self.seed, self.rank, batch_index)
        use_random = torch.rand(batch_size, generator=generator) < ratio
        drop_class = torch.rand(batch_size, generator=generator) < self.class_dropout_prob
        orders = self._scan.expand(batch_size, seq_len).clone()
        num_random = int(use_random.sum())
        if num_random:
            # argsort of i.i.d. float64 keys is a uniform permutation (ties have probability ~L^2 / 2^53).
            keys = torch.rand(num_random, seq_len, generator=generator, dtype=torch.float64)
            orders[use_random] = keys.argsort(dim=1)

        class_ids = torch.where(drop_class, self.null_class_id, class_labels + self.codebook_size + 1)
        input_ids = torch.cat([class_ids[:, None], tokens.gather(1, orders)], dim=1)
        labels = input_ids.clone()
        labels[:, 0] = -100
        return {
            "input_ids": input_ids,
            "orders": orders,
            "labels": labels,
            "randomness_ratio": torch.tensor(ratio, dtype=torch.float32),
            "step": torch.tensor(step, dtype=torch.int64),
        }

    def _validate(self, features: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("cannot collate an empty batch")
        seq_len = self.image_seq_len
        token_rows, class_labels = [], []
        for i, feature in enumerate(features):
            if "tokens" not in feature or "label" not in feature:
                raise KeyError(f"sample {i} needs keys 'tokens' and 'label', has {sorted(feature)}")
            tokens = torch.as_tensor(feature["tokens"])
            if tokens.dim() != 1 or tokens.numel() != seq_len:
                raise ValueError(
                    f"sample {i}: expected {seq_len} tokens (latent_size {self.latent_size}), "
                    f"got shape {tuple(tokens.shape)}"
                )
            if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
                raise TypeError(f"sample {i}: tokens must be integers, got dtype {tokens.dtype}")
            try:
                label = operator.index(feature["label"])
            except TypeError:
                raise TypeError(f"sample {i}: label must be an int, got {feature['label']!r}") from None
            if not 0 <= label < self.num_classes:
                raise ValueError(f"sample {i}: label {label} is outside [0, {self.num_classes})")
            token_rows.append(tokens.to(torch.int64))
            class_labels.append(label)
        tokens = torch.stack(token_rows)
        outside = (tokens < 0) | (tokens >= self.codebook_size)
        if outside.any():
            sample, position = (int(i) for i in outside.nonzero()[0])
            raise ValueError(
                f"sample {sample}: token {int(tokens[sample, position])} at raster position {position} is "
                f"outside [0, {self.codebook_size})"
            )
        return tokens, torch.tensor(class_labels, dtype=torch.int64)
