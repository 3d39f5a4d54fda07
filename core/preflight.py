"""Checks run before the first stage, so a bad setup fails in a second instead of after training."""

from __future__ import annotations

from pathlib import Path

from core.config import Config, GPTConfig, SklearnDataConfig, TableDataConfig, TextDataConfig
from core.data.sources import check_readable, load_text
from core.errors import ConfigError, DataError
from core.store import open_store
from core.tracking import check_reachable, tracking_uri


def preflight(config: Config) -> None:
    """Data readable and compatible with the model, store writable, tracking reachable.

    Raises:
        TrainflowError: the first problem found, naming the field or file.
    """
    _check_data(config)
    _check_model_fits_data(config)
    check_reachable(tracking_uri(config.tracking.uri))
    open_store(config.store.uri).check_writable()


def _check_data(config: Config) -> None:
    data = config.data
    if isinstance(data, TableDataConfig):
        path = Path(data.path)
        check_readable(path, "data.path")
        columns = _columns(path, data.source)
        if data.target not in columns:
            raise DataError(
                f"{path}: target column '{data.target}' (data.target) not found; columns are: {', '.join(columns[:20])}"
            )
    elif isinstance(data, TextDataConfig):
        if data.path is not None:
            check_readable(Path(data.path), "data.path")
            size = Path(data.path).stat().st_size
        else:
            size = len(load_text(None).data)
        smallest = int(size * min(data.val_fraction, data.test_fraction))
        if smallest < data.seq_len + 1:
            raise DataError(
                f"{data.path or 'pydoc_data.topics'}: data.seq_len={data.seq_len} is longer than the smallest split "
                f"({smallest} of {size} bytes); lower data.seq_len or use a larger text"
            )


def _columns(path: Path, fmt: str) -> list[str]:
    import pandas as pd

    try:
        if fmt == "csv":
            return [str(c) for c in pd.read_csv(path, nrows=0).columns]
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as {fmt} ({type(exc).__name__}: {exc})") from None


def _check_model_fits_data(config: Config) -> None:
    text = isinstance(config.data, TextDataConfig)
    name = config.model.name
    if isinstance(config.model, GPTConfig) != text and name != "factory":
        kind = "language modelling (data.source: text)" if name == "gpt" else "classification"
        raise ConfigError(f"model.name: '{name}' is for {kind} but data.source is '{config.data.source}'")
    is_image = isinstance(config.data, SklearnDataConfig) and config.data.name == "digits"
    if name == "cnn" and not is_image:
        raise ConfigError(
            f"model.name: 'cnn' needs image data (data.name: digits); use mlp for data.source '{config.data.source}'"
        )
