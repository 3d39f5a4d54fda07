"""Checkpoints go to an S3 store in the background (moto's server over loopback HTTP): periodic ones appear
during training, the index names an existing object, the final weights are in the bucket when
`fit_in_folder` returns, a failing upload fails the stage, a slow store does not slow the loop, and a
local store works as before."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_raw
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import StoreConfig, config_from_dict
from trainflow.core.errors import TrainingError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.s3 import S3Store
from trainflow.core.storage.store import ArtifactStore, LocalStore, open_store
from trainflow.core.storage.uploads import BackgroundUploads
from trainflow.core.train import train
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.checkpoint import ModelCheckpoint, periodic_checkpoints
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.trainer import Trainer

PREFIX = "runs"


def _cfg(**train: Any) -> Any:
    settings = {"max_epochs": 10, "max_steps": 20, "checkpoint": {"every_steps": 5, "keep_last": 2}} | train
    return config_from_dict(tiny_raw(train=settings))


def _s3(endpoint: str, bucket: str, cache: Path) -> S3Store:
    store = open_store(StoreConfig(uri=f"s3://{bucket}/{PREFIX}", endpoint_url=endpoint, cache_dir=str(cache)))
    assert isinstance(store, S3Store)
    return store


def _fit(store: ArtifactStore, key: str, cfg: Any, callbacks: list[Callback] | None = None) -> Any:
    data = prepare_data(cfg.data, cfg.seed, store)
    return train(TrainingSpec.of(cfg, data), store, key, callbacks=callbacks or [])


def _keys(endpoint: str, bucket: str, key: str) -> dict[str, int]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/{key}/").get("Contents", [])
    return {o["Key"].rsplit("/", 1)[-1]: o["Size"] for o in listed}


class _Watch(Callback):
    """Records the bucket's checkpoint objects at every step (they arrive while training runs)."""

    def __init__(self, endpoint: str, bucket: str, key: str):
        self.args, self.seen = (endpoint, bucket, key), {}

    def on_step_end(self, trainer: Trainer) -> None:
        self.seen[trainer.state.step] = set(_keys(*self.args))


def test_checkpoints_reach_the_bucket_during_training_and_the_weights_before_the_stage_returns(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    bucket = new_bucket(s3_endpoint, "ckpt-during")
    store = _s3(s3_endpoint, bucket, tmp_path / "cache")
    watch = _Watch(s3_endpoint, bucket, "train/a")
    result = _fit(store, "train/a", _cfg(), [watch])

    during = set().union(*(names for step, names in watch.seen.items() if step < 20))
    assert {"step-000000005.pt", "checkpoints.json"} <= during, "periodic checkpoints arrive while training runs"
    stored = _keys(s3_endpoint, bucket, "train/a")
    assert set(stored) == {"step-000000015.pt", "step-000000020.pt", "checkpoints.json", "best.pt", "model.pt",
                           "diagnosis.json"}  # fmt: skip
    assert result.checkpoint_uri == f"s3://{bucket}/{PREFIX}/train/a/model.pt"
    index = json.loads(
        s3_client(s3_endpoint).get_object(Bucket=bucket, Key=f"{PREFIX}/train/a/checkpoints.json")["Body"].read()
    )
    assert index["latest"] == "step-000000020.pt" and index["step"] == 20
    head = s3_client(s3_endpoint).head_object(Bucket=bucket, Key=f"{PREFIX}/train/a/{index['latest']}")
    assert head["Metadata"]["sha256"] == index["sha256"]
    folder = store.workdir("train/a")
    assert [p.name for p in periodic_checkpoints(folder)] == ["step-000000015.pt", "step-000000020.pt"]


def test_a_failing_upload_fails_the_stage_naming_the_store(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _s3(s3_endpoint, new_bucket(s3_endpoint, "ckpt-fail"), tmp_path / "cache")
    real = S3Store.put_file

    def put_file(self: S3Store, src: Path, key: str) -> str:
        if key.endswith("/step-000000010.pt"):
            raise OSError("connection refused")
        return real(self, src, key)

    monkeypatch.setattr(S3Store, "put_file", put_file)
    match = r"checkpoint upload to s3://ckpt-fail/runs/train/b/step-000000010\.pt failed: connection refused"
    with pytest.raises(TrainingError, match=match):
        _fit(store, "train/b", _cfg())
    stored = _keys(s3_endpoint, store.bucket, "train/b")
    assert "step-000000005.pt" in stored and "model.pt" not in stored, "uploads after the failure are skipped"
    index = s3_client(s3_endpoint).get_object(Bucket=store.bucket, Key=f"{PREFIX}/train/b/checkpoints.json")
    assert json.loads(index["Body"].read())["latest"] == "step-000000005.pt", "the index names an uploaded object"


def test_an_upload_failure_at_the_end_is_awaited_and_raised(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _s3(s3_endpoint, new_bucket(s3_endpoint, "ckpt-fail-end"), tmp_path / "cache")
    real = S3Store.put_file

    def put_file(self: S3Store, src: Path, key: str) -> str:
        if key.endswith("/model.pt"):
            time.sleep(0.3)  # still in flight when fit ends: the stage must wait for it
            raise OSError("disk on fire")
        return real(self, src, key)

    monkeypatch.setattr(S3Store, "put_file", put_file)
    with pytest.raises(
        TrainingError, match=r"upload to s3://ckpt-fail-end/runs/train/c/model\.pt failed: disk on fire"
    ):
        _fit(store, "train/c", _cfg())


@pytest.mark.slow
def test_a_slow_store_does_not_slow_the_loop(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _s3(s3_endpoint, new_bucket(s3_endpoint, "ckpt-slow"), tmp_path / "cache")
    real_put, real_step_end = S3Store.put_file, ModelCheckpoint.on_step_end
    in_loop: dict[int, float] = {}

    def slow_put(self: S3Store, src: Path, key: str) -> str:
        time.sleep(0.5 if key.endswith(".pt") else 0.0)
        return real_put(self, src, key)

    def timed_step_end(self: ModelCheckpoint, trainer: Trainer) -> None:
        started = time.perf_counter()
        real_step_end(self, trainer)
        in_loop[trainer.state.step] = time.perf_counter() - started

    monkeypatch.setattr(S3Store, "put_file", slow_put)
    monkeypatch.setattr(ModelCheckpoint, "on_step_end", timed_step_end)
    _fit(store, "train/d", _cfg())
    saves = [in_loop[s] for s in (5, 10, 15)]  # the queue takes these without waiting (1 in flight + 2 pending)
    assert max(saves) < 0.3, saves
    assert sum(in_loop.values()) < 1.0, "blocking uploads would cost 4 x 0.5 s in the loop"
    assert set(_keys(s3_endpoint, store.bucket, "train/d")) >= {"step-000000020.pt", "model.pt", "best.pt"}


def test_a_local_store_is_used_as_before(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    puts: list[str] = []
    real = LocalStore.put_file
    monkeypatch.setattr(LocalStore, "put_file", lambda self, src, key: puts.append(key) or real(self, src, key))
    submitted: list[str] = []
    monkeypatch.setattr(BackgroundUploads, "submit", lambda self, job, what: submitted.append(what))
    result = _fit(store, "train/e", _cfg())
    assert submitted == [], "no background uploads for a local store"
    assert [k for k in puts if k.startswith("train/")] == ["train/e/model.pt"]  # as before: one in-place put
    # (and the doctor's diagnosis.json, written as bytes)
    folder = store.root / "train/e"
    files = sorted(p.name for p in folder.iterdir() if p.name != ".fit.lock")  # the lock: one fit here at a time
    assert files == ["best.pt", "diagnosis.json", "model.pt", "step-000000015.pt", "step-000000020.pt"]
    assert result.checkpoint_uri == (folder / "model.pt").as_uri()


def test_background_uploads_bound_and_order(tmp_path: Path) -> None:
    order: list[int] = []
    uploads = BackgroundUploads(LocalStore(tmp_path), max_pending=1)
    for n in range(4):
        uploads.submit(lambda n=n: (time.sleep(0.05), order.append(n)), f"job {n}")
    assert uploads.close(timeout_s=10)
    assert order == [0, 1, 2, 3] and uploads.blocked_s > 0.03, "the third submit waited for room"
    uploads.submit(lambda: (_ for _ in ()).throw(OSError("boom")), "s3://b/k")
    uploads.submit(lambda: order.append(99), "s3://b/index")
    with pytest.raises(TrainingError, match="upload to s3://b/k failed: boom"):
        uploads.wait(timeout_s=10)
    assert 99 not in order, "jobs after a failure are skipped"
