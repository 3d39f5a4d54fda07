"""Resume from S3 on a machine with no local copy: a training process on an s3:// store (moto's server
over loopback HTTP) is killed with SIGKILL mid-epoch, the local cache and working folders are deleted,
and the re-run continues from the last uploaded checkpoint, ending with the weights of an uninterrupted
run; what was already in the bucket is not uploaded again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import StoreConfig, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import TrainResult
from trainflow.core.storage.s3 import S3Store
from trainflow.core.storage.store import open_store
from trainflow.core.train import train
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.spec import TrainingSpec

pytestmark = pytest.mark.slow  # trainings killed and resumed against S3: left out of `pytest -m 'not slow'`

RAW = {
    "seed": 3,
    "data": {"source": "synthetic", "n_samples": 5000, "n_features": 32, "n_classes": 4},
    "model": {"name": "mlp", "hidden_sizes": [128, 128], "dropout": 0.1},
    "optim": {"lr": 0.003},
    "train": {"max_epochs": 2, "batch_size": 16, "progress_bar": False, "checkpoint": {"every_steps": 20},
              "early_stopping": {"patience": 50}},
}  # fmt: skip
STEPS_PER_EPOCH = 219  # 3500 training rows / 16
BUCKET, PREFIX, KEY = "trainflow-resume", "team", "stages/train/abc"
CHILD = """
import json, sys
from trainflow.core.config import StoreConfig, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import open_store
from trainflow.core.train import train
from trainflow.core.training.spec import TrainingSpec
raw, settings, key = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cfg, store = config_from_dict(raw), open_store(StoreConfig(**settings))
data = prepare_data(cfg.data, cfg.seed, store)
train(TrainingSpec.of(cfg, data), store, key)
"""


def _settings(endpoint: str, cache: Path) -> dict[str, Any]:
    return {"uri": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": endpoint, "cache_dir": str(cache)}


def _train(settings: dict[str, Any], key: str, puts: Counter[str] | None = None) -> tuple[TrainResult, S3Store]:
    store = open_store(StoreConfig(**settings))
    assert isinstance(store, S3Store)
    if puts is not None:  # every object key this store's client starts an upload of
        for op in ("PutObject", "CreateMultipartUpload"):
            store.client.meta.events.register(
                f"before-parameter-build.s3.{op}", lambda params, **_: puts.update([params["Key"]])
            )
    cfg = config_from_dict(RAW)
    data = prepare_data(cfg.data, cfg.seed, store)
    return train(TrainingSpec.of(cfg, data), store, key), store


def _index(endpoint: str) -> dict[str, Any] | None:
    try:
        answer = s3_client(endpoint).get_object(Bucket=BUCKET, Key=f"{PREFIX}/{KEY}/checkpoints.json")
    except Exception:
        return None
    return json.loads(answer["Body"].read())  # type: ignore[no-any-return]


def _bucket_keys(endpoint: str) -> set[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_sigkill_then_rerun_without_local_files_resumes_from_the_bucket(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    new_bucket(s3_endpoint, BUCKET)
    killed = _settings(s3_endpoint, tmp_path / "machine-a" / "cache")
    command = [sys.executable, "-c", CHILD, json.dumps(RAW), json.dumps(killed), KEY]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while (index := _index(s3_endpoint)) is None or index["step"] < 60:
            assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    index = _index(s3_endpoint)
    assert index is not None and 0 < index["step"] < STEPS_PER_EPOCH, "killed mid-epoch"
    assert f"{PREFIX}/{KEY}/model.pt" not in _bucket_keys(s3_endpoint), "training had not finished"
    shutil.rmtree(tmp_path / "machine-a")  # no local copy of anything: cache, data and working folder gone
    before = _bucket_keys(s3_endpoint)

    puts: Counter[str] = Counter()
    resumed, store = _train(_settings(s3_endpoint, tmp_path / "machine-b" / "cache"), KEY, puts)
    reference, _ = _train(_settings(s3_endpoint, tmp_path / "machine-c" / "cache"), "stages/train/reference")

    assert resumed.resumed_from_step == index["step"]
    assert resumed.steps == reference.steps == 2 * STEPS_PER_EPOCH
    assert resumed.best_val_loss == reference.best_val_loss
    expected = load_checkpoint(store.local_path(reference.checkpoint_uri))["model"]
    actual = load_checkpoint(store.local_path(resumed.checkpoint_uri))["model"]
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    sent_again = {key for key in puts if key in before and not _after(key, index["step"])}
    assert sent_again == {f"{PREFIX}/{KEY}/checkpoints.json"}, "only the index (new content) is written again"
    assert puts[f"{PREFIX}/{KEY}/model.pt"] == 1, "the final weights went up once (fit_in_folder's put only checks)"


def _after(key: str, step: int) -> bool:
    """A periodic checkpoint past the index's step: uploaded when the kill came before the index named it,
    so the resumed run (from `step`) legitimately writes it again."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith("step-") and int(name[5:].split(".")[0]) > step
