"""The publish stage: the trained weights, the resolved config, the evaluation and a manifest
(sha256 and size of every file, data fingerprint, code version, MLflow run ids) written to the
artifact store; the model logged to MLflow with signature and input example, optionally registered.

`verify_manifest` re-hashes a published folder against its manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from core.config import Config
from core.data.prepared import load_splits
from core.errors import StoreError
from core.models import build_model
from core.records import EvaluateResult, PrepareDataResult, PublishedObject, PublishResult, TrainResult
from core.storage.store import ArtifactStore, sha256_file
from core.storage.tracking import fluent_tracking_uri
from core.storage.version import code_version, git_commit
from core.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "trainflow-manifest/1"


def publish(
    config: Config,
    data: PrepareDataResult,
    trained: TrainResult,
    evaluated: EvaluateResult,
    store: ArtifactStore,
    store_key: str,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> PublishResult:
    """Write the published folder `<store>/<store_key>/` and (with a run id) log the model to MLflow."""
    cfg = config.publish
    model_uri, version = None, None
    if cfg.log_mlflow_model and mlflow_run_id is not None and tracking_uri is not None:
        model_uri, version = log_mlflow_model(config, data, trained, store, tracking_uri, mlflow_run_id)

    files = {
        "model.pt": store.local_path(trained.checkpoint_uri).read_bytes(),
        "config.yaml": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode(),
        "evaluation.json": evaluated.model_dump_json(indent=2).encode(),
    }
    objects = [_put(store, content, f"{store_key}/{name}") for name, content in files.items()]
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": cfg.name,
        "files": [
            {"path": name, "sha256": o.sha256, "bytes": o.bytes} for name, o in zip(files, objects, strict=False)
        ],
        "config_sha256": config.sha256(),
        "data_fingerprint": data.fingerprint,
        "code_version": code_version(),
        "git_commit": git_commit(),
        "mlflow_run_id": mlflow_run_id,
        "mlflow_train_run_id": trained.mlflow_run_id,
        "mlflow_model_uri": model_uri,
        "registered_model": {"name": cfg.registered_model_name, "version": version} if version else None,
        "metrics": evaluated.metrics,
    }
    objects.append(_put(store, json.dumps(manifest, indent=2).encode(), f"{store_key}/manifest.json"))
    log.info("publish: %d files to %s", len(objects), objects[-1].uri.rsplit("/", 1)[0])
    return PublishResult(
        objects=objects, manifest_uri=objects[-1].uri, mlflow_model_uri=model_uri, registered_version=version
    )


def verify_manifest(manifest_uri: str, store: ArtifactStore) -> list[str]:
    """Problems found re-hashing the files a manifest lists (an empty list means verified).

    Raises:
        StoreError: the file is not a trainflow manifest (unreadable, not JSON, or without its file list).
    """
    path = store.local_path(manifest_uri)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(entries, list):
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{path}: not a readable trainflow manifest ({type(exc).__name__}: {exc})") from None
    problems = []
    for entry in entries:
        file = path.parent / entry["path"]
        if not file.is_file():
            problems.append(f"{entry['path']}: missing")
        elif (size := file.stat().st_size) != entry["bytes"]:
            problems.append(f"{entry['path']}: {size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    return problems


def log_mlflow_model(
    config: Config, data: PrepareDataResult, trained: TrainResult, store: ArtifactStore, tracking_uri: str, run_id: str
) -> tuple[str, int | None]:
    """`mlflow.pytorch.log_model` with signature and input example into run `run_id`.

    Pickle format with our model code bundled (`code_paths`), so `mlflow.pytorch.load_model` returns
    the original class anywhere; explicit pip requirements skip MLflow's slow inference of them.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model = build_model(config.model, data.spec)
    model.load_state_dict(load_checkpoint(store.local_path(trained.checkpoint_uri))["model"])
    model.eval()
    example = load_splits(store.local_path(data.uri), data.spec).x["test"]
    if data.spec.task == "language_modeling":
        seq_len = data.spec.input_shape[0]
        example = example[: 2 * seq_len].astype("int64").reshape(2, seq_len)  # two windows
    else:
        example = example[:2]
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=config.publish.name,
            signature=infer_signature(example, output),
            input_example=example,
            serialization_format="pickle",
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "scikit-learn"],
            registered_model_name=config.publish.registered_model_name,
        )
    version = info.registered_model_version
    return info.model_uri, int(version) if version is not None else None


def _put(store: ArtifactStore, content: bytes, key: str) -> PublishedObject:
    uri = store.put_bytes(content, key)
    return PublishedObject(uri=uri, sha256=sha256_file(store.local_path(uri)), bytes=len(content))
