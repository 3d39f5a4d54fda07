"""The publish stage: the trained weights, the resolved config, the evaluation and a manifest
(sha256 and size of every file, data fingerprint, code version, MLflow run ids) written to the
artifact store; the served model logged to MLflow (raw inputs in, preprocessing inside, see
core/serving/), with signature and input example, optionally registered with the candidate alias and,
when it beats the champion on the same test data, the champion alias (core/serving/registry.py).

`verify_manifest` re-hashes a published folder against its manifest.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from urllib.parse import quote

import yaml

from trainflow.core.config import Config, PublishConfig
from trainflow.core.errors import StoreError
from trainflow.core.records import (
    CompressResult,
    EvaluateResult,
    PublishedObject,
    PublishResult,
    TrainResult,
)
from trainflow.core.serving.champion import served_scores
from trainflow.core.serving.registry import (
    TAG,
    Decision,
    champion_metric,
    judge,
    promote_margin,
    record,
    served_metrics,
)
from trainflow.core.storage.files import sha256_file
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.storage.version import code_version, git_commit
from trainflow.core.tracking.runs import RunLogger
from trainflow.core.training.checkpoint import trained_model
from trainflow.core.training.spec import TrainingSpec

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "trainflow-manifest/1"


def publish(
    config: Config,
    spec: TrainingSpec,
    trained: TrainResult,
    evaluated: EvaluateResult,
    store: ArtifactStore,
    store_key: str,
    run: RunLogger | None = None,
    compressed: CompressResult | None = None,
) -> PublishResult:
    """Write the published folder `<store>/<store_key>/` and (with `run`, the stage's MLflow run) log the served
    model to MLflow: the compress stage's recommended variant when it ran, else the trained weights.

    `config` is the run's tuned config (written as config.yaml; its `publish` section applies), `spec` the
    training it made. The folder holds the fp32 weights (`model.pt`) and, beside them, the recommended variant's
    file (`recommended/<file>`) with the comparison table it was picked from; the manifest lists both.

    A registered version gets `publish.alias`, and `publish.champion_alias` when it beats the champion
    (`core.serving.registry`); the decision goes into the manifest, then the aliases and tags are set.

    Raises:
        ConfigError: `publish.champion_metric` is not a test metric of the task (before anything is written).
    """
    cfg, data = config.publish, spec.data
    metric, higher_is_better = champion_metric(cfg, data.spec.task)
    recommended = compressed.variant(compressed.recommended) if compressed else None
    served_model = store.local_path(recommended.uri) if recommended and recommended.uri else None
    model_uri, version = None, None
    if cfg.log_mlflow_model and run is not None:
        model_uri, version = log_mlflow_model(cfg, spec, trained, store, run, served_model=served_model)
    variant, figures = served_metrics(evaluated, compressed)  # the served model's, judged for the champion
    registered = (cfg.registered_model_name, version) if cfg.registered_model_name and version is not None else None
    decision, aliases = None, []
    if run is not None and registered is not None:
        decision = judge(
            run.client,
            *registered,
            champion_alias=cfg.champion_alias,
            metric=metric,
            higher_is_better=higher_is_better,
            metrics=figures,
            margin=promote_margin(cfg, higher_is_better),
            score_champion=lambda uri: served_scores(uri, data, store, run.tracking_uri),
        )
        aliases = [cfg.alias] + ([cfg.champion_alias] if decision.promote else [])

    files = {
        "model.pt": _fp32_weights(spec, trained, store),
        "config.yaml": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode(),
        "evaluation.json": evaluated.model_dump_json(indent=2).encode(),
    }
    if compressed and served_model is not None:
        files[f"recommended/{served_model.name}"] = served_model.read_bytes()
        files["compression.md"] = store.local_path(compressed.table_uri).read_bytes()
    if data.preprocessor_uri:  # what turns raw rows into model inputs (the MLflow model carries it too)
        files["preprocessor.pkl"] = store.local_path(data.preprocessor_uri).read_bytes()
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
        "model_code": spec.model_code,
        "git_commit": git_commit(),
        "mlflow_run_id": run.run_id if run is not None else None,
        "mlflow_train_run_id": trained.mlflow_run_id,
        "parent": spec.warm_start.model_dump(mode="json") if spec.warm_start else None,  # lineage: what it grew from
        "mlflow_model_uri": model_uri,
        "registered_model": _registered_entry(config, version, aliases, metric, decision),
        "metrics": evaluated.metrics,
        "class_names": data.spec.class_names,  # what the model's outputs are called, in order
        "recommended": _recommended_entry(compressed, served_model),
    }
    objects.append(_put(store, json.dumps(manifest, indent=2).encode(), f"{store_key}/manifest.json"))
    if run is not None and registered is not None and decision is not None:  # after the manifest it names
        tags = {
            "manifest_uri": objects[-1].uri,
            "data_fingerprint": data.fingerprint,
            "config_sha256": config.sha256(),
            "variant": variant,
            "champion_metric": metric,
        } | {k.removeprefix(TAG): v for k, v in (trained.run_tags()).items()}
        aliases = record(
            run.client,
            *registered,
            decision,
            alias=cfg.alias,
            champion_alias=cfg.champion_alias,
            tags=tags,
            metrics=figures,
            run=run,
        )
    log.info("publish: %d files to %s", len(objects), objects[-1].uri.rsplit("/", 1)[0])
    return PublishResult(
        objects=objects,
        manifest_uri=objects[-1].uri,
        mlflow_model_uri=model_uri,
        registered_version=version,
        recommended=recommended.name if recommended else None,
        registered_model=cfg.registered_model_name if version is not None else None,
        aliases=aliases,
        champion_decision=decision.name if decision else None,
        champion_reason=decision.reason if decision else None,
        challenger_score=decision.challenger_score if decision else None,
        champion_score=decision.champion_score if decision else None,
    )


def _registered_entry(
    config: Config, version: int | None, aliases: list[str], metric: str, decision: Decision | None
) -> dict[str, object] | None:
    """The registry as the manifest states it: name, version, the aliases set and the champion decision."""
    if version is None:
        return None
    entry: dict[str, object] = {"name": config.publish.registered_model_name, "version": version, "aliases": aliases}
    if decision is not None:
        entry |= {"champion_metric": metric, "champion_decision": decision.name, "champion_reason": decision.reason,
                  "challenger_score": decision.challenger_score, "champion_score": decision.champion_score,
                  "champion_version": decision.champion_version}  # fmt: skip
    return entry


def _recommended_entry(compressed: CompressResult | None, served_model: Path | None) -> dict[str, object] | None:
    """The shipped variant as the manifest states it: its file, runtime, figures and why it was picked."""
    if compressed is None or served_model is None:
        return None
    v = compressed.variant(compressed.recommended)
    return {
        "name": v.name,
        "path": f"recommended/{served_model.name}",
        "runtime": v.runtime,
        "reason": compressed.reason,
        "metrics": v.metrics,
        "latency_ms_p50": v.latency_ms_p50,
        "size_bytes": v.size_bytes,
        "threads": compressed.threads,
    }


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
    folder = manifest_uri.rsplit("/", 1)[0]  # listed files are fetched through the store (S3: downloaded)
    problems = []
    for entry in entries:
        uri = f"{folder}/{quote(entry['path']) if folder.startswith('file:') else entry['path']}"
        try:
            file = store.local_path(uri) if store.exists(uri) else None
        except StoreError as exc:
            problems.append(f"{entry['path']}: {exc}")
            continue
        if file is None or not file.is_file():
            problems.append(f"{entry['path']}: missing")
        elif (size := file.stat().st_size) != entry["bytes"]:
            problems.append(f"{entry['path']}: {size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    return problems


def log_mlflow_model(
    cfg: PublishConfig,
    spec: TrainingSpec,
    trained: TrainResult,
    store: ArtifactStore,
    run: RunLogger,
    served_model: Path | None = None,
) -> tuple[str, int | None]:
    """The raw-input pyfunc (`core.serving.mlflow_model.log_serving_model`) into `run`.

    Without `served_model` (no compress stage), the trained fp32 weights go as a torch.export program (or
    TorchScript), so the logged model carries no trainflow code and loads where trainflow is not installed.
    """
    import torch

    from trainflow.core.compression.quantization import save_torch_model
    from trainflow.core.serving.mlflow_model import log_serving_model

    with tempfile.TemporaryDirectory() as tmp:
        if served_model is None:
            model = trained_model(spec, store, trained.checkpoint_uri)
            dtype = torch.int64 if spec.data.spec.task == "language_modeling" else torch.float32
            served_model = save_torch_model(
                model, torch.zeros(1, *spec.data.spec.input_shape, dtype=dtype), Path(tmp) / "model"
            )
        info = log_serving_model(
            served_model,
            spec.data,
            store,
            name=cfg.name,
            run=run,
            registered_model_name=cfg.registered_model_name,
        )
    return info.model_uri, info.registered_version


def _fp32_weights(spec: TrainingSpec, trained: TrainResult, store: ArtifactStore) -> bytes:
    """The published model.pt: the fit's file, or for a LoRA fit (whose file holds adapters) the merged weights,
    which load into the plain model and serve without peft."""
    if spec.model.lora is None:
        return store.local_path(trained.checkpoint_uri).read_bytes()
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"model": trained_model(spec, store, trained.checkpoint_uri).state_dict(), "merged_lora": True}, buffer)
    return buffer.getvalue()


def _put(store: ArtifactStore, content: bytes, key: str) -> PublishedObject:
    uri = store.put_bytes(content, key)
    return PublishedObject(uri=uri, sha256=sha256_file(store.local_path(uri)), bytes=len(content))
