"""DataLoaders over prepared arrays: batch shapes, the resumable seeded shuffle, byte windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.core.test_prepare_data import prepare
from trainflow.core.config import LoaderConfig
from trainflow.core.data.loaders import EpochSampler, TokenWindows, build_loaders
from trainflow.core.data.prepared import ArraySplits
from trainflow.core.storage.store import LocalStore


@pytest.fixture
def wine(store: LocalStore) -> ArraySplits:
    return prepare(store, source="sklearn", name="wine")[1]


def test_table_loaders_yield_batches_of_the_split(wine: ArraySplits) -> None:
    loaders = build_loaders(wine, None, batch_size=16, cfg=LoaderConfig(), seed=0, pin_memory=False)
    for split, loader in (("train", loaders.train), ("val", loaders.val), ("test", loaders.test)):
        batches = list(loader)
        assert [len(y) for _, y in batches[:-1]] == [16] * (len(batches) - 1)
        assert sum(len(y) for _, y in batches) == len(wine.y[split])
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape == (len(y), 13)
            assert y.dtype == torch.int64 and y.ndim == 1
    x, y = next(iter(loaders.val))
    torch.testing.assert_close(x, torch.from_numpy(wine.x["val"][:16]))  # eval loaders keep the data order
    torch.testing.assert_close(y, torch.from_numpy(wine.y["val"][:16]))


def test_image_loader_batches_keep_channel_height_width(store: LocalStore) -> None:
    _, digits = prepare(store, source="sklearn", name="digits")
    x, y = next(iter(build_loaders(digits, None, 32, LoaderConfig(), 0, False).train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64


def test_train_loader_follows_the_sampler_and_resumes_exactly(wine: ArraySplits) -> None:
    loaders = build_loaders(wine, None, batch_size=16, cfg=LoaderConfig(), seed=3, pin_memory=False)
    loaders.sampler.set_epoch(2)
    order = list(loaders.sampler)
    full = torch.cat([x for x, _ in loaders.train])
    torch.testing.assert_close(full, torch.from_numpy(wine.x["train"][order]))
    loaders.sampler.set_epoch(2, start=40)
    resumed = torch.cat([x for x, _ in loaders.train])
    torch.testing.assert_close(resumed, full[40:])
    assert len(loaders.train) == -(-(len(order) - 40) // 16)


@pytest.mark.parametrize(("n", "seed", "epoch", "start"), [(100, 0, 0, 37), (57, 11, 3, 1), (10, 2, 5, 9)])
def test_epoch_sampler_order_is_fixed_by_seed_and_epoch(n: int, seed: int, epoch: int, start: int) -> None:
    sampler = EpochSampler(n, seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert sorted(order) == list(range(n))
    assert order != list(range(n))

    same = EpochSampler(n, seed)
    same.set_epoch(epoch)
    assert list(same) == order
    same.set_epoch(epoch + 1)
    assert list(same) != order
    other_seed = EpochSampler(n, seed + 1)
    other_seed.set_epoch(epoch)
    assert list(other_seed) != order

    same.set_epoch(epoch, start=start)
    assert list(same) == order[start:]
    assert len(same) == n - start


def test_unshuffled_epoch_sampler_keeps_the_order() -> None:
    sampler = EpochSampler(7, seed=1, shuffle=False)
    sampler.set_epoch(4, start=2)
    assert list(sampler) == [2, 3, 4, 5, 6]


def test_loaders_do_not_consume_the_global_rng(wine: ArraySplits) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    loaders = build_loaders(wine, None, batch_size=16, cfg=LoaderConfig(), seed=0, pin_memory=False)
    for epoch in range(2):
        loaders.sampler.set_epoch(epoch)
        for loader in (loaders.train, loaders.val, loaders.test):
            for _ in loader:
                pass
    assert torch.equal(torch.get_rng_state(), state)


def test_token_windows_target_is_the_input_shifted_by_one(store: LocalStore) -> None:
    tokens = np.arange(101, dtype=np.uint8)
    windows = TokenWindows(tokens, seq_len=8)
    assert len(windows) == (101 - 1) // 8
    for i in (0, 5, len(windows) - 1):
        x, y = windows[i]
        torch.testing.assert_close(x, torch.arange(i * 8, i * 8 + 8))
        torch.testing.assert_close(y, x + 1)
    x, y = windows.__getitems__([2, 0])
    assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])

    result, text = prepare(store, source="text", seq_len=16)
    loaders = build_loaders(text, 16, batch_size=4, cfg=LoaderConfig(), seed=0, pin_memory=False)
    assert len(loaders.train.dataset) == result.n_train  # type: ignore[arg-type]
    x, y = next(iter(loaders.val))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    torch.testing.assert_close(x[0], torch.from_numpy(text.x["val"][:16].astype(np.int64)))
    torch.testing.assert_close(y[0, -1], torch.tensor(int(text.x["val"][16])))
