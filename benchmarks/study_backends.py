"""Optuna study storage under load: SQLite (WAL, as the pipeline uses it) against PostgreSQL, 1 to 8 worker processes.

Both backends go through `core.tuning.study.rdb_storage`, as the HPO workers do: SQLite in WAL mode with
synchronous=NORMAL and a 60 s busy timeout (a fresh file per width, in a temporary folder), PostgreSQL 15 in a
throwaway cluster (tests/postgres.py; fsync off, a fresh database per width). Per (backend, width) one study; W
"spawn" worker processes each load it and run `study.optimize` with `MaxTrialsCallback(N, states=None)`, as
core/tuning/hpo_worker.py does. A trial trains nothing: it suggests 3 parameters, reports 3 intermediate values
(as a pruned training would) and sleeps a fixed --sleep-ms in all, so on 2 cores the figures measure the database
and Optuna's bookkeeping, not CPU contention between trainings. RandomSampler(seed=worker), so the sampler's own
CPU (TPE's model) does not dominate. The clock starts when every worker has loaded the study (a barrier: spawn and
import time are not counted) and stops when all have exited.

Per cell: trials finished, wall s, trials/s, overhead = wall * W / finished - sleep (what a worker spends per trial
beyond the sleep), trial numbers lost (gaps in 0..max) and duplicated, trials not COMPLETE, overshoot past N
(MaxTrialsCallback lets up to W-1 extra trials start). Goal: 0 lost and 0 duplicated at every width; the exit status
is 1 otherwise. At the end: where SQLite's trials/s stops growing (the first width under 1.2x the previous one's).

    .venv/bin/python benchmarks/study_backends.py                       # about 1-2 minutes on 2 cores
    .venv/bin/python benchmarks/study_backends.py --trials 400 --sleep-ms 50 --widths 1 4 8
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna

from trainflow.core.tuning.study import rdb_storage

SCALING = 1.2  # a width "scales" when its trials/s is at least this times the previous width's


@dataclass(frozen=True)
class Cell:
    backend: str
    workers: int
    trials: int  # rows in the study, any state
    finished: int
    wall_s: float
    lost: int
    duplicated: int
    not_complete: int
    overshoot: int
    failed_workers: int  # non-zero exit codes

    @property
    def rate(self) -> float:
        return self.finished / self.wall_s if self.wall_s else 0.0


def _objective(trial: optuna.Trial, sleep_s: float) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    width = trial.suggest_categorical("width", [32, 64, 128])
    value = x * x + lr * width
    for step in range(3):
        time.sleep(sleep_s / 3)
        trial.report(value / (step + 1), step)
    return value


def _worker(url: str, name: str, worker: int, n_trials: int, sleep_s: float, barrier: object) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=worker)
    study = optuna.load_study(study_name=name, storage=rdb_storage(url), sampler=sampler)
    barrier.wait(timeout=300)  # type: ignore[attr-defined]
    study.optimize(
        lambda trial: _objective(trial, sleep_s),
        callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=None)],
    )


def _cell(backend: str, url: str, workers: int, n_trials: int, sleep_ms: float) -> Cell:
    name = f"bench-{backend}-{workers}"
    optuna.create_study(study_name=name, storage=rdb_storage(url), direction="minimize")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    procs = [
        context.Process(target=_worker, args=(url, name, w, n_trials, sleep_ms / 1000, barrier)) for w in range(workers)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    started = time.perf_counter()
    for p in procs:
        p.join()
    wall_s = time.perf_counter() - started
    trials = optuna.load_study(study_name=name, storage=rdb_storage(url)).get_trials(deepcopy=False)
    numbers = Counter(t.number for t in trials)
    ids = Counter(t._trial_id for t in trials)
    span = max(numbers) + 1 if numbers else 0
    if any(c > 1 for c in ids.values()):
        print(f"  {backend} x{workers}: duplicated _trial_id(s): {[i for i, c in ids.items() if c > 1]}")
    return Cell(
        backend=backend,
        workers=workers,
        trials=len(trials),
        finished=sum(t.state.is_finished() for t in trials),
        wall_s=wall_s,
        lost=span - len(numbers),
        duplicated=sum(c - 1 for c in numbers.values()) + sum(c - 1 for c in ids.values()),
        not_complete=sum(t.state != optuna.trial.TrialState.COMPLETE for t in trials),
        overshoot=len(trials) - n_trials,
        failed_workers=sum(p.exitcode != 0 for p in procs),
    )


def _server_version(url: str) -> str:
    from sqlalchemy import text

    storage = rdb_storage(url)
    with storage.engine.connect() as connection:
        version = str(connection.execute(text("SELECT version()")).scalar())
    storage.engine.dispose()
    return version


def _conclusion(cells: list[Cell]) -> str:
    def rates(backend: str) -> str:
        return ", ".join(f"{c.workers}: {c.rate:.1f}" for c in cells if c.backend == backend)

    sqlite = [c for c in cells if c.backend == "sqlite"]
    stop = next((b for a, b in itertools.pairwise(sqlite) if b.rate < SCALING * a.rate), None)
    if not sqlite:
        where = "SQLite not run"
    elif stop:
        where = f"SQLite stops scaling at {stop.workers} workers (< {SCALING}x the previous width's trials/s)"
    else:
        where = f"SQLite keeps scaling (>= {SCALING}x per width) up to {sqlite[-1].workers} workers"
    return f"{where}; trials/s by workers: SQLite {rates('sqlite')}; PostgreSQL {rates('postgresql')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="N: trials per (backend, width) study")
    parser.add_argument("--sleep-ms", type=float, default=20.0, help="each trial's fixed sleep, in all")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8], help="worker processes")
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    args = parser.parse_args()
    if args.trials < 1 or args.sleep_ms < 0 or min(args.widths) < 1:
        parser.error("--trials and --widths must be at least 1, --sleep-ms at least 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import psycopg
    import sqlalchemy

    from tests.postgres import PostgresCluster

    tmp = Path(tempfile.mkdtemp(prefix="trainflow-study-bench-"))
    pg_root = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))
    cluster = PostgresCluster(pg_root).start() if "postgresql" in args.backends else None
    cells: list[Cell] = []
    try:
        server = _server_version(cluster.url()) if cluster else "not run"
        print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}; load "
              f"average {os.getloadavg()[0]:.2f} at the start")  # fmt: skip
        print(f"versions: optuna {optuna.__version__}, sqlalchemy {sqlalchemy.__version__}, psycopg "
              f"{psycopg.__version__}; server: {server}")  # fmt: skip
        print(f"workload: {args.trials} trials per cell, {args.sleep_ms:g} ms sleep + 3 suggestions + 3 reports "
              f"per trial, RandomSampler(seed=worker)\n")  # fmt: skip
        for workers in args.widths:  # widths outer, so drift in the machine's load hits both backends alike
            for backend in args.backends:
                if backend == "sqlite":
                    url = f"sqlite:///{tmp}/optuna-{workers}.db"
                else:
                    assert cluster is not None
                    url = cluster.create_database(f"bench_{workers}")
                cells.append(_cell(backend, url, workers, args.trials, args.sleep_ms))
                c = cells[-1]
                failed = f"; {c.failed_workers} worker(s) exited non-zero" if c.failed_workers else ""
                print(f"  {backend:<10} x{workers}: {c.finished} trials in {c.wall_s:.2f} s{failed}", flush=True)
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    cells.sort(key=lambda c: (args.backends.index(c.backend), c.workers))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}\n")
    print("| backend | workers | trials (over N) | wall s | trials/s | overhead ms/trial | lost | duplicated | "
          "not complete |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for c in cells:
        overhead = c.wall_s * c.workers / c.finished * 1000 - args.sleep_ms if c.finished else float("nan")
        print(f"| {c.backend} | {c.workers} | {c.finished} (+{c.overshoot}) | {c.wall_s:.2f} | {c.rate:.1f} | "
              f"{overhead:.1f} | {c.lost} | {c.duplicated} | {c.not_complete} |")  # fmt: skip
    print(f"\n{_conclusion(cells)}")
    bad = [c for c in cells if c.lost or c.duplicated or c.failed_workers]
    for c in bad:
        print(f"FAILED: {c.backend} x{c.workers}: {c.lost} lost, {c.duplicated} duplicated, "
              f"{c.failed_workers} worker(s) exited non-zero")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
