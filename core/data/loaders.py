"""DataLoaders over the prepared arrays, with a resumable, seeded shuffle.

Datasets implement `__getitems__`, so a DataLoader fetches each batch with one tensor index
instead of collating `batch_size` single samples. Over sharded splits (`core/data/shards.py`) they read just
the batch's rows from the mapped shards: a DDP rank reads only its share of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainflow.core.config import LoaderConfig
from trainflow.core.data.prepared import ArraySplits, Rows
from trainflow.core.data.shards import LazyRows

Batch = tuple[torch.Tensor, torch.Tensor]


class ArrayDataset(Dataset[Batch]):
    """(features, label) pairs: two tensors in memory, or two lazy arrays read a batch at a time."""

    def __init__(self, x: Rows, y: Rows):
        self.lazy = isinstance(x, LazyRows) or isinstance(y, LazyRows)
        if self.lazy:
            self.x, self.y = x, y
        else:
            self.x, self.y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        if self.lazy:
            return torch.from_numpy(self.x[i]), torch.as_tensor(self.y[i])
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> Batch:
        if self.lazy:
            index = np.asarray(indices, dtype=np.int64)
            return torch.from_numpy(self.x[index]), torch.from_numpy(self.y[index])
        index = torch.as_tensor(indices)
        return self.x[index], self.y[index]


class TokenWindows(Dataset[Batch]):
    """Non-overlapping windows of `seq_len` bytes; the target is the window shifted by one."""

    def __init__(self, tokens: Rows, seq_len: int):
        self.lazy = isinstance(tokens, LazyRows)
        self.tokens: Rows | torch.Tensor = tokens if self.lazy else torch.from_numpy(np.asarray(tokens, np.int64))
        self.seq_len = seq_len
        self.offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> Batch:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> Batch:
        starts = torch.as_tensor(indices).unsqueeze(1) * self.seq_len
        if self.lazy:  # one read of (B, T + 1) bytes: the inputs and, shifted by one, the targets
            tokens = torch.from_numpy(self.tokens[(starts + self.offsets).numpy()].astype(np.int64))
            return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        window = starts + self.offsets[:-1]  # (B, T)
        return self.tokens[window], self.tokens[window + 1]  # type: ignore[index]


class EpochSampler(Sampler[int]):
    """A shuffle fixed by (seed, epoch) that can start part-way, so a resumed run sees the same order.

    With `world_size` > 1 it yields this rank's share: the epoch's order (cut to a multiple of the world
    size, as DistributedSampler's drop_last) is read in global micro-batches of `batch_size * world_size`
    samples, and rank r takes the r-th equal slice of each. The ranks' micro-batches together are then
    exactly one process's batch of `batch_size * world_size`, so DDP's averaged gradient is that batch's.
    Its generator is its own: shuffling never touches the global RNG that dropout uses.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, batch_size: int = 1, rank: int = 0, world_size: int = 1
    ):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples, counted over all ranks (the resumed
        data position: micro-batches consumed x batch_size x world_size)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        if self.world_size == 1:
            return iter(order[self.start :].tolist())
        world, block = self.world_size, self.batch_size * self.world_size
        order = order[: self.n - self.n % world]
        mine = []
        for begin in range(self.start, len(order), block):
            chunk = order[begin : begin + block]
            share = len(chunk) // world
            mine.append(chunk[self.rank * share : (self.rank + 1) * share])
        return iter(torch.cat(mine).tolist() if mine else [])

    def __len__(self) -> int:
        return (self.n - self.n % self.world_size - self.start) // self.world_size


class ShardSampler(Sampler[int]):
    """Rank r's contiguous slice of an evaluation split (in order, nothing dropped): each sample is
    evaluated exactly once over all ranks, and the sums are reduced across them."""

    def __init__(self, n: int, rank: int, world_size: int):
        per_rank = -(-n // world_size)
        self.indices = range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Loaders:
    train: DataLoader[Batch]
    val: DataLoader[Batch]
    test: DataLoader[Batch]
    sampler: EpochSampler  # the train loader's, for set_epoch


def build_loaders(
    splits: ArraySplits,
    seq_len: int | None,
    batch_size: int,
    cfg: LoaderConfig,
    seed: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Train (shuffled by `EpochSampler`), val and test loaders; eval loaders keep the data order. With
    `world_size` > 1, train and val hold rank `rank`'s share (the test split stays whole: one process
    evaluates it)."""

    def dataset(split: str) -> Dataset[Batch]:
        if seq_len is not None:
            return TokenWindows(splits.x[split], seq_len)
        return ArrayDataset(splits.x[split], splits.y[split])

    train = dataset("train")
    sampler = EpochSampler(len(train), seed, batch_size=batch_size, rank=rank, world_size=world_size)  # type: ignore[arg-type]
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

    val = dataset("val")
    val_shard = ShardSampler(len(val), rank, world_size) if world_size > 1 else None  # type: ignore[arg-type]
    return Loaders(loader(train, sampler), loader(val, val_shard), loader(dataset("test"), None), sampler)


def rebatched(loader: DataLoader[Batch], batch_size: int) -> DataLoader[Batch]:
    """The same loader (dataset, sampler, workers, pinning) at another batch size: a DataLoader's own
    batch size cannot change once built."""
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        sampler.batch_size = batch_size
    workers = (
        {"persistent_workers": loader.persistent_workers, "prefetch_factor": loader.prefetch_factor}
        if loader.num_workers
        else {}
    )
    return DataLoader(
        loader.dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, collate_fn=_as_batch, generator=loader.generator, **workers,
    )  # fmt: skip


def _as_batch(batch: Batch) -> Batch:
    return batch  # __getitems__ already returns the batch's tensors
