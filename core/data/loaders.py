"""DataLoaders over the prepared arrays, with a resumable, seeded shuffle.

Datasets implement `__getitems__`, so a DataLoader fetches each batch with one tensor index
instead of collating `batch_size` single samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.config import LoaderConfig
from core.data.prepared import ArraySplits

Batch = tuple[torch.Tensor, torch.Tensor]


class ArrayDataset(Dataset[Batch]):
    """(features, label) pairs held as two tensors."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> Batch:
        index = torch.as_tensor(indices)
        return self.x[index], self.y[index]


class TokenWindows(Dataset[Batch]):
    """Non-overlapping windows of `seq_len` bytes; the target is the window shifted by one."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.offsets = torch.arange(seq_len)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> Batch:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> Batch:
        starts = torch.as_tensor(indices).unsqueeze(1) * self.seq_len
        window = starts + self.offsets  # (B, T)
        return self.tokens[window], self.tokens[window + 1]


class EpochSampler(Sampler[int]):
    """A shuffle fixed by (seed, epoch) that can start part-way, so a resumed run sees the same order.

    Its generator is its own: shuffling never touches the global RNG that dropout uses.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples (the resumed data position)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        return iter(order[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start


@dataclass
class Loaders:
    train: DataLoader[Batch]
    val: DataLoader[Batch]
    test: DataLoader[Batch]
    sampler: EpochSampler  # the train loader's, for set_epoch


def build_loaders(
    splits: ArraySplits, seq_len: int | None, batch_size: int, cfg: LoaderConfig, seed: int, pin_memory: bool
) -> Loaders:
    """Train (shuffled by `EpochSampler`), val and test loaders; eval loaders keep the data order."""

    def dataset(split: str) -> Dataset[Batch]:
        if seq_len is not None:
            return TokenWindows(splits.x[split], seq_len)
        return ArrayDataset(splits.x[split], splits.y[split])

    train = dataset("train")
    sampler = EpochSampler(len(train), seed)  # type: ignore[arg-type]
    workers = (
        {"persistent_workers": cfg.persistent_workers, "prefetch_factor": cfg.prefetch_factor}
        if cfg.num_workers
        else {}
    )

    def loader(ds: Dataset[Batch], sampler: Sampler[int] | None) -> DataLoader[Batch]:
        return DataLoader(
            ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=cfg.num_workers,
            pin_memory=pin_memory, collate_fn=_as_batch, generator=torch.Generator().manual_seed(seed), **workers,
        )  # fmt: skip

    return Loaders(loader(train, sampler), loader(dataset("val"), None), loader(dataset("test"), None), sampler)


def _as_batch(batch: Batch) -> Batch:
    return batch  # __getitems__ already returns the batch's tensors
