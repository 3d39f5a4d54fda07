"""`trainflow tune-worker` on a second "machine": a process with its own HOME, working folder and store, joining
the search node 0's `trainflow run` started, through one PostgreSQL (the Optuna study) and one MLflow database on
it. Both finish one study together; a worker SIGKILLed mid-trial leaves nothing running and the budget is kept."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tests.deployments.processes import cli_env
from tests.postgres import PostgresCluster, postgres  # noqa: F401
from trainflow.core.tuning.hpo_worker import counted_trials

N_TRIALS, WORKERS = 8, 2  # node 0 runs one trial at a time (parallelism 1), the worker one: 2 at once
TIMEOUT_S = 300
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def _config(**hpo: Any) -> dict[str, Any]:
    """Wine and a small MLP; trials of ~2 s (no pruning: the worker, joining a few seconds late, still gets some),
    no LR range test, no compression; a store per machine."""
    search = {"enabled": True, "n_trials": N_TRIALS, "max_epochs_per_trial": 80, "pruner": "none",
              "space": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}} | hpo  # fmt: skip
    return {
        "seed": 0,
        "data": {"source": "sklearn", "name": "wine"},
        "model": {"name": "mlp", "hidden_sizes": [32], "dropout": 0.0},
        "optim": {"lr": 0.01},
        "train": {"max_epochs": 2, "batch_size": 16, "progress_bar": False},
        "tune": {"lr_range_test": {"enabled": False}, "hpo": search},
        "compress": {"enabled": False},
        "store": {"uri": "./artifacts"},
        "tracking": {"experiment": "tune-worker"},
    }


class Machine:
    """One "machine": a working folder with the config and its own store, a HOME (and PREFECT_HOME) of its own,
    MLflow on `tracking`, one core (two processes with a torch thread per core each on 2 cores train ~10x slower)."""

    def __init__(self, root: Path, config: dict[str, Any], tracking: str, storage: str):
        self.root, self.storage = root, storage
        (root / "home").mkdir(parents=True)
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        # Prefect's temporary server may take longer than its 20 s to boot while the other machine imports torch
        self.env = cli_env(root / "home", HOME=str(root / "home"), MLFLOW_TRACKING_URI=tracking, OMP_NUM_THREADS="1",
                           PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "trainflow", *args[:1], "config.yaml", *args[1:],
                   "--set", f"tune.hpo.storage={self.storage}"]  # fmt: skip
        with (self.root / "stdout.log").open("wb") as out, (self.root / "stderr.log").open("wb") as err:
            self.process = subprocess.Popen(command, cwd=self.root, env=self.env, start_new_session=True,
                                            stdout=out, stderr=err)  # fmt: skip
        return self.process

    def finish(self) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=TIMEOUT_S)
        assert code == 0, f"{self.root.name} exited {code}:\n{self.output(6000)}"
        return code

    def output(self, tail: int | None = None) -> str:
        text = "".join((self.root / f"{name}.log").read_text() for name in ("stdout", "stderr"))
        return text[-tail:] if tail else text

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def name(self) -> str:
        """Its trials' `worker` user attribute (the `trainflow` process itself runs them)."""
        assert self.process is not None
        return f"{socket.gethostname()}:{self.process.pid}"

    def kill(self) -> None:
        """SIGKILL the process and anything it started, if still there."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


def _two_machines(tmp_path: Path, cluster: PostgresCluster, tag: str, **hpo: Any) -> tuple[Machine, Machine, str, str]:
    """Node 0 and a worker, each with its own store (the worker prepares the data again); the study's and
    MLflow's databases on the one PostgreSQL."""
    storage, tracking = cluster.create_database(f"optuna_{tag}"), cluster.create_database(f"mlflow_{tag}")
    config = _config(**hpo)
    node0 = Machine(tmp_path / "node0", config, tracking, storage)
    worker = Machine(tmp_path / "worker", config, tracking, storage)
    return node0, worker, storage, tracking


def _study(storage: str | optuna.storages.RDBStorage) -> optuna.Study | None:
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage) if summaries else None


def _check_budget(trials: list[optuna.trial.FrozenTrial]) -> None:
    assert not [t.number for t in trials if t.state in (RUNNING, WAITING)], "a trial is left open"
    assert N_TRIALS <= counted_trials(trials) <= N_TRIALS + WORKERS - 1


@pytest.mark.slow
def test_two_machines_finish_one_study_both_contributing(tmp_path: Path, postgres: PostgresCluster) -> None:  # noqa: F811
    """Node 0 and a worker started before it finish one study: the budget is kept, both ran COMPLETE trials, and
    every trial is logged as a child run of node 0's one hpo_search run in the shared MLflow."""
    node0, worker, storage, tracking = _two_machines(tmp_path, postgres, "both")
    try:
        worker.start("tune-worker", "--wait", str(TIMEOUT_S))  # it waits for node 0's search
        node0.start("run", "--out", "out")
        node0.finish()
        worker.finish()
    finally:
        worker.kill()
        node0.kill()

    study = _study(storage)
    assert study is not None
    trials = study.get_trials()
    _check_budget(trials)
    ran_by = {t.user_attrs.get("worker") for t in trials if t.state == COMPLETE}
    assert {node0.name(), worker.name()} <= ran_by, ran_by
    ran_here = re.search(r"holds its budget; (\d+) trial\(s\) ran here", worker.output())
    assert ran_here, worker.output(6000)
    assert int(ran_here[1]) == sum(t.user_attrs.get("worker") == worker.name() for t in trials) >= 1
    assert "preparing it here" in worker.output(), "node 0's store is not the worker's: it prepared the data again"
    assert os.listdir(worker.root / "artifacts" / "data") == os.listdir(node0.root / "artifacts" / "data")

    summary = json.loads((node0.root / "out" / "summary.json").read_text())
    assert summary["stages"]["hpo_search"]["cached"] is False
    assert summary["stages"]["hpo_search"]["study_name"] == study.study_name
    client = MlflowClient(tracking_uri=tracking)
    experiment = summary["mlflow_experiment_id"]
    stage_filter = f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' and tags.`trainflow.stage` = 'hpo_search'"
    (hpo_run,) = client.search_runs([experiment], stage_filter)
    trial_runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{hpo_run.info.run_id}'")
    assert sorted(run.info.run_name for run in trial_runs) == sorted(f"trial-{t.number}" for t in trials)
    assert all(run.info.status == "FINISHED" for run in trial_runs)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_no_trial_running(tmp_path: Path, postgres: PostgresCluster) -> None:  # noqa: F811
    """A worker SIGKILLed while it runs a trial: node 0 still finishes; the dead trial, silent past the grace
    period, is failed and its parameters re-queued, node 0 completes the copy, and the budget counts it once."""
    node0, worker, storage, tracking = _two_machines(tmp_path, postgres, "killed", heartbeat_interval_s=1,
                                                     grace_period_s=3)  # fmt: skip
    try:
        worker.start("tune-worker", "--wait", str(TIMEOUT_S))
        node0.start("run", "--out", "out")
        deadline, killed, rdb = time.monotonic() + TIMEOUT_S, None, optuna.storages.RDBStorage(storage)
        while killed is None:
            for machine in (node0, worker):
                assert machine.running(), f"{machine.root.name} ended:\n{machine.output(6000)}"
            assert time.monotonic() < deadline, "the worker never ran a trial"
            study = _study(rdb)  # one storage for every poll: a URL would open a connection pool per poll
            mine = [t for t in study.get_trials(states=(RUNNING,)) if t.user_attrs.get("worker") == worker.name()] \
                if study else []  # fmt: skip
            if mine:
                worker.kill()
                killed = mine[0].number
            time.sleep(0.1)
        node0.finish()
    finally:
        worker.kill()
        node0.kill()

    study = _study(storage)
    assert study is not None
    trials = study.get_trials()
    _check_budget(trials)
    assert trials[killed].state == FAIL, trials[killed]
    (copy,) = [t for t in trials if killed in t.system_attrs.get("retry_history", ())]
    assert copy.state == COMPLETE and copy.user_attrs["worker"] == node0.name(), copy
    assert copy.params == trials[killed].params
    summary = json.loads((node0.root / "out" / "summary.json").read_text())
    (dead_run,) = MlflowClient(tracking_uri=tracking).search_runs(
        [summary["mlflow_experiment_id"]], f"attributes.run_name = 'trial-{killed}'"
    )
    assert dead_run.info.status == "FAILED", "the dead worker's MLflow run is ended, not left RUNNING"
    assert dead_run.data.tags["trainflow.trial_note"].endswith(f"re-run as trial {copy.number}")


def test_a_worker_with_no_search_to_join_stops_with_one_line(tmp_path: Path, postgres: PostgresCluster) -> None:  # noqa: F811
    """No node 0 within --wait: exit 2 with one `error: tune-worker:` line; no tune.hpo.storage: exit 2 naming it."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config()))
    env = cli_env(tmp_path, HOME=str(tmp_path))
    storage = postgres.create_database("optuna_nobody")

    def tune_worker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "trainflow", "tune-worker", str(config), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    alone = tune_worker("--set", f"tune.hpo.storage={storage}", "--wait", "2")
    assert alone.returncode == 2, alone.stderr
    (line,) = alone.stderr.splitlines()
    assert line.startswith("error: tune-worker: ")
    no_storage = tune_worker()
    assert no_storage.returncode == 2 and no_storage.stderr.startswith("error: tune.hpo.storage"), no_storage.stderr
