"""HPO search: the pipeline's search against plain Optuna TPE and random search on digits, at an equal trial
budget. Goal: the same or better best val/loss (within LOSS_TOLERANCE) in <= 60% of plain TPE's wall time.

All three strategies search configs/digits.yaml's space (optim.lr, optim.weight_decay, model.dropout) on its
data and CNN through `core.hpo_search.hpo_search`, with the same trials, epochs per trial and metric (val/loss);
each (strategy, seed) gets a fresh SQLite study. They differ only in what is named here:

    pipeline  digits.yaml's search: the LR range test (tune.lr_range_test) sets optim.lr's bounds (suggestion/10
              .. x3), TPE, median pruner, 2 worker processes of cores/2 torch threads; its time includes the test
    tpe       Optuna TPE, no pruning, 1 process (torch's default threads), optim.lr in a fixed 1e-4 .. 1e-1 (log)
    random    Optuna random sampler, otherwise as tpe

The seed is the sampler's (tune.hpo.seed); the data split and each trial's initialisation use the config's seed,
so a parameter set scores alike under every strategy (up to rounding where the torch thread count differs).
Runs rotate per seed (seed 0: pipeline, tpe, random; seed 1: tpe, random, pipeline; ...) so load from elsewhere
spreads evenly, after one untimed warm-up search. Full mode: about 4 minutes on 2 idle cores (estimated).

    .venv/bin/python benchmarks/hpo.py                          # 16 trials x 6 epochs each, seeds 0 1 2
    .venv/bin/python benchmarks/hpo.py --trials 12 --seeds 0 1
    .venv/bin/python benchmarks/hpo.py --quick                  # smoke test: 1 seed, 4 trials x 2 epochs
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

from core.config import Config, config_from_dict
from core.errors import TrainflowError
from core.hpo_search import hpo_search
from core.lr_range_test import lr_range_test
from core.models import build_model
from core.prepare_data import prepare_data
from core.records import PrepareDataResult
from core.storage.store import LocalStore
from core.tuning.apply import tuning_view
from core.tuning.study import tpe_startup_trials

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
TIME_GOAL = 0.60  # pipeline wall time / tpe wall time, means over seeds
LOSS_TOLERANCE = 0.02  # "the same loss": the pipeline's mean best val/loss at most 2% above tpe's
WIDE_LR = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}  # tpe and random: no range test to centre it
FIXED_LR = 3e-3  # optim.lr of tpe's and random's base config (every trial draws its own)
BUSY_LOAD = 0.5  # 1-minute load average at the start above which the timings are flagged as disturbed


@dataclass(frozen=True)
class Strategy:
    name: str
    hpo: dict[str, Any]  # tune.hpo keys replacing digits.yaml's; empty = the pipeline's own search
    range_test: bool


STRATEGIES = [
    Strategy("pipeline", {}, range_test=True),
    Strategy("tpe", {"sampler": "tpe", "pruner": "none", "parallelism": 1}, range_test=False),
    Strategy("random", {"sampler": "random", "pruner": "none", "parallelism": 1}, range_test=False),
]


@dataclass(frozen=True)
class Run:
    strategy: str
    seed: int
    best: float  # the study's best val/loss; nan when the search failed
    wall_s: float  # range test (pipeline) + search, workers' start-up included
    lr_test_s: float
    complete: int
    pruned: int
    failed: int
    epochs: int  # epochs trained over all trials (evaluations reported to Optuna)
    lr_bounds: tuple[float, float]
    error: str | None


def main() -> None:
    start_load, default_threads = os.getloadavg()[0], torch.get_num_threads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials per search, pruned and failed included")
    parser.add_argument("--epochs-per-trial", type=int, default=6, help="tune.hpo.max_epochs_per_trial")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 trials x 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs_per_trial, args.seeds = 4, 2, args.seeds[:1]
    if args.trials < 1 or args.epochs_per_trial < 1 or min(args.seeds) < 0:
        parser.error("--trials and --epochs-per-trial must be at least 1, --seeds at least 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import matplotlib.pyplot  # noqa: F401  up front (hpo_search plots), so its import time falls in no run

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {start_load:.2f} at the start; python "
        f"{platform.python_version()}, torch {torch.__version__} ({default_threads} threads by default), "
        f"optuna {optuna.__version__}"
    )
    if args.quick:
        print("QUICK MODE: a smoke test of the benchmark itself; its figures say nothing about the goal")
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        configs = {(s.name, seed): _config(raw, s, args.trials, args.epochs_per_trial, seed, tmp)
                   for s in STRATEGIES for seed in args.seeds}  # fmt: skip
        base = configs["pipeline", args.seeds[0]]
        data = prepare_data(base.data, base.seed, store)
        _describe(configs, data, args)
        _warm_up(raw, data, store, tmp)
        runs = []
        print(f"\n  {'seed':>4}  {'strategy':<8}  {'best val/loss':>13}  {'wall s':>7}  {'complete':>8}  "
              f"{'pruned':>6}  {'failed':>6}  {'epochs':>6}  optim.lr range")  # fmt: skip
        for i, seed in enumerate(args.seeds):
            for strategy in STRATEGIES[i % 3 :] + STRATEGIES[: i % 3]:
                run = _run(strategy, configs[strategy.name, seed], data, store)
                runs.append(run)
                _print_run(run)
    print(f"\nload average at the end: {load_average()}")
    if start_load > BUSY_LOAD:
        print(
            f"disturbed: load average {start_load:.2f} at the start (> {BUSY_LOAD}): other processes share the cores, "
            "which slows tpe's and random's multi-threaded trials far more than the pipeline's 1-thread workers; "
            "rerun on an idle machine"
        )
    print(_summary(runs, args.quick))


def _config(raw: dict[str, Any], strategy: Strategy, trials: int, epochs: int, seed: int, tmp: str) -> Config:
    """digits.yaml with the strategy's search, its own study and the benchmark's budget, validated as a file is."""
    raw = copy.deepcopy(raw)
    hpo = raw["tune"]["hpo"]
    hpo |= {"n_trials": trials, "max_epochs_per_trial": epochs, "seed": seed, "study_name": f"{strategy.name}-{seed}",
            "storage": f"sqlite:///{tmp}/optuna-{strategy.name}-{seed}.db"} | strategy.hpo  # fmt: skip
    if not strategy.range_test:
        hpo["space"]["optim.lr"] = WIDE_LR
        raw["optim"]["lr"] = FIXED_LR
    return config_from_dict(raw, source=f"{CONFIG.name} ({strategy.name})")


def _describe(configs: dict[tuple[str, int], Config], data: PrepareDataResult, args: argparse.Namespace) -> None:
    pipeline, tpe = configs["pipeline", args.seeds[0]], configs["tpe", args.seeds[0]]
    n_params = sum(p.numel() for p in build_model(pipeline.model, data.spec).parameters())
    lr_test = pipeline.tune.lr_range_test
    print(
        f"workload: {CONFIG.name}: digits ({data.n_train} train, {data.n_val} val samples), {pipeline.model.name} "
        f"{n_params:,} parameters, batch {pipeline.train.batch_size}; per search {args.trials} trials x "
        f"{args.epochs_per_trial} epochs, metric {pipeline.tune.hpo.metric}; seeds {' '.join(map(str, args.seeds))}"
    )
    print(f"space: {_space(pipeline)}; tpe and random: {_space(tpe, 'optim.lr')}")
    for name in ("pipeline", "tpe", "random"):
        hpo = configs[name, args.seeds[0]].tune.hpo
        test = f"LR range test ({lr_test.num_steps} steps, rule {lr_test.rule}) then " if name == "pipeline" else ""
        workers = "1 process, torch's default threads"  # hpo_search leaves them alone
        if hpo.parallelism > 1:  # hpo_search divides the cores among its worker processes
            workers = f"{hpo.parallelism} processes of {max(1, (os.cpu_count() or 1) // hpo.parallelism)} thread(s)"
        print(f"  {name:<8}  {test}sampler {hpo.sampler}, pruner {hpo.pruner}, {workers}")
    startup = tpe_startup_trials(args.trials)
    print(
        f"note: TPE samples at random until {startup} trials have finished (core.tuning.study.make_sampler scales "
        f"Optuna's n_startup_trials to the budget), from the same seeded stream as the random sampler: tpe and "
        f"random draw the same first {startup} of {args.trials} trials"
    )


def _space(cfg: Config, only: str | None = None) -> str:
    def bounds(p: Any) -> str:
        if p.low is None:
            return "from the LR range test (suggestion/10 .. x3, log)"
        return f"{p.low:g}..{p.high:g}" + (" log" if p.log else "")

    return ", ".join(f"{path} {bounds(p)}" for path, p in cfg.tune.hpo.space.items() if only in (None, path))


def _warm_up(raw: dict[str, Any], data: PrepareDataResult, store: LocalStore, tmp: str) -> None:
    """One untimed 1-trial, 1-epoch search, so the first timed run pays no first-call costs of this process."""
    cfg = _config(raw, Strategy("warm-up", STRATEGIES[1].hpo, range_test=False), 1, 1, 0, tmp)
    started = time.perf_counter()
    hpo_search(cfg.tune.hpo, cfg.data, cfg.model, cfg.optim, tuning_view(cfg.train), cfg.seed, data, None, store,
               "warm-up")  # fmt: skip
    print(f"warm-up: 1 trial x 1 epoch in {time.perf_counter() - started:.1f} s (untimed)")


def _run(strategy: Strategy, cfg: Config, data: PrepareDataResult, store: LocalStore) -> Run:
    """The range test (pipeline only) and the search, as flows/pipeline.py calls them, timed together."""
    key = f"{strategy.name}-{cfg.tune.hpo.seed}"
    train_cfg = tuning_view(cfg.train)
    lr_test, lr_test_s, error = None, 0.0, None
    started = time.perf_counter()
    try:
        if strategy.range_test:
            lr_test = lr_range_test(cfg.tune.lr_range_test, cfg.model, cfg.optim, train_cfg, cfg.data.loader,
                                    cfg.seed, data, store, f"{key}/lr_range_test")  # fmt: skip
            lr_test_s = time.perf_counter() - started
        result = hpo_search(cfg.tune.hpo, cfg.data, cfg.model, cfg.optim, train_cfg, cfg.seed, data, lr_test, store,
                            f"{key}/hpo_search")  # fmt: skip
        best, lr_bounds = result.best_value, result.lr_bounds
    except TrainflowError as exc:  # e.g. no trial completed: reported in the table, the other runs go on
        best, lr_bounds, error = math.nan, None, f"{type(exc).__name__}: {exc}"
    wall_s = time.perf_counter() - started
    trials = _trials(cfg)
    states = [t.state for t in trials]
    space_lr = cfg.tune.hpo.space["optim.lr"]
    return Run(
        strategy=strategy.name,
        seed=cfg.tune.hpo.seed or 0,
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
    lr_range = f"{run.lr_bounds[0]:.2g}..{run.lr_bounds[1]:.2g}"
    if run.lr_test_s:
        lr_range += f" (range test {run.lr_test_s:.1f} s)"
    print(
        f"  {run.seed:>4}  {run.strategy:<8}  {run.best:>13.4f}  {run.wall_s:>7.1f}  {run.complete:>8}  "
        f"{run.pruned:>6}  {run.failed:>6}  {run.epochs:>6}  {lr_range}",
        flush=True,
    )
    if run.error:
        print(f"        failed: {run.error}")


def _summary(runs: list[Run], quick: bool) -> str:
    """The per-strategy table and the comparison with the goal; returns the last line."""
    print(f"\n  {'strategy':<8}  {'mean best val/loss':>18}  {'(min..max)':>16}  {'mean wall s':>11}  "
          f"{'(min..max)':>14}  {'epochs/run':>10}  complete/pruned/failed")  # fmt: skip
    means: dict[str, tuple[float, float]] = {}
    for strategy in STRATEGIES:
        mine = [r for r in runs if r.strategy == strategy.name]
        losses, walls = [r.best for r in mine], [r.wall_s for r in mine]
        means[strategy.name] = statistics.fmean(losses), statistics.fmean(walls)  # nan if any search failed
        counts = "/".join(str(sum(getattr(r, k) for r in mine)) for k in ("complete", "pruned", "failed"))
        print(
            f"  {strategy.name:<8}  {means[strategy.name][0]:>18.4f}  {f'({min(losses):.4f}..{max(losses):.4f})':>16}"
            f"  {means[strategy.name][1]:>11.1f}  {f'({min(walls):.1f}..{max(walls):.1f})':>14}  "
            f"{statistics.fmean(r.epochs for r in mine):>10.1f}  {counts}"
        )
    (p_loss, p_wall), (t_loss, t_wall), (r_loss, r_wall) = means["pipeline"], means["tpe"], means["random"]
    time_ratio, loss_change = p_wall / t_wall, p_loss / t_loss - 1
    time_met, loss_met = time_ratio <= TIME_GOAL, p_loss <= t_loss * (1 + LOSS_TOLERANCE)
    print(
        f"\ntime: pipeline {p_wall:.1f} s / tpe {t_wall:.1f} s = {time_ratio:.2f} (goal <= {TIME_GOAL:.2f}: "
        f"{'met' if time_met else 'not met'})"
    )
    print(
        f"loss: pipeline {p_loss:.4f} vs tpe {t_loss:.4f} mean best val/loss, {loss_change:+.1%} (goal: at most "
        f"{LOSS_TOLERANCE:.0%} above tpe: {'met' if loss_met else 'not met'})"
    )
    print(f"random: {r_loss:.4f} mean best val/loss ({r_loss / t_loss - 1:+.1%} vs tpe), {r_wall:.1f} s "
          f"({r_wall / t_wall:.2f} x tpe's time)")  # fmt: skip
    verdict = "goal met" if time_met and loss_met else "goal not met"
    if quick:
        verdict = "quick mode: smoke test only, no verdict"
    return (
        f"hpo on digits, {len(runs) // len(STRATEGIES)} seed(s): pipeline {p_loss:.4f} in {p_wall:.0f} s, "
        f"tpe {t_loss:.4f} in {t_wall:.0f} s, random {r_loss:.4f} in {r_wall:.0f} s; time ratio {time_ratio:.2f} "
        f"(goal <= {TIME_GOAL:.2f}), loss {loss_change:+.1%} (goal <= +{LOSS_TOLERANCE:.0%}): {verdict}"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
