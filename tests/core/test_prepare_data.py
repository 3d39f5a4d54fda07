"""The prepare_data stage on real data: every source, stratified seeded splits, train-only scaling,
the fingerprint cache, one-line DataErrors naming file and column, and the resumable loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn import datasets
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from tests.conftest import tiny_raw
from trainflow.core.config import DataConfig, config_from_dict
from trainflow.core.data.prepared import SPLITS, ArraySplits, load_splits
from trainflow.core.data.preprocess import categories_as_strings
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore

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
    return result, load_splits(store, result)


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
    old = load_splits(store, before)
    new = load_splits(store, after)
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


def test_tables_keep_their_fitted_preprocessor_and_raw_examples(store: LocalStore, tmp_path: Path) -> None:
    """preprocessor.pkl beside splits.npz: the fitted transformer redoes the test arrays from raw rows;
    a record whose pickle is gone is prepared again; text needs none."""
    path = tmp_path / "people.csv"
    mixed_frame().to_csv(path, index=False)
    result, splits = prepare(store, source="csv", path=str(path), target="label")
    assert result.preprocessor_uri == result.uri.replace("splits.npz", "preprocessor.pkl")
    assert result.artifact_uris() == [result.uri, result.preprocessor_uri, result.raw_test_uri]
    raw_test = pd.read_pickle(store.local_path(result.raw_test_uri))  # every raw test row, for scoring a champion
    assert len(raw_test["features"]) == result.n_test == len(raw_test["labels"])
    pd.testing.assert_frame_equal(raw_test["features"].head(5), pre_examples := pd.read_pickle(
        store.local_path(result.preprocessor_uri))["examples"])  # fmt: skip
    assert raw_test["labels"] == [["maybe", "no", "yes"][i] for i in splits.y["test"]] and len(pre_examples) == 5
    pre = pd.read_pickle(store.local_path(result.preprocessor_uri))
    assert pre["columns"] == ["height", "colour", "smoker", "weight"]
    assert pre["dtypes"] == {"height": "float64", "colour": "str", "smoker": "bool", "weight": "float64"}
    assert (pre["numeric"], pre["categorical"]) == (["height", "weight"], ["colour", "smoker"])
    assert pre["class_names"] == ["maybe", "no", "yes"] and pre["image_shape"] is None
    rows = split_rows(mixed_frame()["label"].to_numpy(), 0.15, 0.15, seed=0)
    raw_rows = pd.read_csv(path).drop(columns="label").iloc[rows["test"][:5]].reset_index(drop=True)
    pd.testing.assert_frame_equal(pre["examples"], raw_rows.astype({"colour": object}), check_column_type=False)
    assert b"pyarrow" not in store.local_path(result.preprocessor_uri).read_bytes(), "loads without pyarrow"
    raw = categories_as_strings(pre["examples"], pre["categorical"])
    np.testing.assert_allclose(pre["transformer"].transform(raw), splits.x["test"][:5], rtol=1e-6)

    store.local_path(result.preprocessor_uri).unlink()
    assert prepare_data(data_config(source="csv", path=str(path), target="label"), 0, store) == result
    assert store.exists(result.preprocessor_uri), "prepared again"
    text, _ = prepare(store, source="text", seq_len=16)
    assert text.preprocessor_uri is None and text.artifact_uris() == [text.uri]


def test_numeric_labels_keep_their_numeric_order(tmp_path: Path, store: LocalStore) -> None:
    path = tmp_path / "numbers.csv"
    pd.DataFrame({"x": np.arange(90.0), "y": [1, 2, 10] * 30}).to_csv(path, index=False)
    cfg = config_from_dict({"data": {"source": "csv", "path": str(path), "target": "y"}, "model": {"name": "mlp"}})
    assert prepare_data(cfg.data, 0, store).spec.class_names == ["1", "2", "10"]
