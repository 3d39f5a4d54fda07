"""Search workers on other machines: the join record node 0's hpo_search stage leaves in its study, and how
`trainflow tune-worker` finds it and becomes one more worker of that study.

A worker cannot rebuild the study from its config alone: the study's name hashes the LR the range test
resolved and the data's fingerprint, and a trial needs the resolved search space, the prepared data and the
hpo_search run to log under. So node 0 stores them in the study's user attributes (`JOIN_ATTR`), keyed by
`tune.hpo.study_name` or the config's hash (`KEY_ATTR`); the worker waits for a study with its key. Nothing in
the record is secret: URLs keep their `${VAR}` references (`core.config.secrets`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import TypeAdapter

from trainflow.core.config import Config, HPOConfig, ParamSpec
from trainflow.core.errors import ConfigError, DataError, TrackingError
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.tracking.runs import RunLogger
from trainflow.core.training.spec import TrainingSpec

if TYPE_CHECKING:  # the pipeline imports `join_key` from here without loading Optuna
    import optuna

    from trainflow.core.tuning.hpo_worker import SearchJob

log = logging.getLogger(__name__)

KEY_ATTR, JOIN_ATTR = "trainflow.join_key", "trainflow.join"
_SPACE = TypeAdapter(dict[str, ParamSpec])


def write_join_record(study: optuna.Study, key: str, job: SearchJob) -> None:
    """Node 0: what a worker elsewhere needs to run this study's trials."""
    parent = job.parent_run
    record = {
        "hpo": job.hpo.model_dump(mode="json"),
        "space": _SPACE.dump_python(job.space, mode="json"),
        "spec": job.spec.model_dump(mode="json"),
        "seed": job.seed,
        "parent_run_id": parent.run_id if parent else None,
        "experiment_id": parent.experiment_id if parent else None,
        "node": socket.gethostname(),
    }
    study.set_user_attr(JOIN_ATTR, json.dumps(record))
    study.set_user_attr(KEY_ATTR, key)


def join_key(config: Config) -> str:
    """What node 0 and its workers agree on without talking: the study name when given, else the config's hash
    (with `--set` overrides applied; passwords hidden, so a worker with its own copy of a URL gets the same)."""
    return config.tune.hpo.study_name or config.sha256()


def wait_for_study(storage: optuna.storages.RDBStorage, key: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """The newest study in `storage` whose join key is `key`, once node 0 has created it.

    Raises:
        ConfigError: none appeared within `timeout_s` (one line: what to check).
    """
    import optuna

    deadline = time.monotonic() + timeout_s
    while True:
        found = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.user_attrs.get(KEY_ATTR) == key and JOIN_ATTR in s.user_attrs]  # fmt: skip
        if found:
            return max(found, key=lambda s: s._study_id).study_name
        if time.monotonic() > deadline:
            raise ConfigError(
                f"tune-worker: no search of this config appeared in tune.hpo.storage within {timeout_s:g} s; start "
                "`trainflow run` with the same config and --set values on node 0 (or raise --wait)"
            )
        time.sleep(poll_s)


def worker_job(
    study: optuna.Study,
    storage_url: str,
    store: ArtifactStore,
    tracking_uri: str,
    prepare: Callable[[], PrepareDataResult],
) -> SearchJob:
    """This machine's `SearchJob` for node 0's study: its record, this machine's store (the data prepared again
    here by `prepare` when node 0's prepared file is not in it, and checked to be the same) and this machine's
    MLflow client on the hpo_search run (which must be the same MLflow).

    Raises:
        DataError: the data prepared here differs from node 0's (another file, another version).
        TrackingError: node 0's hpo_search run is not in this machine's MLflow.
    """
    from trainflow.core.tuning.hpo_worker import SearchJob

    record = json.loads(study.user_attrs[JOIN_ATTR])
    spec = TrainingSpec.model_validate(record["spec"])
    in_this_store = spec.data.uri.startswith(store.uri.rstrip("/") + "/")  # a shared s3:// store: node 0's files
    if not (in_this_store and store.exists(spec.data.uri)):
        log.info("tune-worker: node 0's prepared data is not in this store; preparing it here")
        data = prepare()
        if data.fingerprint != spec.data.fingerprint:
            raise DataError(
                f"{data.source}: the data prepared here (fingerprint {data.fingerprint[:12]}) differs from node 0's "
                f"({spec.data.fingerprint[:12]}); give both machines the same data"
            )
        spec = spec.model_copy(update={"data": data})
    parent = None
    if record["parent_run_id"] is not None:
        from trainflow.core.tracking.backend import client_for

        client = client_for(tracking_uri)
        try:
            client.get_run(record["parent_run_id"])
        except Exception:  # MLflow raises its own error or the database driver's: the message below says it all
            raise TrackingError(
                f"tracking.uri: node 0's hpo_search run {record['parent_run_id']} is not in this machine's MLflow; "
                "point tracking.uri (or MLFLOW_TRACKING_URI) at the MLflow node 0 logs to"
            ) from None
        parent = RunLogger(client, record["parent_run_id"], record["experiment_id"])
    return SearchJob(
        hpo=HPOConfig.model_validate(record["hpo"]),
        space=_SPACE.validate_python(record["space"]),
        spec=spec,
        store=store,
        storage=storage_url,
        study_name=study.study_name,
        seed=record["seed"],
        worker=1000 + os.getpid() % 100_000,  # its own sampler seed stream, apart from node 0's workers 0..n
        torch_threads=None,
        parent_run=parent,
    )
