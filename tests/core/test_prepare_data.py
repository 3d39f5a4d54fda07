"""The prepare_data stage on real data: every source, stratified seeded splits, train-only scaling,
the fingerprint cache, one-line DataErrors naming file and column, and the resumable loaders."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import datasets
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from core.config import DataConfig, LoaderConfig, config_from_dict
from core.data.loaders import EpochSampler, TokenWindows, build_loaders
from core.data.preprocess import SPLITS, ArraySplits
from core.errors import DataError
from core.prepare_data import PrepareDataResult, load_splits, prepare_data
from core.store import LocalStore
from tests.conftest import tiny_raw

SKLEARN = {
    "digits": datasets.load_digits,
    "wine": datasets.load_wine,
    "iris": datasets.load_iris,
    "breast_cancer": datasets.load_breast_cancer,
}


def data_config(**data: Any) -> DataConfig:
    """The `data` section of a tiny config whose data section is exactly `data`."""
    raw = tiny_raw()
    raw["data"] = data
    return config_from_dict(raw).data


def prepare(store: LocalStore, seed: int = 0, **data: Any) -> tuple[PrepareDataResult, ArraySplits]:
    result = prepare_data(data_config(**data), seed, store)
    return result, load_splits(result, store)


def npz_mtime_ns(result: PrepareDataResult, store: LocalStore) -> int:
    return store.local_path(result.uri).stat().st_mtime_ns


def mixed_frame(n: int = 90) -> pd.DataFrame:
    """Numeric, categorical string and bool features with NaNs in a numeric and a categorical column."""
    rng = np.random.default_rng(7)
    height = rng.normal(170.0, 10.0, n)
    height[[3, 17, 40]] = np.nan
    colour = rng.choice(["red", "green", "blue"], n).astype(object)
    colour[[5, 22]] = np.nan
    return pd.DataFrame(
        {
            "height": height,
            "colour": colour,
            "smoker": rng.random(n) < 0.3,
            "weight": rng.normal(70.0, 5.0, n),
            "label": np.array(["yes", "no", "maybe"])[np.arange(n) % 3],
        }
    )


def split_rows(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Which raw rows go to which split: the same two stratified train_test_split calls as the stage."""
    _, y = np.unique(labels, return_inverse=True)
    rest, test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    share = val_fraction / (1 - test_fraction)
    train, val = train_test_split(rest, test_size=share, stratify=y[rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


# ------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize(
    ("name", "input_shape", "n_classes"),
    [("digits", (1, 8, 8), 10), ("wine", (13,), 3), ("iris", (4,), 3), ("breast_cancer", (30,), 2)],
)
def test_sklearn_sources_give_float32_features_and_int64_labels(
    store: LocalStore, name: str, input_shape: tuple[int, ...], n_classes: int
) -> None:
    result, splits = prepare(store, source="sklearn", name=name)
    bunch = SKLEARN[name]()
    assert result.source == f"sklearn:{name}"
    assert result.spec.task == "classification"
    assert result.spec.input_shape == input_shape
    assert result.spec.n_classes == n_classes == len(result.spec.class_names)
    assert sorted(result.spec.class_names) == sorted(str(c) for c in bunch.target_names)
    assert result.n_train + result.n_val + result.n_test == len(bunch.target)
    for split, n in zip(SPLITS, (result.n_train, result.n_val, result.n_test), strict=True):
        assert splits.x[split].shape == (n, *input_shape)
        assert splits.x[split].dtype == np.float32
        assert np.isfinite(splits.x[split]).all()
        assert splits.y[split].dtype == np.int64
        assert set(np.unique(splits.y[split])) == set(range(n_classes))


def test_digits_images_keep_the_pixel_layout(store: LocalStore) -> None:
    _, splits = prepare(store, source="sklearn", name="digits", scale="none")
    digits = datasets.load_digits()
    rows = split_rows(digits.target, 0.15, 0.15, seed=0)
    for split in SPLITS:
        np.testing.assert_array_equal(splits.x[split][:, 0], digits.images[rows[split]].astype(np.float32))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_with_categorical_bool_and_missing_values_is_encoded_imputed_and_scaled(
    store: LocalStore, tmp_path: Path, fmt: str
) -> None:
    frame = mixed_frame()
    path = tmp_path / f"people.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)

    result, splits = prepare(store, source=fmt, path=str(path), target="label")

    # 2 numeric columns first, then one-hot colour (blue, green, red) and smoker (False, True)
    assert result.source == str(path)
    assert result.spec.input_shape == (2 + 3 + 2,)
    assert result.spec.class_names == ["maybe", "no", "yes"]
    rows = split_rows(frame["label"].to_numpy(), 0.15, 0.15, seed=0)
    numeric = frame[["height", "weight"]].to_numpy()
    imputer = SimpleImputer(strategy="median").fit(numeric[rows["train"]])
    scaler = StandardScaler().fit(imputer.transform(numeric[rows["train"]]))
    train_mode = frame["colour"].iloc[rows["train"]].mode()[0]
    for split in SPLITS:
        x = splits.x[split]
        assert x.dtype == np.float32 and np.isfinite(x).all()
        expected = scaler.transform(imputer.transform(numeric[rows[split]]))
        np.testing.assert_allclose(x[:, :2], expected, atol=1e-5)
        one_hot = x[:, 2:]
        assert set(np.unique(one_hot)) <= {0.0, 1.0}
        np.testing.assert_array_equal(one_hot[:, :3].sum(axis=1), 1.0)  # a missing colour is imputed, not dropped
        np.testing.assert_array_equal(one_hot[:, 3:].sum(axis=1), 1.0)
        smoker = frame["smoker"].to_numpy()[rows[split]]
        np.testing.assert_array_equal(one_hot[:, 4], smoker.astype(np.float32))
        labels = frame["label"].to_numpy()[rows[split]]
        np.testing.assert_array_equal(np.array(result.spec.class_names)[splits.y[split]], labels)
        colour = frame["colour"].to_numpy()[rows[split]]
        missing = pd.isna(colour)
        np.testing.assert_array_equal(
            one_hot[~missing, :3].argmax(axis=1), pd.Categorical(colour[~missing], ["blue", "green", "red"]).codes
        )
        np.testing.assert_array_equal(one_hot[missing, :3].argmax(axis=1), ["blue", "green", "red"].index(train_mode))
    assert np.isnan(numeric[rows["train"]]).any(), "the table exercises the median imputation"


def test_default_text_corpus_gives_contiguous_byte_splits(store: LocalStore) -> None:
    from pydoc_data.topics import topics

    result, splits = prepare(store, source="text", seq_len=32)
    corpus = np.frombuffer("\n\n".join(topics[k] for k in sorted(topics)).encode(), dtype=np.uint8)
    assert result.source == "pydoc_data.topics"
    assert result.spec.task == "language_modeling"
    assert result.spec.input_shape == (32,) and result.spec.n_classes == 256
    assert all(splits.x[s].dtype == np.uint8 for s in SPLITS)
    assert splits.y == {}
    np.testing.assert_array_equal(np.concatenate([splits.x[s] for s in SPLITS]), corpus)
    assert len(splits.x["val"]) == len(splits.x["test"]) == int(len(corpus) * 0.15)
    assert result.n_train == (len(splits.x["train"]) - 1) // 32
    assert result.n_val == (len(splits.x["val"]) - 1) // 32
    assert result.n_test == (len(splits.x["test"]) - 1) // 32


def test_text_file_is_read_as_utf8_bytes(store: LocalStore, tmp_path: Path) -> None:
    path = tmp_path / "poem.txt"
    text = "Über den Wolken ✓ muss die Freiheit wohl grenzenlos sein.\n" * 40
    path.write_text(text, encoding="utf-8")

    result, splits = prepare(store, source="text", path=str(path), seq_len=16, val_fraction=0.1, test_fraction=0.2)

    data = text.encode("utf-8")
    assert result.source == str(path)
    np.testing.assert_array_equal(np.concatenate([splits.x[s] for s in SPLITS]), np.frombuffer(data, np.uint8))
    assert len(splits.x["val"]) == int(len(data) * 0.1) and len(splits.x["test"]) == int(len(data) * 0.2)
    assert all(splits.x[s].dtype == np.uint8 for s in SPLITS)
    assert result.n_train == (len(splits.x["train"]) - 1) // 16


@pytest.mark.parametrize(("n_samples", "n_features", "n_classes"), [(100, 8, 3), (240, 4, 2)])
def test_synthetic_source_is_sized_by_config(
    store: LocalStore, n_samples: int, n_features: int, n_classes: int
) -> None:
    result, splits = prepare(store, source="synthetic", n_samples=n_samples, n_features=n_features, n_classes=n_classes)
    assert result.source == "synthetic"
    assert result.n_train + result.n_val + result.n_test == n_samples
    assert result.spec.input_shape == (n_features,)
    assert result.spec.n_classes == n_classes
    assert set(np.concatenate([splits.y[s] for s in SPLITS])) == set(range(n_classes))


# -------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize(("name", "val_fraction", "test_fraction"), [("digits", 0.15, 0.15), ("wine", 0.2, 0.1)])
def test_splits_are_stratified(store: LocalStore, name: str, val_fraction: float, test_fraction: float) -> None:
    _, splits = prepare(store, source="sklearn", name=name, val_fraction=val_fraction, test_fraction=test_fraction)
    labels = SKLEARN[name]().target
    whole = np.bincount(labels) / len(labels)
    n = len(labels)
    assert len(splits.y["test"]) == pytest.approx(n * test_fraction, abs=1)
    assert len(splits.y["val"]) == pytest.approx(n * val_fraction, abs=1)
    for split in SPLITS:
        y = splits.y[split]
        # each of the two stratified splits rounds a class's count, so it is off by at most two samples
        np.testing.assert_allclose(np.bincount(y, minlength=len(whole)) / len(y), whole, atol=2 / len(y))


def test_splits_are_disjoint_and_cover_every_row(store: LocalStore) -> None:
    _, splits = prepare(store, source="sklearn", name="wine", scale="none")
    raw = datasets.load_wine().data.astype(np.float32)  # its 178 rows are distinct
    raw_rows = {row.tobytes(): i for i, row in enumerate(raw)}
    assert len(raw_rows) == len(raw)
    taken = {split: [raw_rows[row.tobytes()] for row in splits.x[split]] for split in SPLITS}
    every = [i for split in SPLITS for i in taken[split]]
    assert sorted(every) == list(range(len(raw)))


def test_same_seed_gives_identical_arrays_and_another_seed_another_split(tmp_path: Path) -> None:
    first = prepare(LocalStore(tmp_path / "a"), seed=3, source="sklearn", name="wine")[1]
    again = prepare(LocalStore(tmp_path / "b"), seed=3, source="sklearn", name="wine")[1]
    other = prepare(LocalStore(tmp_path / "c"), seed=4, source="sklearn", name="wine")[1]
    for split in SPLITS:
        np.testing.assert_array_equal(first.x[split], again.x[split])
        np.testing.assert_array_equal(first.y[split], again.y[split])
    assert not np.array_equal(first.y["train"], other.y["train"])
    assert first.x["test"].shape == other.x["test"].shape
    assert not np.array_equal(first.x["test"], other.x["test"])


# ------------------------------------------------------------------------------------- scaling
@pytest.mark.parametrize("seed", [0, 5])
def test_scaler_is_fitted_on_train_rows_only(store: LocalStore, seed: int) -> None:
    _, splits = prepare(store, seed=seed, source="sklearn", name="wine")
    raw = datasets.load_wine(as_frame=True)
    rows = split_rows(raw.target.map(lambda i: raw.target_names[i]).to_numpy(), 0.15, 0.15, seed)
    features = raw.data.to_numpy()
    scaler = StandardScaler().fit(features[rows["train"]])

    train = splits.x["train"].astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-5)
    for split in SPLITS:
        np.testing.assert_allclose(splits.x[split], scaler.transform(features[rows[split]]), atol=1e-5)


def test_scale_none_keeps_raw_values(store: LocalStore) -> None:
    _, splits = prepare(store, source="sklearn", name="iris", scale="none")
    raw = datasets.load_iris(as_frame=True)
    rows = split_rows(raw.target.map(lambda i: raw.target_names[i]).to_numpy(), 0.15, 0.15, seed=0)
    for split in SPLITS:
        np.testing.assert_array_equal(splits.x[split], raw.data.to_numpy()[rows[split]].astype(np.float32))


# ------------------------------------------------------------------------------------- caching
def test_second_call_reuses_the_prepared_arrays(store: LocalStore) -> None:
    cfg = data_config(source="sklearn", name="wine")
    first = prepare_data(cfg, 0, store)
    mtime = npz_mtime_ns(first, store)
    second = prepare_data(cfg, 0, store)
    assert second == first
    assert npz_mtime_ns(second, store) == mtime
    assert len(first.fingerprint) == 64 and first.fingerprint[:16] in first.uri


def test_edited_csv_changes_the_fingerprint(store: LocalStore, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    frame = mixed_frame()
    frame.to_csv(path, index=False)
    cfg = data_config(source="csv", path=str(path), target="label")
    before = prepare_data(cfg, 0, store)
    frame.loc[0, "weight"] += 1.0
    frame.to_csv(path, index=False)
    after = prepare_data(cfg, 0, store)
    assert after.fingerprint != before.fingerprint
    assert after.uri != before.uri
    old, new = load_splits(before, store), load_splits(after, store)
    assert not all(np.array_equal(old.x[s], new.x[s]) for s in SPLITS), "the edited file was read again"


@pytest.mark.parametrize(
    ("change", "seed"),
    [({"scale": "none"}, 0), ({"val_fraction": 0.2}, 0), ({"test_fraction": 0.2}, 0), ({}, 1)],
    ids=["scale", "val_fraction", "test_fraction", "seed"],
)
def test_preprocessing_settings_change_the_fingerprint(store: LocalStore, change: dict[str, Any], seed: int) -> None:
    base = prepare_data(data_config(source="sklearn", name="wine"), 0, store)
    changed = prepare_data(data_config(source="sklearn", name="wine", **change), seed, store)
    assert changed.fingerprint != base.fingerprint
    assert changed.uri != base.uri


def test_loader_settings_do_not_change_the_fingerprint(store: LocalStore) -> None:
    base = prepare_data(data_config(source="sklearn", name="wine"), 0, store)
    mtime = npz_mtime_ns(base, store)
    loader = {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    again = prepare_data(data_config(source="sklearn", name="wine", loader=loader), 0, store)
    assert again == base
    assert npz_mtime_ns(again, store) == mtime


def test_missing_npz_is_prepared_again(store: LocalStore) -> None:
    cfg = data_config(source="sklearn", name="iris")
    first = prepare_data(cfg, 0, store)
    store.local_path(first.uri).unlink()
    second = prepare_data(cfg, 0, store)
    assert second == first
    assert store.exists(second.uri)


# -------------------------------------------------------------------------------------- errors
def _csv(text: str, name: str = "data.csv") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder / name

    return write


def _frame(frame: pd.DataFrame, name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        if name.endswith(".csv"):
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        return path

    return write


def _bytes(data: bytes, name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return write


def _labelled(labels: list[str], **columns: Any) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(len(labels), dtype=float), **columns, "y": labels})


BALANCED = ["a", "b", "c"] * 30
BAD_TABLES = [
    pytest.param(lambda folder: folder / "nope.csv", "csv", r"data\.path: file '{path}' not found", id="missing file"),
    pytest.param(
        _csv("x,z\n1,2\n3,4\n"),
        "csv",
        r"{path}: target column 'y' \(data\.target\) not found; columns are: x, z",
        id="missing target",
    ),
    pytest.param(_csv(""), "csv", r"{path}: file is empty", id="empty file"),
    pytest.param(_csv("x,y\n"), "csv", r"{path}: no rows", id="header only"),
    pytest.param(_csv("y\na\nb\n"), "csv", r"{path}: no feature columns besides the target 'y'", id="target only"),
    pytest.param(
        _csv("x,y\n1,a\n2,\n3,b\n4,\n"), "csv", r"{path}: target column 'y' has 2 missing labels", id="target NaN"
    ),
    pytest.param(
        _frame(_labelled(["a"] * 12), "one.csv"), "csv", r"{path}: target has a single class \('a'\)", id="one class"
    ),
    pytest.param(
        _frame(_labelled(["a"] * 10 + ["b"] * 10 + ["c"] * 2), "rare.csv"),
        "csv",
        r"{path}: class 'c' has 2 sample\(s\); a stratified train/val/test split needs at least 3 per class",
        id="rare class",
    ),
    pytest.param(
        _frame(_labelled(BALANCED, id=[f"user{i}" for i in range(90)]), "ids.csv"),
        "csv",
        r"{path}: column 'id' is non-numeric with 90 distinct values \(more than 64\)",
        id="high cardinality csv",
    ),
    pytest.param(
        _frame(_labelled(BALANCED, id=[f"user{i}" for i in range(90)]), "ids.parquet"),
        "parquet",
        r"{path}: column 'id' is non-numeric with 90 distinct values \(more than 64\)",
        id="high cardinality parquet",
    ),
    pytest.param(
        _frame(_labelled(BALANCED, when=pd.date_range("2024-01-01", periods=90)), "dates.parquet"),
        "parquet",
        r"{path}: column 'when' holds dates; convert it to numbers",
        id="date column",
    ),
    pytest.param(
        _frame(_labelled(BALANCED, when=[f"2024-01-{d:02d}" for d in range(1, 31)] * 3), "dates.csv"),
        "csv",
        r"{path}: column 'when' holds dates; convert it to numbers",
        id="date column csv",
    ),
    pytest.param(
        _frame(_labelled(BALANCED, empty=np.full(90, np.nan)), "empty.csv"),
        "csv",
        r"{path}: column 'empty' has no values",
        id="all-NaN column",
    ),
    pytest.param(
        _bytes(b"not parquet", "bad.parquet"), "parquet", r"{path}: cannot be read as parquet", id="bad parquet"
    ),
]


@pytest.mark.parametrize(("write", "fmt", "message"), BAD_TABLES)
def test_bad_table_raises_data_error_naming_file_and_column(
    store: LocalStore, tmp_path: Path, write: Callable[[Path], Path], fmt: str, message: str
) -> None:
    path = write(tmp_path)
    cfg = data_config(source=fmt, path=str(path), target="y")
    with pytest.raises(DataError, match="^" + message.format(path=re.escape(str(path)))):
        prepare_data(cfg, 0, store)
    assert not list(store.root.rglob("*.npz"))


BAD_TEXTS = [
    pytest.param(
        _bytes(b"short text, long context " * 3, "short.txt"),
        64,
        r"{path}: data\.seq_len=64 is longer than the train split \(53 bytes of 75\)",
        id="shorter than seq_len",
    ),
    pytest.param(
        _bytes(b"x" * 300, "small.txt"),
        64,
        r"{path}: data\.seq_len=64 is longer than the val split \(45 bytes of 300\)",
        id="val split too short",
    ),
    pytest.param(
        _bytes("caf\u00e9".encode("latin-1") + b" au lait" * 50, "latin1.txt"),
        8,
        r"{path}: not UTF-8 text \(byte 3\)",
        id="not UTF-8",
    ),
    pytest.param(_bytes(b"", "empty.txt"), 8, r"{path}: file is empty", id="empty"),
    pytest.param(lambda folder: folder / "nope.txt", 8, r"data\.path: file '{path}' not found", id="missing"),
]


@pytest.mark.parametrize(("write", "seq_len", "message"), BAD_TEXTS)
def test_bad_text_raises_data_error_naming_file(
    store: LocalStore, tmp_path: Path, write: Callable[[Path], Path], seq_len: int, message: str
) -> None:
    path = write(tmp_path)
    with pytest.raises(DataError, match="^" + message.format(path=re.escape(str(path)))):
        prepare_data(data_config(source="text", path=str(path), seq_len=seq_len), 0, store)


def test_synthetic_with_too_many_classes_for_its_features_raises(store: LocalStore) -> None:
    cfg = data_config(source="synthetic", n_features=4, n_classes=5)
    with pytest.raises(DataError, match=r"^data\.n_classes=5 needs at least 12 features \(data\.n_features=4\)"):
        prepare_data(cfg, 0, store)


# ------------------------------------------------------------------------------------- loaders
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


def test_numeric_labels_keep_their_numeric_order(tmp_path: Path, store: LocalStore) -> None:
    path = tmp_path / "numbers.csv"
    pd.DataFrame({"x": np.arange(90.0), "y": [1, 2, 10] * 30}).to_csv(path, index=False)
    cfg = config_from_dict({"data": {"source": "csv", "path": str(path), "target": "y"}, "model": {"name": "mlp"}})
    assert prepare_data(cfg.data, 0, store).spec.class_names == ["1", "2", "10"]
