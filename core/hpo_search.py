"""The hpo_search stage: an Optuna study over `tune.hpo.space`, trials trained for a short budget,
unpromising ones pruned at an epoch's evaluation (Hyperband by default), `parallelism` worker
processes at a time.

The study lives in RDB storage (SQLite in the store unless `tune.hpo.storage` names one) under a
name derived from the config, so a re-run continues it: trial numbers go on where they stopped.
Builds on core/tuning/: hpo_worker.py (a worker's trial loop: the trial's spec, Trainer, pruning callback,
MLflow child run per trial), plan.py (the search space's LR bounds) and study.py (sampler, pruner, storage).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import optuna

from trainflow.core.config import HPOConfig
from trainflow.core.data.spec import check_metric
from trainflow.core.errors import TrainingError
from trainflow.core.records import HPOSearchResult, LRRangeTestResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.tracking.runs import RunLogger
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.tuning.hpo_worker import (
    Claim,
    SearchJob,
    counted_trials,
    finish_study,
    has_worked,
    new_claim,
    run_worker,
    serve,
    start_worker_server,
    stop_if_idle,
    worker_args,
)
from trainflow.core.tuning.join import write_join_record
from trainflow.core.tuning.plan import resolve_space
from trainflow.core.tuning.study import from_optuna, rdb_storage

log = logging.getLogger(__name__)


def hpo_search(
    cfg: HPOConfig,
    spec: TrainingSpec,
    lr_range: LRRangeTestResult | None,
    store: ArtifactStore,
    store_key: str,
    parent_run: RunLogger | None = None,
    join_key: str | None = None,
) -> HPOSearchResult:
    """Run (or continue) the study until it holds `cfg.n_trials` trials; return the best parameters.

    Every trial trains `spec` (`core.tuning.plan.search_spec`) with its drawn values, for the trial budget.
    With `parent_run` (the stage's MLflow run) every trial is logged as a child run of it. On a shared
    `cfg.storage`, the study carries a join record under `join_key` (`core.tuning.join`): `trainflow tune-worker`
    on other machines joins it, and this stage ends when no trial is running anywhere (`finish_study`).

    Raises:
        ConfigError: the metric is not one the data's task has, or given LR bounds clash with the
            derived ones (before any trial).
        TrainingError: optim.lr needs the range test's suggestion and there is none; or no trial
            completed (the message carries the first failure).
    """
    check_metric(cfg.metric, spec.data.spec.task, "tune.hpo.metric")
    space, lr_bounds = resolve_space(cfg.space, lr_range)
    storage = cfg.storage or f"sqlite:///{store.workdir('hpo') / 'optuna.db'}"
    name = cfg.study_name or _study_name(cfg, spec)
    job = SearchJob(cfg, space, spec, store, storage, name, cfg.seed if cfg.seed is not None else spec.seed, 0, None,
                    parent_run)  # fmt: skip
    with _spawned_workers(job, min(cfg.parallelism, cfg.n_trials) - 1) as release:  # they warm up meanwhile
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log lines say what happens; Optuna's repeat them
        rdb = rdb_storage(storage, cfg)
        study = optuna.create_study(study_name=name, storage=rdb, direction=cfg.direction, load_if_exists=True)
        if cfg.storage is None:  # the study is this machine's alone: a RUNNING trial is one whose worker died
            _fail_interrupted(study)
        elif join_key is not None:  # workers elsewhere may join (heartbeats fail a dead one's trials)
            write_join_record(study, join_key, job)
        before = counted_trials(study.get_trials(deepcopy=False))
        workers = min(cfg.parallelism, max(1, cfg.n_trials - before))
        threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
        log.info("hpo_search: study %s has %d trials; running to %d with %d worker(s)", name, before, cfg.n_trials,
                 workers)  # fmt: skip
        release(workers - 1, threads)
        run_worker(replace(job, torch_threads=threads), storage=rdb)
    if cfg.storage is not None:
        finish_study(job, rdb)

    study = optuna.load_study(study_name=name, storage=rdb)
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
        raise TrainingError(
            f"hpo_search: none of {len(trials)} trials completed" + (f"; first error: {errors[0]}" if errors else "")
        )
    best = min(complete, key=lambda t: t.value) if cfg.direction == "minimize" else max(complete, key=lambda t: t.value)
    params = {path: from_optuna(value) for path, value in best.params.items()}
    return HPOSearchResult(
        study_name=name,
        storage=storage,  # passwords hidden as references (core.config.secrets): safe to store, and it opens
        n_trials=len(trials),
        n_complete=len(complete),
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
        best_params=params,
        best_value=float(best.value),
        best_trial=best.number,
        metric=cfg.metric,
        direction=cfg.direction,
        lr_bounds=lr_bounds,
        importances=_importances(study),
        plot_uri=store.put_bytes(_history_png(study), f"{store_key}/optimization_history.png"),
    )


def _fail_interrupted(study: optuna.Study) -> None:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        log.warning("hpo_search: trial %d was left running by an interrupted run; marked failed", trial.number)


@contextmanager
def _spawned_workers(job: SearchJob, count: int) -> Iterator[Callable[[int, int | None], None]]:
    """Workers 1..count in their own processes (their own interpreter and torch threads), started at once.

    A fresh process spends ~4-5 s of CPU on imports and first calls before its first training step (a 6-epoch
    digits trial trains for ~1.3 s), so workers are forked from a server that has done the imports
    (`hpo_worker.start_worker_server`: once per process, kept for later searches; spawned where there is
    none), and started before the study is opened, to do the rest meanwhile (`hpo_worker.serve`). They start
    off this thread: while the server still imports, the stage waits for it only to stop a worker. Yields
    `release(n, threads)`: the first n go to work with `threads` torch threads each, the others stop. Leaving
    the block stops those that have not taken up work (no trial is left for them; after a failure, none
    should start) and waits for the others.
    """
    context = multiprocessing.get_context(start_worker_server() if count > 0 else "spawn")
    workers: list[tuple[BaseProcess, Connection, Claim]] = []
    failed: list[str] = []
    stopped: set[str] = set()  # terminated by us while idle: their exit code is ours, not a failure
    started: set[str] = set()

    def start_all(theirs: list[Connection]) -> None:
        for (process, _, _), end in zip(workers, theirs, strict=True):
            try:
                process.start()
                started.add(process.name)
            except Exception:
                log.exception("hpo_search: could not start %s", process.name)
                failed.append(process.name)
            finally:
                end.close()

    def stop_idle(stopping: list[tuple[BaseProcess, Connection, Claim]]) -> None:
        starter.join()  # at once unless the server still imports: then only when stopping before any work
        for process, _, claim in stopping:
            if process.name not in started or process.name in stopped:  # not started: its failure is noted
                continue
            if process.exitcode not in (None, 0):  # died warming up
                failed.append(process.name)
            if stop_if_idle(claim):
                process.terminate()  # it has only warmed up: nothing of it is stored
                stopped.add(process.name)

    def release(n: int, threads: int | None) -> None:
        for _, conn, _ in workers[:n]:
            with suppress(OSError):  # one that died warming up (or never started) is reported on leaving
                conn.send(threads)
        if workers[n:]:
            stop_idle(workers[n:])

    theirs: list[Connection] = []
    for worker in range(1, count + 1):
        end, ours = context.Pipe(duplex=False)
        claim = new_claim(context)
        process = context.Process(target=serve, args=worker_args(replace(job, worker=worker), end, claim),
                                  name=f"hpo-worker-{worker}")  # fmt: skip
        workers.append((process, ours, claim))
        theirs.append(end)
    starter = threading.Thread(target=start_all, args=(theirs,), name="hpo-worker-start", daemon=True)
    starter.start()
    try:
        yield release
    finally:
        stop_idle(workers)
        for process, conn, _ in workers:
            conn.close()
            if process.name in started:
                process.join()
    failed += [p.name for p, _, claim in workers if has_worked(claim) and p.exitcode != 0]
    if failed:
        raise TrainingError(f"hpo_search: worker processes {', '.join(sorted(set(failed)))} exited abnormally")


def _study_name(hpo: HPOConfig, spec: TrainingSpec) -> str:
    """Same config, same study: a re-run continues it. Budget and parallelism are not part of it."""
    identity = {"hpo": hpo.model_dump(mode="json", include={"space", "sampler", "pruner", "max_epochs_per_trial",
                                                            "max_steps_per_trial", "metric", "direction", "seed"}),
                "base": spec.sections(), "data": spec.data.fingerprint}  # fmt: skip
    return "trainflow-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's default evaluator (PED-ANOVA in Optuna 5); needs at least two complete trials."""
    if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # fewer than two complete trials, or a constant objective
        return {}


def _history_png(study: optuna.Study) -> bytes:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    # Optuna's plots switch matplotlib to its ggplot style for the whole process; keep that to this figure
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_optimization_history(study)
        buffer = io.BytesIO()
        axes.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
    return buffer.getvalue()
