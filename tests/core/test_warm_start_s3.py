"""`model.init_from: s3://.../manifest.json`: a published folder in a bucket (the S3 server on loopback) is a warm
start; its weights are fetched once into the store's cache, checked against the manifest, and loaded."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_raw
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import config_from_dict
from trainflow.core.errors import ConfigError
from trainflow.core.models import build_model
from trainflow.core.models.warm_start import warm_start_of
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.initial import initial_model
from trainflow.core.training.spec import TrainingSpec


def _put(endpoint: str, bucket: str, key: str, data: bytes) -> dict[str, object]:
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)
    return {"path": key.rsplit("/", 1)[1], "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_a_published_folder_in_a_bucket_is_a_warm_start(s3_endpoint: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_endpoint, "warm-start")
    raw = tiny_raw() | {"store": {"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint,
                                  "cache_dir": str(tmp_path / "cache")}}  # fmt: skip
    cfg = config_from_dict(raw)
    data = prepare_data(cfg.data, cfg.seed, LocalStore(tmp_path / "local"))
    torch.manual_seed(7)
    parent = build_model(cfg.model, data.spec).state_dict()
    buffer = io.BytesIO()
    torch.save({"model": parent, "step": 3}, buffer)
    entry = _put(s3_endpoint, bucket, "published/wine/model.pt", buffer.getvalue())
    manifest = {"format": "trainflow-manifest/1", "files": [entry], "data_fingerprint": "f" * 64}
    _put(s3_endpoint, bucket, "published/wine/manifest.json", json.dumps(manifest).encode())

    child = cfg.with_values({"model.init_from": f"s3://{bucket}/published/wine/manifest.json"})
    warm = warm_start_of(child)
    assert warm is not None and warm.weights_uri == f"s3://{bucket}/published/wine/model.pt"
    assert (warm.sha256, warm.data_fingerprint) == (entry["sha256"], "f" * 64)
    model = initial_model(TrainingSpec.of(child, data))
    for name, tensor in parent.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)

    missing = cfg.with_values({"model.init_from": f"s3://{bucket}/published/gone/manifest.json"})
    with pytest.raises(ConfigError, match=r"model.init_from: s3://warm-start/published/gone/manifest.json: no such"):
        warm_start_of(missing)
