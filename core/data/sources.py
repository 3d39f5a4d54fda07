"""Read a data source into memory: scikit-learn's bundled sets, CSV/Parquet tables, text, synthetic.

A `data.path` of `s3://bucket/key` is fetched into the store's cache folder first (`core.storage.s3_data`,
re-used while the object's ETag and size hold), with the `store` section's S3 settings; the content hash
(the data fingerprint) is taken of the bytes read, wherever they came from."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from trainflow.core.config import (
    ImageFolderDataConfig,
    SklearnDataConfig,
    StoreConfig,
    SyntheticDataConfig,
    TableDataConfig,
    TextDataConfig,
    TextFolderDataConfig,
)
from trainflow.core.data.spec import IMAGE_SHAPES
from trainflow.core.errors import DataError
from trainflow.core.storage.s3_data import fetch_dataset, is_s3


@dataclass(frozen=True)
class RawTable:
    """Features and labels of a classification problem, before any preprocessing."""

    name: str  # what to call the source in messages: a file path or sklearn:<name>
    features: pd.DataFrame
    target: pd.Series
    content_sha256: str
    image_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RawText:
    name: str
    data: bytes
    content_sha256: str


def load_source(cfg: object, seed: int, s3: StoreConfig | None = None) -> RawTable | RawText:
    """Load the configured source; raises DataError naming the file or column on bad data. `s3`: the S3
    settings for an s3:// `data.path` (the `store` section)."""
    if isinstance(cfg, SklearnDataConfig):
        return _load_sklearn(cfg.name)
    if isinstance(cfg, TableDataConfig):
        return _load_table(cfg.path, cfg.source, cfg.target, s3)
    if isinstance(cfg, TextDataConfig):
        return load_text(cfg.path, s3)
    if isinstance(cfg, SyntheticDataConfig):
        return _make_synthetic(cfg, seed)
    raise TypeError(f"unknown data config {type(cfg).__name__}")


def _load_sklearn(name: str) -> RawTable:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
    }[name]
    bunch = loader(as_frame=True)
    names = [str(n) for n in bunch.target_names]
    target = bunch.target.map(lambda i: names[i])
    return RawTable(f"sklearn:{name}", bunch.data, target, _frame_sha256(bunch.data, target), IMAGE_SHAPES.get(name))


def dataset_uri(cfg: object) -> str:
    """The one name of a configured dataset, wherever it is written: an s3:// URI as given, a local file as an
    absolute file:// URI, `sklearn:<name>`, `text:pydoc` for the bundled text, `synthetic` for generated data.
    The dataset event (`trainflow emit-dataset-updated URI`) and MLflow's dataset inputs use it."""
    path = getattr(cfg, "path", None) or getattr(cfg, "index", None)
    if isinstance(cfg, SklearnDataConfig):
        return f"sklearn:{cfg.name}"
    if isinstance(cfg, SyntheticDataConfig):
        return "synthetic"
    if path is None:
        return "text:pydoc"
    return normalized_dataset_uri(path)


def normalized_dataset_uri(uri: str) -> str:
    """`data/x.csv`, `./data/x.csv` and `file:///abs/data/x.csv` name one file; s3:// and scheme:name stay."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).resolve().as_uri()
    if "://" in uri or (":" in uri and not Path(uri).exists() and "/" not in uri.split(":", 1)[0]):
        return uri
    return Path(uri).resolve().as_uri()


def data_file(path: str, s3: StoreConfig | None = None, field: str = "data.path") -> Path:
    """The local file of a data path: the file itself, checked readable, or the fetched copy of an s3:// object."""
    if is_s3(path):
        return fetch_dataset(path, s3, field)
    check_readable(Path(path), field)
    return Path(path)


def data_version(cfg: object, s3: StoreConfig | None = None) -> str:
    """What a configured data file holds now, cheaply: size and modification time of a local file, the sha256
    of an s3:// object's fetched copy; empty for bundled and generated data. Part of the prepare_data stage's
    cache key, so a file rewritten in place (or an object replaced under the same URI) prepares again."""
    if isinstance(cfg, ImageFolderDataConfig | TextFolderDataConfig):  # listed once per process (folders.py)
        from trainflow.core.data.folders import listing_of

        return f"listing:{listing_of(cfg).version()}"
    path = getattr(cfg, "path", None)
    if not isinstance(cfg, TableDataConfig | TextDataConfig) or path is None:
        return ""
    local = data_file(path, s3)
    if is_s3(path):
        meta = json.loads(local.with_name(f"{local.name}.s3meta.json").read_text(encoding="utf-8"))
        return f"sha256:{meta['sha256']}"
    stat = local.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _load_table(shown: str, fmt: str, target: str, s3: StoreConfig | None) -> RawTable:
    local = data_file(shown, s3)
    stat = local.stat()
    return _read_table(str(local.resolve()), fmt, target, stat.st_mtime_ns, stat.st_size, shown)


@functools.lru_cache(maxsize=1)
def _read_table(resolved: str, fmt: str, target: str, mtime_ns: int, size: int, path: str) -> RawTable:
    """Read once per process per file version: the preflight checks the content, prepare_data splits it."""
    try:
        frame = pd.read_csv(resolved) if fmt == "csv" else pd.read_parquet(resolved)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise DataError(f"{path}: cannot be read as {fmt} ({type(exc).__name__}: {exc})") from None
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns[:20]))
        raise DataError(f"{path}: target column '{target}' (data.target) not found; columns are: {columns}")
    if len(frame) == 0:
        raise DataError(f"{path}: no rows")
    if frame.shape[1] < 2:
        raise DataError(f"{path}: no feature columns besides the target '{target}'")
    labels = frame[target]
    if labels.isna().any():
        raise DataError(f"{path}: target column '{target}' has {int(labels.isna().sum())} missing labels")
    features = frame.drop(columns=[target])
    return RawTable(path, features, labels.astype(str), hashlib.sha256(Path(resolved).read_bytes()).hexdigest())


def load_text(path: str | None, s3: StoreConfig | None = None) -> RawText:
    """A UTF-8 text as bytes (a local file or an s3:// object); default is the standard library's
    pydoc_data.topics corpus."""
    if path is None:
        from pydoc_data.topics import topics

        data = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
        return RawText("pydoc_data.topics", data, hashlib.sha256(data).hexdigest())
    file = path
    data = data_file(path, s3).read_bytes()
    if not data:
        raise DataError(f"{file}: file is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    return RawText(str(file), data, hashlib.sha256(data).hexdigest())


def _make_synthetic(cfg: SyntheticDataConfig, seed: int) -> RawTable:
    from sklearn.datasets import make_classification

    check_synthetic(cfg)
    informative = _informative_features(cfg)
    x, y = make_classification(
        n_samples=cfg.n_samples, n_features=cfg.n_features, n_informative=informative, n_redundant=0,
        n_classes=cfg.n_classes, n_clusters_per_class=1, class_sep=cfg.class_sep, random_state=seed,
    )  # fmt: skip
    features = pd.DataFrame(x.astype(np.float32), columns=[f"x{i}" for i in range(cfg.n_features)])
    target = pd.Series(y).astype(str)
    return RawTable("synthetic", features, target, _frame_sha256(features, target))


def check_synthetic(cfg: SyntheticDataConfig) -> None:
    """make_classification needs 2**informative >= n_classes; a DataError naming both fields otherwise."""
    if cfg.n_classes > 2 ** _informative_features(cfg):
        raise DataError(
            f"data.n_classes={cfg.n_classes} needs at least {int(np.ceil(np.log2(cfg.n_classes))) * 4} "
            f"features (data.n_features={cfg.n_features})"
        )


def _informative_features(cfg: SyntheticDataConfig) -> int:
    return max(2, cfg.n_features // 4)


def check_readable(path: Path, field: str) -> None:
    """Fail fast, naming the config field, when a data file is missing or unreadable."""
    if not path.exists():
        raise DataError(f"{field}: file '{path}' not found")
    if not path.is_file():
        raise DataError(f"{field}: '{path}' is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise DataError(f"{field}: cannot read '{path}' ({exc.strerror})") from None


def _frame_sha256(features: pd.DataFrame, target: pd.Series) -> str:
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(features, index=False).to_numpy().tobytes())
    digest.update(pd.util.hash_pandas_object(target, index=False).to_numpy().tobytes())
    digest.update(",".join(map(str, features.columns)).encode())
    return digest.hexdigest()
