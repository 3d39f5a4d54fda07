"""How a pipeline run presents itself in MLflow's UI: its source (Source and Version columns) and its data
splits as dataset inputs (Dataset column), without reading the data again."""

from __future__ import annotations

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from trainflow.core.data.sources import normalized_dataset_uri
from trainflow.core.records import PrepareDataResult

# MLflow's own digests are 8 hex digits and it stores 36 at most; 16 is the store folder `data/<digest>/`.
DIGEST_LENGTH = 16
# split -> the `mlflow.data.context` input tag
SPLIT_CONTEXTS = {"train": "train", "val": "validation", "test": "testing"}
_ROOT = Path(__file__).resolve().parents[2]  # core/tracking/run_meta.py -> the checkout holding this code


def source_tags(config_path: str) -> dict[str, str]:
    """The run's source: a JOB named by its config path (the UI shows a JOB's name in full, a LOCAL
    source's basename only), the config file's absolute path, and the checkout's git branch and remote."""
    return {
        "mlflow.source.name": config_path,
        "mlflow.source.type": "JOB",
        "trainflow.config_path": str(Path(config_path).resolve()),
        **_git_tags(),
    }


def log_dataset_input(client: Any, run_id: str, data: PrepareDataResult) -> None:
    """Log the train, validation and test splits as the run's dataset inputs: one dataset per split, named
    `<source>-<split>`, digest the data fingerprint's prefix, source the dataset URI, rows in the profile.
    Logging again (a continued run, a cached stage) adds nothing: MLflow keys inputs by name and digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = data.dataset_uri or normalized_dataset_uri(data.source)  # a record written before the field
    source_type = "s3" if uri.startswith("s3://") else "local" if uri.startswith("file://") else "code"
    rows = {"train": data.n_train, "val": data.n_val, "test": data.n_test}
    inputs = [
        DatasetInput(
            Dataset(
                name=f"{_short_name(uri)}-{split}",
                digest=data.fingerprint[:DIGEST_LENGTH],
                source_type=source_type,
                source=json.dumps({"uri": uri}),  # the form of MLflow's own local and S3 sources
                profile=json.dumps({"num_rows": rows[split]}),
            ),
            [InputTag(MLFLOW_DATASET_CONTEXT, context)],
        )
        for split, context in SPLIT_CONTEXTS.items()
    ]
    client.log_inputs(run_id, datasets=inputs)


def _short_name(uri: str) -> str:
    """`wine` for sklearn:wine, `sales` for file:///data/sales.csv or s3://bucket/sales.parquet."""
    return PurePosixPath(uri.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]).stem


@lru_cache(maxsize=1)
def _git_tags() -> dict[str, str]:
    """`mlflow.source.git.branch` and `.repoURL` (credentials removed) of the checkout; none outside git.
    The commit is set by the pipeline run itself (`core.storage.version.git_commit`)."""
    tags: dict[str, str] = {}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":  # "HEAD": a detached checkout has no branch
        tags["mlflow.source.git.branch"] = branch
    remote = _git("config", "--get", "remote.origin.url")
    if remote:
        tags["mlflow.source.git.repoURL"] = re.sub(r"//[^/@]*@", "//", remote)  # https://user:token@host/...
    return tags


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
