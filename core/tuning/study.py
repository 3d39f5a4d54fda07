"""The parts of an Optuna study the HPO workers share: sampler, pruner, RDB storage, and how
categorical choices that Optuna cannot hold (lists, mappings) travel through it."""

from __future__ import annotations

import json
import warnings
from typing import Any

import optuna
from sqlalchemy import event

from trainflow.core.config import CategoricalParam, HPOConfig, ParamSpec
from trainflow.core.config.secrets import resolve


def make_sampler(
    hpo: HPOConfig, space: dict[str, ParamSpec], seed: int, worker: int = 0, existing_trials: int = 0
) -> optuna.samplers.BaseSampler:
    """`hpo.sampler`, with a seed stream per worker and per continuation, so neither parallel workers
    nor a continued study draw the points already drawn."""
    seed = seed + 1000 * worker + 100_003 * existing_trials
    if hpo.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if hpo.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if hpo.sampler == "grid":
        grid = {path: optuna_choices(p) for path, p in space.items() if isinstance(p, CategoricalParam)}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(hpo.n_trials))


def tpe_startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the space: Optuna's default 10 would leave a 12-trial budget nearly
    unguided, so a third of the budget, between 3 and 10."""
    return max(3, min(10, n_trials // 3))


def make_pruner(hpo: HPOConfig) -> optuna.pruners.BasePruner:
    if hpo.pruner == "median":
        # Steps are evaluation counts (1, 2, ...): warm-up n means pruning starts at evaluation n + 1.
        return optuna.pruners.MedianPruner(
            n_startup_trials=hpo.pruner_startup_trials, n_warmup_steps=hpo.pruner_warmup_evals
        )
    if hpo.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=hpo.max_epochs_per_trial, reduction_factor=3)
    return optuna.pruners.NopPruner()


def rdb_storage(url: str, hpo: HPOConfig | None = None) -> optuna.storages.RDBStorage:
    """The study's storage, its `${VAR}` references resolved here. On a shared database (`hpo.storage` given),
    each running trial sends a heartbeat every `hpo.heartbeat_interval_s`; one silent for `hpo.grace_period_s`
    (its worker died) is failed by the next worker that starts a trial, and its parameters re-queued (up to
    `hpo.max_retries` times). SQLite waits for a lock instead of failing when several workers write at once, and
    runs in WAL mode with synchronous=NORMAL, so a commit does not wait for the disk: a trial commits ~20 times
    (ask, each suggestion, each report, tell), which took 0.04-0.3 s per trial here with the default rollback
    journal, by how busy the disk was, against 0.02-0.06 s now (a 6-epoch digits trial trains for ~1.3 s). A
    crashed process loses nothing, a power cut at most the last commits, never the file's integrity. WAL needs
    the file on a local disk, as SQLite's locking does anyway: on a network file system use a database server."""
    url = resolve(url, "tune.hpo.storage")  # the connection is made here: nothing keeps the resolved URL
    heartbeat: dict[str, Any] = {}
    if hpo is not None and hpo.storage is not None:
        heartbeat = {"heartbeat_interval": hpo.heartbeat_interval_s, "grace_period": hpo.grace_period_s,
                     "heartbeat_stale_trial_callback": quietly(optuna.storages.RetryHeartbeatStaleTrialCallback,
                                                               max_retry=hpo.max_retries)}  # fmt: skip
    if not url.startswith("sqlite"):
        return quietly(optuna.storages.RDBStorage, url, **heartbeat)
    storage = quietly(optuna.storages.RDBStorage, url, engine_kwargs={"connect_args": {"timeout": 60}}, **heartbeat)
    event.listen(storage.engine, "connect", _commit_without_fsync)
    storage.engine.dispose()  # the connection that created the tables reconnects, with the pragmas
    return storage


def quietly(call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)` without Optuna's ExperimentalWarning: heartbeats and the stale-trial callback have
    been "experimental" since Optuna 2.8 and are what Optuna's docs recommend for distributed studies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return call(*args, **kwargs)


def _commit_without_fsync(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file: the first connection switches it
    cursor.execute("PRAGMA synchronous=NORMAL")  # per connection
    cursor.close()


_ENCODED = "json:"


def optuna_choices(spec: CategoricalParam) -> list[Any]:
    """Optuna takes scalar choices only; lists and mappings travel as tagged JSON strings."""
    return [
        c if isinstance(c, bool | int | float | str) or c is None else _ENCODED + json.dumps(c) for c in spec.choices
    ]


def from_optuna(value: Any) -> Any:
    return json.loads(value.removeprefix(_ENCODED)) if isinstance(value, str) and value.startswith(_ENCODED) else value
