"""Split and preprocess in memory: stratified splits, scikit-learn transformers fitted on train only."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from trainflow.core.data.folders import ordered_classes
from trainflow.core.data.prepared import SPLITS, ArraySplits
from trainflow.core.data.sources import RawTable, RawText
from trainflow.core.errors import DataError

MAX_CATEGORIES = 64  # a non-numeric column with more distinct values is free text or an id, not a category
N_EXAMPLES = 5  # raw test rows kept with the preprocessor: the served model's input example
PREPROCESSOR_FORMAT = "trainflow-preprocessor/1"


@dataclass(frozen=True)
class FittedTable:
    """`split_table`'s arrays and what a served model needs to redo the preprocessing on raw rows."""

    splits: ArraySplits
    transformer: ColumnTransformer  # fitted on the training rows; categorical values as strings
    numeric: list[str]
    categorical: list[str]
    dtypes: dict[str, str]  # every raw feature column, in source order -> its pandas dtype
    image_shape: tuple[int, ...] | None
    examples: pd.DataFrame  # the first raw test rows, exactly as they came in
    raw_test: pd.DataFrame  # every raw test row: a served model (the champion) is scored on them

    def raw_test_bytes(self) -> bytes:
        """The raw test split as a pickle: `features` (DataFrame as it came in) and `labels` (class names)."""
        labels = [self.splits.class_names[i] for i in self.splits.y["test"]]
        return pickle.dumps({"features": self.raw_test, "labels": labels}, protocol=pickle.HIGHEST_PROTOCOL)

    def preprocessor(self) -> dict[str, Any]:
        """The pickled payload: plain dict, scikit-learn and pandas objects only, so a served model
        unpickles it without trainflow installed."""
        import sklearn

        return {
            "format": PREPROCESSOR_FORMAT,
            "transformer": self.transformer,
            "columns": list(self.dtypes),
            "numeric": self.numeric,
            "categorical": self.categorical,
            "dtypes": self.dtypes,
            "class_names": self.splits.class_names,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "examples": self.examples,
            "sklearn_version": sklearn.__version__,
        }

    def preprocessor_bytes(self) -> bytes:
        return pickle.dumps(self.preprocessor(), protocol=pickle.HIGHEST_PROTOCOL)


def split_table(
    raw: RawTable,
    val_fraction: float,
    test_fraction: float,
    scale: str,
    seed: int,
    fitted: dict[str, Any] | None = None,
) -> FittedTable:
    """Stratified train/val/test split, then impute/encode/scale fitted on the training rows only, or with the
    already fitted preprocessor payload `fitted` (a parent model's: its weights learned that scaling).

    Raises:
        DataError: a content problem (see `check_table`), naming the source and column; columns that differ
            from `fitted`'s.
    """
    rows = _split_rows(raw, val_fraction, test_fraction, seed)
    if fitted is None:
        numeric, categorical = _column_kinds(raw.features, raw.name)
        transformer = _feature_transformer(numeric, categorical, scale)
        transformer.fit(categories_as_strings(raw.features, categorical).iloc[rows.index["train"]])
    else:
        columns = [str(c) for c in raw.features.columns]
        if columns != list(fitted["columns"]):
            raise DataError(f"{raw.name}: columns {columns[:5]}... differ from the parent model's preprocessing "
                            f"({list(fitted['columns'])[:5]}...); set data.refit_preprocessing: true")  # fmt: skip
        numeric, categorical, transformer = fitted["numeric"], fitted["categorical"], fitted["transformer"]
    features = categories_as_strings(raw.features, categorical)
    x = {name: _to_float32(transformer.transform(features.iloc[index])) for name, index in rows.index.items()}
    n_features = x["train"].shape[1]
    if raw.image_shape is not None:
        x = {name: a.reshape(-1, *raw.image_shape) for name, a in x.items()}
    y = {name: rows.labels[index] for name, index in rows.index.items()}
    return FittedTable(
        splits=ArraySplits(x, y, rows.classes, n_features),
        transformer=transformer,
        numeric=numeric,
        categorical=categorical,
        dtypes={str(c): str(t) for c, t in raw.features.dtypes.items()},
        image_shape=raw.image_shape,
        examples=_plain(raw.features.iloc[rows.index["test"][:N_EXAMPLES]].reset_index(drop=True)),
        raw_test=_plain(raw.features.iloc[rows.index["test"]].reset_index(drop=True)),
    )


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with text columns and column names as object dtype: pandas' own string dtype may be backed
    by pyarrow, which a served model's environment does not have, and the pickle would then not load."""
    text = [
        c for c, t in frame.dtypes.items() if not (pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t))
    ]
    plain = frame.astype(dict.fromkeys(text, object))
    plain.columns = pd.Index(frame.columns.tolist(), dtype=object)
    return plain


def categories_as_strings(features: pd.DataFrame, categorical: list[str]) -> pd.DataFrame:
    """A copy whose categorical columns hold strings: mixed str/number/bool values become `str(v)`
    (True -> 'True'), any missing marker (None, NaN, pd.NA) becomes NaN, which the imputer fills.
    The served model (core/serving/trainflow_serving.py) repeats this rule on raw rows."""
    features = features.copy()
    for column in categorical:
        features[column] = features[column].map(lambda v: np.nan if pd.isna(v) else str(v)).astype(object)
    return features


def check_table(raw: RawTable, val_fraction: float, test_fraction: float, seed: int) -> None:
    """Every content problem `split_table` would meet (a single class, too few samples per class, a column
    with no values, infinite values, dates, free text), found without fitting anything: the preflight's
    check, so bad data fails before a run writes anything."""
    _split_rows(raw, val_fraction, test_fraction, seed)
    _column_kinds(raw.features, raw.name)


@dataclass(frozen=True)
class _Rows:
    classes: list[str]
    labels: np.ndarray  # int64 class index per row
    index: dict[str, np.ndarray]  # split name -> row indices


def _split_rows(raw: RawTable, val_fraction: float, test_fraction: float, seed: int) -> _Rows:
    return split_rows(raw.target, raw.name, val_fraction, test_fraction, seed)


def split_rows(
    target: pd.Series, name: str, val_fraction: float, test_fraction: float, seed: int, classes: list[str] | None = None
) -> _Rows:
    """Stratified, seeded train/val/test row indices of a classification target; `classes` fixes the label order
    (default: natural order of the names)."""
    classes = ordered_classes(target) if classes is None else classes
    labels = pd.Categorical(target, categories=classes).codes.astype(np.int64)
    if len(classes) < 2:
        raise DataError(f"{name}: target has a single class ('{classes[0]}'); classification needs two or more")
    counts = np.bincount(labels, minlength=len(classes))
    rarest = int(np.argmin(counts))
    if counts[rarest] < 3:
        raise DataError(
            f"{name}: class '{classes[rarest]}' has {counts[rarest]} sample(s); a stratified "
            "train/val/test split needs at least 3 per class"
        )
    rows = np.arange(len(labels))
    try:
        rest, test = train_test_split(rows, test_size=test_fraction, stratify=labels, random_state=seed)
        val_share = val_fraction / (1 - test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    except ValueError as exc:
        raise DataError(f"{name}: cannot split {len(labels)} rows into train/val/test ({exc})") from None
    return _Rows(classes, labels, dict(zip(SPLITS, (train, val, test), strict=True)))


def split_text(raw: RawText, val_fraction: float, test_fraction: float, seq_len: int) -> ArraySplits:
    """Contiguous train/val/test byte ranges (no shuffling: neighbouring text would leak across splits)."""
    tokens = np.frombuffer(raw.data, dtype=np.uint8)
    n_val, n_test = int(len(tokens) * val_fraction), int(len(tokens) * test_fraction)
    n_train = len(tokens) - n_val - n_test
    parts = {"train": tokens[:n_train], "val": tokens[n_train : n_train + n_val], "test": tokens[n_train + n_val :]}
    for name, part in parts.items():
        if len(part) < seq_len + 1:
            raise DataError(
                f"{raw.name}: data.seq_len={seq_len} is longer than the {name} split ({len(part)} bytes of "
                f"{len(tokens)}); lower data.seq_len or use a larger text"
            )
    return ArraySplits({k: v.copy() for k, v in parts.items()}, {}, [], 1)


def _column_kinds(features: pd.DataFrame, name: str) -> tuple[list[str], list[str]]:
    numeric, categorical = [], []
    for column in features.columns:
        series = features[column]
        if series.isna().all():
            raise DataError(f"{name}: column '{column}' has no values")
        if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
            if pd.api.types.is_datetime64_any_dtype(series) or _looks_like_dates(series):
                raise DataError(f"{name}: column '{column}' holds dates; convert it to numbers before training")
            distinct = series.dropna().astype(str).nunique()
            if distinct > MAX_CATEGORIES:
                raise DataError(
                    f"{name}: column '{column}' is non-numeric with {distinct} distinct values (more than "
                    f"{MAX_CATEGORIES}), so it cannot be one-hot encoded; drop it or encode it first"
                )
            categorical.append(column)
        else:
            infinite = int(np.isinf(series.to_numpy(dtype=np.float64, na_value=np.nan)).sum())
            if infinite:
                raise DataError(
                    f"{name}: column '{column}' has {infinite} row(s) with an infinite value; replace or drop them"
                )
            numeric.append(column)
    return numeric, categorical


def _feature_transformer(numeric: list[str], categorical: list[str], scale: str) -> ColumnTransformer:
    scaler = [StandardScaler()] if scale == "standard" else []
    return ColumnTransformer(
        [
            ("numeric", make_pipeline(SimpleImputer(strategy="median"), *scaler), numeric),
            (
                "categorical",
                make_pipeline(
                    SimpleImputer(strategy="most_frequent"),
                    OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                ),
                categorical,
            ),
        ],
        sparse_threshold=0.0,
    )


def _looks_like_dates(series: pd.Series) -> bool:
    """Strings such as '2024-01-31' or '2024-01-31 12:00': CSV readers leave them as text."""
    sample = series.dropna().astype(str).head(200)
    if sample.empty or not sample.str.contains(r"^\d{4}-\d{2}-\d{2}", regex=True).all():
        return False
    return pd.to_datetime(sample, errors="coerce", format="ISO8601").notna().all()


def _to_float32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)
