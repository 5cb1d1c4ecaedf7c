"""The M-per-class batch sampler: batch structure, determinism per (seed, epoch), refusals."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from das_core.data import DatasetError, MPerClassBatchSampler


def labels_of(sizes: list[int]) -> np.ndarray:
    """Class ``c`` repeated ``sizes[c]`` times, shuffled so that classes are interleaved."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(0).permutation(labels)


def check_batch(batch: list[int], labels: np.ndarray, n_classes: int, m: int) -> None:
    assert len(batch) == n_classes * m
    assert all(0 <= i < len(labels) for i in batch)
    counts = Counter(int(labels[i]) for i in batch)
    assert len(counts) == n_classes and set(counts.values()) == {m}


def test_every_batch_is_classes_times_m() -> None:
    labels = labels_of([10] * 12)
    sampler = MPerClassBatchSampler(labels, batch_size=24, samples_per_class=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 120 // 24
    for batch in batches:
        check_batch(batch, labels, 6, 4)
        for c in {int(labels[i]) for i in batch}:  # big classes: no image twice in a batch
            members = [i for i in batch if labels[i] == c]
            assert len(set(members)) == 4


def test_num_batches_option() -> None:
    sampler = MPerClassBatchSampler(labels_of([5] * 4), 4, 2, num_batches=7)
    assert len(sampler) == 7 and len(list(sampler)) == 7


def test_same_seed_and_epoch_give_same_batches() -> None:
    labels = labels_of([8] * 10)

    def run(seed: int, epoch: int) -> list[list[int]]:
        s = MPerClassBatchSampler(labels, 20, 4, seed=seed, num_batches=6)
        s.set_epoch(epoch)
        return list(s)

    assert run(0, 3) == run(0, 3)
    assert run(0, 3) != run(0, 4)
    assert run(0, 3) != run(1, 3)
    s = MPerClassBatchSampler(labels, 20, 4, seed=0, num_batches=6)
    s.set_epoch(3)
    first = list(s)
    assert list(s) == first  # iterating again in the same epoch repeats it (exact --resume)


def test_small_classes_are_sampled_with_replacement() -> None:
    labels = labels_of([1, 2, 9, 9])
    sampler = MPerClassBatchSampler(labels, 16, 4, num_batches=30)
    seen_small = 0
    for batch in sampler:
        check_batch(batch, labels, 4, 4)
        singles = [i for i in batch if labels[i] == 0]
        assert len(singles) == 4 and len(set(singles)) == 1  # the one image, four times
        pair = {i for i in batch if labels[i] == 1}
        assert pair <= set(np.flatnonzero(labels == 1).tolist())
        seen_small += 1
    assert seen_small == 30


def test_refusals_say_what_to_change() -> None:
    labels = labels_of([6] * 5)
    with pytest.raises(DatasetError, match=r"batch_size=30 is not a multiple of samples_per_class=4.*try 28"):
        MPerClassBatchSampler(labels, 30, 4)
    with pytest.raises(DatasetError, match=r"batch_size=3 is not a multiple.*try 8"):
        MPerClassBatchSampler(labels, 3, 4)
    with pytest.raises(DatasetError, match=r"one class per batch.*use batch_size >= 8"):
        MPerClassBatchSampler(labels, 4, 4)
    with pytest.raises(DatasetError, match="samples_per_class must be >= 1"):
        MPerClassBatchSampler(labels, 4, 0)
    with pytest.raises(DatasetError) as info:
        MPerClassBatchSampler(labels, 32, 4)
    msg = str(info.value)
    assert "needs 8 classes, but the training split has only 5" in msg
    assert "raise --samples-per-class to 8" in msg and "lower --batch-size to at most 20" in msg
    MPerClassBatchSampler(labels, 32, 8)  # both suggestions work
    MPerClassBatchSampler(labels, 20, 4)
    with pytest.raises(DatasetError, match="at least 2 classes"):
        MPerClassBatchSampler(labels_of([9]), 8, 4)


def test_works_as_a_dataloader_batch_sampler() -> None:
    labels = labels_of([4] * 6)
    data = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=MPerClassBatchSampler(labels, 6, 2, num_batches=3)
    )
    got = list(loader)
    assert len(got) == 3
    for idx, y in got:
        assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))
        assert sorted(Counter(y.tolist()).values()) == [2, 2, 2]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=9),
    m=st.integers(1, 4),
    k=st.integers(2, 9),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
)
def test_batch_structure_property(sizes: list[int], m: int, k: int, seed: int, epoch: int) -> None:
    labels = labels_of(sizes)
    if k > len(sizes):
        with pytest.raises(DatasetError, match="needs"):
            MPerClassBatchSampler(labels, k * m, m, seed=seed)
        return
    sampler = MPerClassBatchSampler(labels, k * m, m, seed=seed, num_batches=3)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert batches == list(sampler)
    for batch in batches:
        check_batch(batch, labels, k, m)
