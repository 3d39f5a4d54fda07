"""`data.path: s3://...` on moto's server: fetched once into the store's cache, re-used while the ETag and
size hold, fetched again when the object changes; a missing object is a one-line error naming the URI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import tiny_raw
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import StoreConfig, TableDataConfig, TextDataConfig, config_from_dict
from trainflow.core.errors import DataError
from trainflow.core.preflight import preflight
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage import s3_data
from trainflow.core.storage.store import LocalStore

DATA_BUCKET = "trainflow-datasets"  # not the store's bucket: same endpoint, other bucket


@pytest.fixture
def settings(s3_endpoint: str, tmp_path: Path) -> StoreConfig:  # noqa: F811
    if DATA_BUCKET not in {b["Name"] for b in s3_client(s3_endpoint).list_buckets()["Buckets"]}:
        new_bucket(s3_endpoint, DATA_BUCKET)
    return StoreConfig(uri="s3://trainflow-store/x", endpoint_url=s3_endpoint, cache_dir=str(tmp_path / "cache"))


def _csv(rows: int, shift: float = 0.0) -> bytes:
    frame = pd.DataFrame({"a": [i + shift for i in range(rows)], "b": [i % 3 for i in range(rows)]})
    frame["label"] = ["x" if i % 2 else "y" for i in range(rows)]
    return frame.to_csv(index=False).encode()


def _gets(settings: StoreConfig) -> Counter[str]:
    """GetObject calls (and every other operation) of the data client from now on."""
    seen: Counter[str] = Counter()
    client = s3_data._store(DATA_BUCKET, settings).client
    client.meta.events.register("before-call.s3.*", lambda model, **_: seen.update([model.name]))
    return seen


def test_an_s3_csv_is_downloaded_once_and_again_when_it_changes(
    settings: StoreConfig,
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    client, uri = s3_client(s3_endpoint), f"s3://{DATA_BUCKET}/tables/iris-like.csv"
    client.put_object(Bucket=DATA_BUCKET, Key="tables/iris-like.csv", Body=_csv(60))
    cfg = TableDataConfig(source="csv", path=uri, target="label")
    store = LocalStore(tmp_path / "artifacts")
    calls = _gets(settings)

    first = prepare_data(cfg, 0, store, settings)
    assert first.source == uri and first.n_train + first.n_val + first.n_test == 60
    cached = tmp_path / "cache" / "s3-data" / DATA_BUCKET / "tables" / "iris-like.csv"
    assert cached.read_bytes() == _csv(60)
    assert calls["GetObject"] == 1

    again = prepare_data(cfg, 0, store, settings)
    assert calls["GetObject"] == 1, "the cached copy was re-used (same ETag and size)"
    assert again.fingerprint == first.fingerprint

    client.put_object(Bucket=DATA_BUCKET, Key="tables/iris-like.csv", Body=_csv(60, shift=0.5))  # same size
    changed = prepare_data(cfg, 0, store, settings)
    assert calls["GetObject"] == 2 and cached.read_bytes() == _csv(60, shift=0.5)
    assert changed.fingerprint != first.fingerprint, "the fingerprint covers the content"


def test_an_s3_text_is_read(settings: StoreConfig, s3_endpoint: str, tmp_path: Path) -> None:  # noqa: F811
    text = ("the quick brown fox jumps over the lazy dog. " * 200).encode()
    s3_client(s3_endpoint).put_object(Bucket=DATA_BUCKET, Key="corpus.txt", Body=text)
    cfg = TextDataConfig(source="text", path=f"s3://{DATA_BUCKET}/corpus.txt", seq_len=16)
    result = prepare_data(cfg, 0, LocalStore(tmp_path / "artifacts"), settings)
    assert result.source == f"s3://{DATA_BUCKET}/corpus.txt" and result.n_train > 0


def test_a_missing_object_is_a_one_line_error(settings: StoreConfig, tmp_path: Path) -> None:
    uri = f"s3://{DATA_BUCKET}/nope/missing.csv"
    with pytest.raises(DataError) as caught:
        prepare_data(TableDataConfig(source="csv", path=uri, target="label"), 0, LocalStore(tmp_path / "a"), settings)
    assert str(caught.value) == f"data.path: {uri} not found (no such object)"

    data = {"source": "csv", "path": uri, "target": "label"}
    raw = tiny_raw() | {"data": data, "store": settings.model_dump(mode="json")}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with pytest.raises(DataError, match=f"^data.path: {uri} not found"):
        preflight(config_from_dict(raw))


def test_config_rejects_an_s3_path_naming_no_object() -> None:
    with pytest.raises(ValueError, match="names no object"):
        TableDataConfig(source="csv", path=f"s3://{DATA_BUCKET}/", target="label")
