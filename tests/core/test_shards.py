"""Data larger than memory: prepared splits as memory-mapped shards (`data.in_memory_max_mb`), read lazily by every
stage. Forced to shards (threshold 0) on small data, each stage must see exactly the arrays it sees in memory:
the same batches in the same seeded order, so the same weights, after a kill and resume too, and on two ranks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import tiny_raw
from tests.core.folder_support import write_digits
from tests.s3_server import s3_endpoint  # noqa: F401
from trainflow.core.config import LoaderConfig, config_from_dict
from trainflow.core.data.loaders import build_loaders
from trainflow.core.data.prepared import ArraySplits, load_splits
from trainflow.core.data.shards import LazyRows, Normalized, ShardedArray, ShardWriter, write_rows
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.spec import TrainingSpec

REPO = Path(__file__).resolve().parents[2]
DIGITS = {"source": "sklearn", "name": "digits"}
SHARDS = {"in_memory_max_mb": 0, "shard_mb": 0.02}  # every split in shards of ~20 KB: many shards, many boundaries


def _sharded(tmp_path: Path, array: np.ndarray, shard_bytes: int) -> ShardedArray:
    entry = write_rows(ShardWriter(tmp_path, "a", array.shape[1:], array.dtype, shard_bytes), array)
    return ShardedArray(entry, lambda file: str(tmp_path / file), Path)


def test_a_sharded_array_reads_like_the_array_it_was_written_from(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(103, 3, 4)).astype(np.float32)
    lazy = _sharded(tmp_path, array, shard_bytes=10 * 48)  # 10 rows a shard: 11 shards, the last of 3 rows
    assert len(lazy.uris) == 11 and lazy.shape == array.shape and lazy.dtype == array.dtype
    np.testing.assert_array_equal(lazy[7], array[7])
    np.testing.assert_array_equal(lazy[-1], array[-1])
    np.testing.assert_array_equal(lazy[5:37], array[5:37])  # across four shards
    np.testing.assert_array_equal(lazy[::7], array[::7])
    index = np.random.default_rng(1).integers(0, 103, size=(8, 5))  # a 2-D gather, as byte windows are read
    np.testing.assert_array_equal(lazy[index], array[index])
    np.testing.assert_array_equal(np.asarray(lazy), array)
    with pytest.raises(IndexError):
        lazy[np.array([103])]
    again = pickle.loads(pickle.dumps(lazy))  # a DataLoader worker or a spawned rank maps the shards itself
    assert again._mapped == {} and np.array_equal(again[[0, 50, 102]], array[[0, 50, 102]])
    assert isinstance(lazy[:0], np.ndarray) and lazy[:0].shape == (0, 3, 4)


def test_a_shard_is_mapped_only_when_a_row_of_it_is_read(tmp_path: Path) -> None:
    lazy = _sharded(tmp_path, np.arange(100, dtype=np.int64).reshape(100, 1), shard_bytes=80)
    assert lazy[[3, 95]].ravel().tolist() == [3, 95]
    assert sorted(lazy._mapped) == [0, 9], "two of the ten shards touched"


def _prepared(store: LocalStore, **data: Any) -> tuple[PrepareDataResult, ArraySplits]:
    cfg = config_from_dict(tiny_raw() | {"data": data})
    result = prepare_data(cfg.data, cfg.seed, store)
    return result, load_splits(store, result)


@pytest.mark.parametrize("data", [DIGITS, {"source": "text", "seq_len": 32}], ids=["table", "text"])
def test_shards_hold_exactly_the_arrays_of_the_in_memory_layout(store: LocalStore, data: dict[str, Any]) -> None:
    memory, in_memory = _prepared(store, **data)
    sharded, in_shards = _prepared(store, **data, **SHARDS)
    assert (memory.layout, sharded.layout) == ("memory", "shards") and sharded.uri.endswith("/splits.json")
    assert memory.fingerprint == sharded.fingerprint, "how the arrays are held is not what they are"
    assert memory.nbytes == sharded.nbytes > 0
    for group in ("x", "y"):
        for split, array in getattr(in_memory, group).items():
            lazy = getattr(in_shards, group)[split]
            assert isinstance(lazy, ShardedArray) and (group == "y" or len(lazy.uris) > 1)
            np.testing.assert_array_equal(np.asarray(lazy), array)
    again, _ = _prepared(store, **data, **SHARDS)
    assert again == sharded, "an unchanged config re-uses the shards"
    back, _ = _prepared(store, **data)
    assert back.layout == "memory", "a raised threshold writes the arrays whole again"


def test_an_image_folder_in_shards_reads_the_normalised_inputs_of_the_in_memory_layout(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "pictures", per_class=20, size=16, rgb=True)
    data = {"source": "image_folder", "path": str(root), "image_size": 12}
    store = LocalStore(tmp_path / "store")
    sharded, in_shards = _prepared(store, **data, **SHARDS)  # first: it decodes, into shards of data.shard_mb
    memory, in_memory = _prepared(store, **data)
    assert sharded.layout == "shards" and sharded.spec == memory.spec
    decoded = sorted((tmp_path / "store" / "images").glob("*/pixels.*.npy"))
    assert len(decoded) > 1 and np.load(decoded[0]).dtype == np.uint8, "decoded straight into shards"
    for split, x in in_memory.x.items():
        lazy = in_shards.x[split]
        assert isinstance(lazy, Normalized) and lazy.pixels.dtype == np.uint8, "stored as uint8, 4x smaller"
        np.testing.assert_array_equal(np.asarray(lazy), x)  # the same float32 bits, normalised per read
        np.testing.assert_array_equal(np.asarray(in_shards.y[split]), in_memory.y[split])


def _digits_config(**train_cfg: Any) -> Any:
    settings = {"max_epochs": 3, "batch_size": 32, "early_stopping": {"enabled": False}} | train_cfg
    return config_from_dict(tiny_raw(data=DIGITS, train=settings) | {"model": {"name": "cnn", "channels": [4, 8]}})


def _weights(store: LocalStore, uri: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(store.local_path(uri))["model"]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_training_on_shards_ends_with_the_weights_of_training_in_memory(store: LocalStore) -> None:
    """The sampler is unchanged, so the epoch's order is; two loader workers read the shards themselves."""
    cfg = _digits_config()
    memory = train(TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store)), store, "memory")
    sharded_cfg = config_from_dict(cfg.model_dump(mode="json") | {
        "data": cfg.data.model_dump(mode="json") | SHARDS | {"loader": {"num_workers": 2}}})  # fmt: skip
    data = prepare_data(sharded_cfg.data, cfg.seed, store)
    assert data.layout == "shards"
    sharded = train(TrainingSpec.of(sharded_cfg, data), store, "sharded")
    assert sharded.steps == memory.steps > 0
    _assert_equal(_weights(store, memory.checkpoint_uri), _weights(store, sharded.checkpoint_uri))
    assert sharded.best_metrics == memory.best_metrics


def test_a_sigkilled_training_on_shards_resumes_to_the_uninterrupted_weights(store: LocalStore) -> None:
    raw = tiny_raw(data=DIGITS | SHARDS, train={"max_epochs": 2, "batch_size": 64, "checkpoint": {"every_steps": 3},
                                                "early_stopping": {"enabled": False}})  # fmt: skip
    cfg = config_from_dict(raw)
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    assert spec.data.layout == "shards"
    full = train(spec, store, "full")
    kill = 3 * (full.steps // 6) + 2  # two steps after a checkpoint
    run = subprocess.run([sys.executable, "-m", "tests.core.finetune_support", json.dumps(raw), str(store.root),
                          "killed", str(kill)], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == -9, run.stderr[-2000:]
    resumed = train(spec, store, "killed")
    assert resumed.resumed_from_step is not None and 0 < resumed.resumed_from_step < kill
    _assert_equal(_weights(store, full.checkpoint_uri), _weights(store, resumed.checkpoint_uri))


class CountingRows(LazyRows):
    """A lazy array that records every row it is asked for."""

    def __init__(self, base: np.ndarray):
        self.base, self.shape, self.dtype, self.read = base, base.shape, base.dtype, []

    def _take(self, index: np.ndarray) -> np.ndarray:
        self.read.extend(index.tolist())
        return self.base[index]


def test_each_rank_reads_only_its_share_of_every_global_batch(store: LocalStore) -> None:
    _, digits = _prepared(store, **DIGITS)
    whole = build_loaders(digits, None, 32, LoaderConfig(), seed=4, pin_memory=False)
    whole.sampler.set_epoch(1)
    order = list(whole.sampler)
    shares = []
    for rank in (0, 1):
        counted = CountingRows(np.asarray(digits.x["train"]))
        lazy = ArraySplits(dict(digits.x) | {"train": counted}, digits.y, digits.class_names, digits.n_features)
        loaders = build_loaders(lazy, None, 16, LoaderConfig(), seed=4, pin_memory=False, rank=rank, world_size=2)
        loaders.sampler.set_epoch(1)
        batches = [x for x, _ in loaders.train]
        shares.append(counted.read)
        assert sorted(counted.read) == sorted(loaders.sampler), "read only the rows of its own share"
        assert len(counted.read) == len(order) // 2 and len(batches) == -(-(len(order) // 2) // 16)
    cut = order[: len(order) - len(order) % 2]
    for step, begin in enumerate(range(0, len(cut), 32)):  # rank 0's micro-batch, then rank 1's: the global batch
        block = cut[begin : begin + 32]
        share = len(block) // 2
        assert shares[0][16 * step : 16 * step + share] + shares[1][16 * step : 16 * step + share] == block


def test_compress_calibrates_and_measures_on_shards_as_in_memory(store: LocalStore) -> None:
    """The same trained weights compressed from either layout: the static int8 calibration draws the same training
    rows and every variant's test metrics are the same, read a batch at a time."""
    from trainflow.core.compress import compress

    light = {"measure": {"latency_calls": 20, "warmup": 1, "rounds": 1, "serving_batch": 16, "throughput_calls": 1},
             "pruning": {"enabled": False}, "structured_pruning": {"enabled": False},
             "distillation": {"enabled": False},
             "quantization": {"onnx_int8": "static", "torch_int8": False}}  # fmt: skip
    cfg = config_from_dict(tiny_raw(data=DIGITS, compress=light, train={"max_epochs": 2}))
    memory = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    trained = train(memory, store, "train")
    sharded_data = prepare_data(cfg.data.model_copy(update=SHARDS), cfg.seed, store)
    assert sharded_data.layout == "shards"
    results = {
        layout: compress(cfg.compress, spec, trained, store, f"compress-{layout}")
        for layout, spec in (("memory", memory), ("shards", memory.model_copy(update={"data": sharded_data})))
    }
    for name in ("fp32", "fp32+onnx", "fp32+onnx_int8"):
        a, b = (results[layout].variant(name) for layout in ("memory", "shards"))
        assert a.status == b.status == "ok", (a.reason, b.reason)
        assert a.metrics == b.metrics, name


def test_shards_on_an_s3_store_are_fetched_on_first_use_verified_and_reused(s3_endpoint: str, tmp_path: Path) -> None:  # noqa: F811
    from tests.s3_server import new_bucket
    from trainflow.core.config import StoreConfig
    from trainflow.core.storage.store import open_store

    settings = StoreConfig(uri=f"s3://{new_bucket(s3_endpoint, 'shards-first-use')}/runs", endpoint_url=s3_endpoint,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    result, written = _prepared(open_store(settings), **DIGITS, **SHARDS)
    assert result.uri.startswith("s3://") and result.layout == "shards"
    other = tmp_path / "machine-2"  # another machine: an empty cache

    def fetched() -> list[str]:
        return sorted(p.name for p in other.rglob("*.npy"))

    splits = load_splits(open_store(settings.model_copy(update={"cache_dir": str(other)})), result)
    assert fetched() == []
    first = splits.x["test"][:3]
    assert fetched() == ["x_test.00000.npy"], "only the shard read is fetched"
    np.testing.assert_array_equal(np.asarray(splits.x["test"]), np.asarray(written.x["test"]))
    cached = next(other.rglob("x_test.00000.npy"))
    stamp = cached.stat().st_mtime_ns
    again = load_splits(open_store(settings.model_copy(update={"cache_dir": str(other)})), result)
    np.testing.assert_array_equal(again.x["test"][:3], first)
    assert cached.stat().st_mtime_ns == stamp, "a verified cached shard is re-used"
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF  # a damaged cached copy: same size, other bytes
    cached.write_bytes(bytes(data))
    damaged = load_splits(open_store(settings.model_copy(update={"cache_dir": str(other)})), result)
    np.testing.assert_array_equal(np.asarray(damaged.x["test"]), np.asarray(written.x["test"]))  # fetched again


@pytest.mark.slow
def test_two_gloo_ranks_on_shards_end_with_the_weights_of_one_process_in_memory(store: LocalStore) -> None:
    from tests.core.test_distributed import _assert_same, _cfg, _fit, _weights

    one = _fit(_cfg(1, 16), store, "one")
    two_cfg = _cfg(2, 8)
    two_cfg = config_from_dict(two_cfg.model_dump(mode="json") | {
        "data": two_cfg.data.model_dump(mode="json") | SHARDS})  # fmt: skip
    two = _fit(two_cfg, store, "two")
    assert two.world_size == 2 and one.steps == two.steps == 12
    _assert_same(_weights(store, "one"), _weights(store, "two"))


def test_a_large_text_folder_is_streamed_file_by_file_into_the_bytes_of_the_in_memory_layout(tmp_path: Path) -> None:
    from tests.core.folder_support import write_texts
    from trainflow.core.data import text_files

    write_texts(tmp_path / "texts", n=7)
    data = {"source": "text_folder", "path": str(tmp_path / "texts"), "seq_len": 16, "separator": "\n--\n"}
    store = LocalStore(tmp_path / "store")
    _, in_memory = _prepared(store, **data)
    sharded, in_shards = _prepared(store, **data, **SHARDS)
    [raw] = text_files._READ.values()
    assert raw.contents is None, "above data.in_memory_max_mb the files are not kept"
    assert sharded.layout == "shards"
    for split, tokens in in_memory.x.items():
        assert np.asarray(in_shards.x[split]).tobytes() == np.asarray(tokens).tobytes(), split
    joined = text_files.JoinedFiles(raw, raw.files)  # any byte range, across files and separators
    whole = b"\n--\n".join((tmp_path / "texts" / name).read_bytes() for name, _ in raw.files)
    assert len(joined) == len(whole)
    rng = np.random.default_rng(0)
    for start, stop in [(0, len(whole)), *(sorted(rng.integers(0, len(whole), 2)) for _ in range(50))]:
        assert joined[int(start) : int(stop)].tobytes() == whole[start:stop]
