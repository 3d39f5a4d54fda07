"""HPO search: the pipeline's search against plain Optuna TPE and random search on digits, at an equal trial budget
and equal parallelism. Goal: the same or better best val/loss (within LOSS_TOLERANCE) in <= 60% of plain TPE's time.

Every strategy searches configs/digits.yaml's space (optim.lr, optim.weight_decay, model.dropout) on its data and CNN
through `core.hpo_search.hpo_search`, as flows/pipeline.py calls it: digits.yaml's parallelism (2 worker processes,
each of cores/2 torch threads, set by hpo_search), the same trials, epochs per trial and metric (val/loss), every
trial an MLflow child run (temporary SQLite tracking database), a fresh Optuna study per (strategy, seed). They differ
only in what is named here; two rows separate the pipeline's two changes:

    pipeline   the LR range test (tune.lr_range_test, in the time) sets optim.lr's bounds (suggestion/10 .. x3), TPE,
               Hyperband pruning (digits.yaml's search)
    tpe        Optuna TPE, optim.lr in a fixed 1e-4 .. 1e-1 (log), no pruning
    random     Optuna random sampler, otherwise as tpe
    bounds     range-test bounds as pipeline, no pruning
    hyperband  Hyperband pruning as pipeline, wide LR bounds as tpe (no range test)

A seed is a whole pipeline seed: the config's `seed` (data split, initialisation, shuffling, dropout) and the
sampler's (tune.hpo.seed). With 2 workers a study's trial order depends on timing, so a rerun need not repeat a
figure. Runs rotate per seed (seed 0: pipeline, tpe, ...; seed 1: tpe, random, ..., pipeline) so load from elsewhere
spreads evenly, after one untimed warm-up (range test and a 1-trial search), which also starts the server that worker
processes fork from and waits for its imports, as `trainflow run` starts it at start-up (flows/startup.py): a timed
search pays a worker's fork and own warm-up, not torch's and MLflow's imports. Epochs: evaluations reported to Optuna,
summed over a search's trials. On a loaded machine the timings mean little: the load average is printed at the start
and the end. At the end: the verdict and a markdown table for README. Full mode: about 3-4 minutes on 2 cores
(estimated from a 1-seed partial run).

    cd benchmarks
    ../.venv/bin/python hpo.py                                # 16 trials x 6 epochs each, seeds 0 1 2
    ../.venv/bin/python hpo.py --trials 12 --seeds 0 --strategies pipeline tpe
    ../.venv/bin/python hpo.py --quick                        # smoke test: 1 seed, 4 trials x 2 epochs
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

if __name__ == "__main__":  # Not in hpo_search's spawned workers, which re-import this file (as __mp_main__): they
    # pay for what the pipeline's workers pay, whose main module (flows/cli.py) imports none of this (scikit-learn).
    import optuna
    import torch
    import yaml

    from trainflow.core.config import Config, config_from_dict
    from trainflow.core.errors import TrainflowError
    from trainflow.core.hpo_search import hpo_search
    from trainflow.core.lr_range_test import lr_range_test
    from trainflow.core.models import build_model
    from trainflow.core.prepare_data import prepare_data
    from trainflow.core.records import HPOSearchResult, PrepareDataResult
    from trainflow.core.storage.store import LocalStore
    from trainflow.core.tracking.runs import RunLogger, Tracker
    from trainflow.core.tuning.hpo_worker import start_worker_server
    from trainflow.core.tuning.plan import lr_range_test_spec, search_spec
    from trainflow.core.tuning.study import tpe_startup_trials

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
TIME_GOAL = 0.60  # pipeline wall time / tpe wall time, means over seeds
LOSS_TOLERANCE = 0.02  # "the same loss": the pipeline's mean best val/loss at most 2% above tpe's
WIDE_LR = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}  # no range test to centre it
FIXED_LR = 3e-3  # optim.lr of the base config without a range test (every trial draws its own)
BUSY_LOAD = 0.5  # 1-minute load average at the start above which the timings are flagged as disturbed


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str  # README's row
    sampler: str
    pruner: str
    range_test: bool  # optim.lr's bounds from the LR range test (its time included), else WIDE_LR


STRATEGIES = [
    Strategy("pipeline", "the pipeline's: range test (in the time), LR suggestion/10..×3, TPE, Hyperband", "tpe",
             "hyperband", range_test=True),
    Strategy("tpe", "plain Optuna TPE, LR 1e-4..1e-1, no pruning", "tpe", "none", range_test=False),
    Strategy("random", "random search, LR 1e-4..1e-1, no pruning", "random", "none", range_test=False),
    Strategy("bounds", "range-test bounds, TPE, no pruning", "tpe", "none", range_test=True),
    Strategy("hyperband", "Hyperband, TPE, wide LR bounds (no range test)", "tpe", "hyperband", range_test=False),
]  # fmt: skip
BY_NAME = {s.name: s for s in STRATEGIES}


@dataclass(frozen=True)
class Run:
    strategy: str
    seed: int
    best: float  # the study's best val/loss; nan when the search failed
    wall_s: float  # range test (if any) + search, workers' start-up included
    lr_test_s: float
    complete: int
    pruned: int
    failed: int
    epochs: int  # epochs trained over all trials (evaluations reported to Optuna)
    lr_bounds: tuple[float, float]
    error: str | None


def main() -> None:
    start_load, default_threads = load_average(), torch.get_num_threads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials per search, pruned and failed included")
    parser.add_argument("--epochs-per-trial", type=int, default=6, help="tune.hpo.max_epochs_per_trial")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pipeline and sampler seeds")
    parser.add_argument("--strategies", nargs="+", choices=list(BY_NAME), default=list(BY_NAME), help="a subset")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 trials x 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs_per_trial, args.seeds = 4, 2, args.seeds[:1]
    if args.trials < 1 or args.epochs_per_trial < 1 or min(args.seeds) < 0:
        parser.error("--trials and --epochs-per-trial must be at least 1, --seeds at least 0")
    strategies = [s for s in STRATEGIES if s.name in args.strategies]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import matplotlib.pyplot  # noqa: F401  up front (both stages plot), so its import time falls in no run

    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__} "
        f"({default_threads} threads by default), optuna {optuna.__version__}"
    )
    print(f"machine: {machine}; load average {start_load} at the start")
    if args.quick:
        print("QUICK MODE: a smoke test of the benchmark itself; its figures say nothing about the goal")
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    runs = []
    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        tracker = Tracker.for_experiment(f"sqlite:///{tmp}/mlflow.db", "hpo-benchmark")
        data_cfg = config_from_dict(raw).data
        data = {seed: prepare_data(data_cfg, seed, store) for seed in args.seeds}  # the split moves with the seed
        _describe(raw, strategies, data[args.seeds[0]], args, tmp)
        _warm_up(raw, data[args.seeds[0]], store, tracker, tmp)
        print(f"\n  {'seed':>4}  {'strategy':<9}  {'best val/loss':>13}  {'wall s':>7}  {'complete':>8}  "
              f"{'pruned':>6}  {'failed':>6}  {'epochs':>6}  optim.lr range")  # fmt: skip
        for i, seed in enumerate(args.seeds):
            k = i % len(strategies)
            for strategy in strategies[k:] + strategies[:k]:
                cfg = _config(raw, strategy, args.trials, args.epochs_per_trial, seed, tmp)
                runs.append(_run(strategy, cfg, data[seed], store, tracker))
                _print_run(runs[-1])
    end_load = load_average()
    print(f"\nload average at the end: {end_load}")
    if float(start_load) > BUSY_LOAD:
        print(f"disturbed: load average {start_load} at the start (> {BUSY_LOAD}): other processes share the cores; "
              "rerun on an idle machine")  # fmt: skip
    print(_summary(runs, strategies, args, f"{machine}; load average {start_load} at the start, {end_load} at the end"))


def _config(raw: dict[str, Any], strategy: Strategy, trials: int, epochs: int, seed: int, tmp: str) -> Config:
    """digits.yaml with the strategy's search, the seed, its own study and the budget, validated as a file is."""
    raw = copy.deepcopy(raw)
    raw["seed"] = seed  # split, initialisation, shuffling, dropout
    name = f"{strategy.name}-{seed}"
    raw["tune"]["hpo"] |= {"n_trials": trials, "max_epochs_per_trial": epochs, "seed": seed, "study_name": name,
                           "storage": f"sqlite:///{tmp}/optuna-{name}.db", "sampler": strategy.sampler,
                           "pruner": strategy.pruner}  # fmt: skip
    if not strategy.range_test:
        raw["tune"]["hpo"]["space"]["optim.lr"] = WIDE_LR
        raw["optim"]["lr"] = FIXED_LR
    return config_from_dict(raw, source=f"{CONFIG.name} ({strategy.name})")


def _describe(
    raw: dict[str, Any], strategies: list[Strategy], data: PrepareDataResult, args: argparse.Namespace, tmp: str
) -> None:
    pipeline, wide = (_config(raw, BY_NAME[n], args.trials, 1, 0, tmp) for n in ("pipeline", "tpe"))
    n_params = sum(p.numel() for p in build_model(pipeline.model, data.spec).parameters())
    lr_test, hpo = pipeline.tune.lr_range_test, pipeline.tune.hpo
    print(
        f"workload: {CONFIG.name}: digits ({data.n_train} train, {data.n_val} val samples), {pipeline.model.name} "
        f"{n_params:,} parameters, batch {pipeline.train.batch_size}; per search {args.trials} trials x "
        f"{args.epochs_per_trial} epochs, metric {hpo.metric}; seeds {' '.join(map(str, args.seeds))} (pipeline "
        f"and sampler seed)"
    )
    threads = max(1, (os.cpu_count() or 1) // hpo.parallelism)
    print(
        f"every strategy: {hpo.parallelism} worker processes of {threads} torch thread(s) (hpo_search divides the "
        f"cores), trials logged to MLflow; the LR range test ({lr_test.num_steps} steps, rule {lr_test.rule}) runs in "
        f"the main process with torch's default threads"
    )
    print(f"space: {_space(pipeline)}; without the range test: {_space(wide, 'optim.lr')}")
    for s in strategies:
        print(f"  {s.name:<9}  {s.label}")
    startup = tpe_startup_trials(args.trials)
    print(
        f"note: TPE samples at random until {startup} trials have finished (core.tuning.study.make_sampler scales "
        f"Optuna's n_startup_trials to the budget), from the same seeded stream as the random sampler"
    )


def _space(cfg: Config, only: str | None = None) -> str:
    def bounds(p: Any) -> str:
        if p.low is None:
            return "from the LR range test (suggestion/10 .. x3, log)"
        return f"{p.low:g}..{p.high:g}" + (" log" if p.log else "")

    return ", ".join(f"{path} {bounds(p)}" for path, p in cfg.tune.hpo.space.items() if only in (None, path))


def _warm_up(raw: dict[str, Any], data: PrepareDataResult, store: LocalStore, tracker: Tracker, tmp: str) -> None:
    """An untimed range test and 1-trial search (one worker: the main process), so no timed run pays this
    process's first-call costs, and the worker server started, its imports done (a first process forked from it
    waits for them), as `trainflow run` starts it at start-up. Each timed search forks its worker from it."""
    cfg = _config(raw, Strategy("warm-up", "", "tpe", "hyperband", range_test=True), 1, 1, 0, tmp)
    started = time.perf_counter()
    ready = multiprocessing.get_context(start_worker_server()).Process(target=os.getpid)
    ready.start()  # returns once the server has forked it: after its imports
    ready.join()
    _search(cfg, True, data, store, tracker, "warm-up")
    print(f"warm-up: range test, 1 trial x 1 epoch and the worker server in {time.perf_counter() - started:.1f} s "
          "(untimed)")  # fmt: skip


def _search(
    cfg: Config, range_test: bool, data: PrepareDataResult, store: LocalStore, tracker: Tracker, key: str
) -> tuple[HPOSearchResult, float]:
    """The range test (if asked) and the search, as flows/pipeline.py calls them, trials as child runs of a
    parent run; returns the search's result and the range test's seconds."""
    lr_test, lr_test_s = None, 0.0
    if range_test:
        started = time.perf_counter()
        lr_spec = lr_range_test_spec(cfg, data)
        assert lr_spec is not None, "the strategy's config runs the range test"
        lr_test = lr_range_test(cfg.tune.lr_range_test, lr_spec, store, f"{key}/lr_range_test")
        lr_test_s = time.perf_counter() - started
    parent = RunLogger(tracker.client, tracker.client.create_run(tracker.experiment_id).info.run_id,
                       tracker.experiment_id)  # fmt: skip
    spec = search_spec(cfg, data, lr_test)
    assert spec is not None, "the search is enabled"
    result = hpo_search(cfg.tune.hpo, spec, lr_test, store, f"{key}/hpo_search", parent)
    return result, lr_test_s


def _run(strategy: Strategy, cfg: Config, data: PrepareDataResult, store: LocalStore, tracker: Tracker) -> Run:
    """One timed search (the range test included where the strategy has one)."""
    best, lr_bounds, lr_test_s, error = math.nan, None, 0.0, None
    started = time.perf_counter()
    try:
        result, lr_test_s = _search(cfg, strategy.range_test, data, store, tracker, f"{strategy.name}-{cfg.seed}")
        best, lr_bounds = result.best_value, result.lr_bounds
    except TrainflowError as exc:  # e.g. no trial completed: reported in the table, the other runs go on
        error = f"{type(exc).__name__}: {exc}"
    wall_s = time.perf_counter() - started
    trials = _trials(cfg)
    states = [t.state for t in trials]
    space_lr = cfg.tune.hpo.space["optim.lr"]
    return Run(
        strategy=strategy.name,
        seed=cfg.seed,
        best=best,
        wall_s=wall_s,
        lr_test_s=lr_test_s,
        complete=states.count(optuna.trial.TrialState.COMPLETE),
        pruned=states.count(optuna.trial.TrialState.PRUNED),
        failed=states.count(optuna.trial.TrialState.FAIL),
        epochs=sum(len(t.intermediate_values) for t in trials),
        lr_bounds=lr_bounds or (space_lr.low or math.nan, space_lr.high or math.nan),
        error=error,
    )


def _trials(cfg: Config) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none when the search failed before creating it."""
    assert cfg.tune.hpo.storage and cfg.tune.hpo.study_name  # set by _config
    try:
        return optuna.load_study(study_name=cfg.tune.hpo.study_name, storage=cfg.tune.hpo.storage).get_trials()
    except KeyError:  # no such study
        return []


def _print_run(run: Run) -> None:
    print(
        f"  {run.seed:>4}  {run.strategy:<9}  {run.best:>13.4f}  {run.wall_s:>7.1f}  {run.complete:>8}  "
        f"{run.pruned:>6}  {run.failed:>6}  {run.epochs:>6}  {run.lr_bounds[0]:.2g}..{run.lr_bounds[1]:.2g}"
        + (f" (range test {run.lr_test_s:.1f} s)" if run.lr_test_s else ""),
        flush=True,
    )
    if run.error:
        print(f"        failed: {run.error}")


def _summary(runs: list[Run], strategies: list[Strategy], args: argparse.Namespace, machine: str) -> str:
    """The comparisons with tpe, the verdict and the README table; returns the last line."""
    mine = {s.name: [r for r in runs if r.strategy == s.name] for s in strategies}
    loss = {name: statistics.fmean(r.best for r in rs) for name, rs in mine.items()}  # nan if a search failed
    wall = {name: statistics.fmean(r.wall_s for r in rs) for name, rs in mine.items()}
    epochs = {name: statistics.fmean(r.epochs for r in rs) for name, rs in mine.items()}
    print()
    if "tpe" in loss:
        for name in loss:
            print(f"{name:<9} vs tpe: best val/loss {loss[name]:.4f} ({loss[name] / loss['tpe'] - 1:+.1%}), "
                  f"{wall[name]:.1f} s ({wall[name] / wall['tpe']:.2f} x), {epochs[name]:.0f} epochs "
                  f"({epochs[name] / epochs['tpe']:.2f} x)")  # fmt: skip
    print(f"\n{machine}; {len(args.seeds)} seed(s), {args.trials} trials x {args.epochs_per_trial} epochs per search\n")
    print("| strategy | best val loss, mean (min–max) | wall s, mean (min–max) | epochs per search | "
          "trials complete / pruned / failed |\n| --- | --- | ---: | ---: | --- |")  # fmt: skip
    for s in strategies:
        rs = mine[s.name]
        losses, walls = [r.best for r in rs], [r.wall_s for r in rs]
        counts = " / ".join(str(sum(getattr(r, k) for r in rs)) for k in ("complete", "pruned", "failed"))
        print(f"| {s.label} | {loss[s.name]:.4f} ({min(losses):.4f}–{max(losses):.4f}) | {wall[s.name]:.1f} "
              f"({min(walls):.1f}–{max(walls):.1f}) | {epochs[s.name]:.0f} | {counts} |")  # fmt: skip
    if not {"pipeline", "tpe"} <= loss.keys():
        return "\nno verdict: the pipeline and tpe must both run"
    time_ratio, loss_change = wall["pipeline"] / wall["tpe"], loss["pipeline"] / loss["tpe"] - 1
    time_met, loss_met = time_ratio <= TIME_GOAL, loss_change <= LOSS_TOLERANCE
    verdict = "goal met" if time_met and loss_met else "goal not met"
    if args.quick:
        verdict = "quick mode: smoke test only, no verdict"
    return (
        f"\nhpo on digits, equal parallelism: pipeline {loss['pipeline']:.4f} in {wall['pipeline']:.1f} s, tpe "
        f"{loss['tpe']:.4f} in {wall['tpe']:.1f} s; time ratio {time_ratio:.2f} (goal <= {TIME_GOAL:.2f}: "
        f"{'met' if time_met else 'not met'}), loss {loss_change:+.1%} (goal <= +{LOSS_TOLERANCE:.0%}: "
        f"{'met' if loss_met else 'not met'}): {verdict}"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
