"""Bad data gets a DataError naming the file and column, before anything is prepared."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.core.test_prepare_data import data_config
from trainflow.core.errors import DataError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore


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
