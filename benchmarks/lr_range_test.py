"""LR range test: training at each rule's suggestion vs the best of a 7-LR log-grid. Goal: ratio <= 1.10, cost < 0.10.

For each workload and seed: the lr_range_test stage (`core.lr_range_test.lr_range_test` with the default
`tune.lr_range_test` config and the training settings the pipeline gives it), one training run at each rule's
suggestion (valley, steepest, min_div_10: the stage's `suggestions`, all from one curve) and one at every grid LR.
Every run has the same seed, epochs and schedule (AdamW, cosine to 0, no warmup) and no early stopping. Two val
losses are read from each run: at its best evaluation (what the train stage hands on: `restore_best` is on by
default), which the goal and the choice of the default rule use, and after the last epoch, shown beside it.
A seed is a whole pipeline seed: split (and synthetic table), init, shuffle, dropout. Ratio: a rule's val loss over
the grid's best, each a mean over seeds; the rule closest to the grid optimum has the lowest worst-of-workloads
ratio. Cost: wall-clock seconds of the stage
call (model build, sweep, suggestion, curve and plot written to a temporary store; its sweep is timed apart) over
those of whole training runs (build and fit, per-epoch validation included). matplotlib is imported and a short
untimed range test runs per workload first, so one-time costs fall in no timed call. On a loaded machine the timings
mean little: the load average is printed at the start and the end, and a `noisy:` line flags steps timed unequally.

    .venv/bin/python benchmarks/lr_range_test.py                     # digits/cnn and tabular/mlp, 3 seeds, 7 LRs
    .venv/bin/python benchmarks/lr_range_test.py --workload tabular
    .venv/bin/python benchmarks/lr_range_test.py --quick             # smoke test only: 1 seed, 3 LRs, 2 epochs
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

import core.lr_range_test
from core.config import Config, config_from_dict
from core.errors import TrainingError
from core.lr_range_test import lr_range_test
from core.prepare_data import prepare_data
from core.records import PrepareDataResult
from core.storage.store import LocalStore
from core.training.builder import build_trainer
from core.training.callbacks import Callback
from core.tuning.apply import tuning_view
from core.tuning.lr_finder import RULES, LRCurve, lr_sweep

LOSS_GOAL = 1.10  # rule's final val loss / grid's best
COST_GOAL = 0.10  # range test seconds / the whole grid's training seconds
NOISY_SPREAD = 1.25  # runs doing the same steps this many times slower or faster than others: other load interfered
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_GRID = (1e-3, 1e-2, 1e-1)
SEEDS = (0, 1, 2)
QUICK_EPOCHS = 2


@dataclass(frozen=True)
class Workload:
    label: str
    overrides: dict[str, Any]  # on top of the default config (digits, CNN, AdamW, cosine)
    epochs: int  # per training run; the full benchmark then takes about 3 minutes on 2 idle CPU cores


WORKLOADS = {
    "digits": Workload(
        "digits/cnn", {"data": {"source": "sklearn", "name": "digits"}, "model": {"name": "cnn"}}, epochs=20
    ),
    "tabular": Workload(
        "tabular/mlp",
        {
            "data": {"source": "synthetic", "n_samples": 3000, "n_features": 20, "n_classes": 4},
            "model": {"name": "mlp", "hidden_sizes": [64, 64]},
        },
        epochs=20,
    ),
}


@dataclass(frozen=True)
class Run:
    best_val_loss: float  # at the best evaluation: the weights the train stage hands on (restore_best)
    last_val_loss: float  # after the last epoch; both inf when training stopped on non-finite gradients
    seconds: float


PROTOCOLS = {"best evaluation": lambda run: run.best_val_loss, "last epoch": lambda run: run.last_val_loss}


@dataclass(frozen=True)
class Outcome:
    summary: str
    ratios: dict[str, float]  # rule -> its mean final val loss / the grid's best
    full_estimate_s: float  # the full mode's time for this workload, scaled from this run's timings


@dataclass
class SeedResult:
    range_test_s: float  # the whole stage call
    sweep_s: float  # of which the sweep (lr_sweep)
    steps_run: int
    diverged: bool
    suggestions: dict[str, float | None]
    runs: dict[float, Run] = field(default_factory=dict)  # by LR: the grid's and the suggestions'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 3 grid LRs, 2 epochs")
    parser.add_argument("--epochs", type=int, help="epochs per training run (default: per workload, or 2 with --quick)")
    args = parser.parse_args()
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    seeds, grid = (SEEDS[:1], QUICK_GRID) if args.quick else (SEEDS, GRID)
    import matplotlib  # up front, so its import time falls in no range test (the stage plots its curve)

    matplotlib.use("Agg")
    import matplotlib.pyplot  # what the stage's plot imports

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()}; python "
        f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )
    if args.quick:
        print(f"QUICK MODE (smoke test only; its figures decide nothing): {len(seeds)} seed, {len(grid)} grid LRs, "
              f"{args.epochs or QUICK_EPOCHS} epochs per training run")  # fmt: skip
    print(
        "val loss: at the best evaluation (what the train stage hands on, restore_best; the goal and the default rule "
        "use it) and after the last epoch (shown beside it); early stopping off; ratio = rule's mean val loss / "
        "grid's best mean val loss (means over seeds)"
    )

    started = time.perf_counter()
    ratios: dict[str, dict[str, float]] = {}
    summaries, full_estimate_s = [], 0.0
    with tempfile.TemporaryDirectory(prefix="lr_range_test-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        for flag in WORKLOADS if args.workload == "all" else [args.workload]:
            workload = WORKLOADS[flag]
            epochs = args.epochs or (QUICK_EPOCHS if args.quick else workload.epochs)
            outcome = _benchmark(workload, epochs, seeds, grid, store)
            summaries.append(outcome.summary)
            ratios[workload.label] = outcome.ratios
            full_estimate_s += outcome.full_estimate_s
    print(f"\nload average at the end: {load_average()}; {time.perf_counter() - started:.0f} s in all")
    if args.quick:
        print(f"full mode (default epochs) estimated from this run's timings: {full_estimate_s / 60:.1f} min "
              "at this machine's load")  # fmt: skip
    for line in summaries:
        print(line)
    print(_verdict(ratios))


def _benchmark(
    workload: Workload, epochs: int, seeds: tuple[int, ...], grid: tuple[float, ...], store: LocalStore
) -> Outcome:
    """Range test, rule runs and grid runs for every seed; print the tables, return summary, ratios, time estimate."""
    cfgs = {seed: _config(workload, epochs, seed) for seed in seeds}
    datas = {seed: prepare_data(cfg.data, seed, store) for seed, cfg in cfgs.items()}
    cfg, data = cfgs[seeds[0]], datas[seeds[0]]
    lr_test = cfg.tune.lr_range_test
    steps_per_epoch = math.ceil(data.n_train / cfg.train.batch_size)
    print(
        f"\n{workload.label}: {data.n_train} train / {data.n_val} val samples, batch {cfg.train.batch_size}, "
        f"{epochs} epochs x {steps_per_epoch} steps, {cfg.optim.name} {cfg.optim.schedule}; range test: default "
        f"tune.lr_range_test ({lr_test.num_steps} steps from {lr_test.min_lr:g} to {lr_test.max_lr:g}); "
        f"seeds {list(seeds)}"
    )
    _range_test(cfg.model_copy(update={"tune": _short_test(cfg)}), data, store, "warm-up")  # untimed

    results: dict[int, SeedResult] = {}
    for seed in seeds:
        result = _range_test(cfgs[seed], datas[seed], store, f"{workload.label}/seed-{seed}")
        for lr in [*grid, *(lr for lr in result.suggestions.values() if lr is not None)]:
            if lr not in result.runs:
                result.runs[lr] = _train(cfgs[seed], datas[seed], store, lr)
        results[seed] = result

    print(f"  {'seed':>4}  {'range test s':>12}  {'sweep s':>7}  {'steps run':>9}  {'diverged':>8}",
          *(f"{rule:>10}" for rule in RULES))  # fmt: skip
    for seed, r in results.items():
        lrs = (f"{_lr(r.suggestions[rule]):>10}" for rule in RULES)
        print(f"  {seed:>4}  {r.range_test_s:>12.2f}  {r.sweep_s:>7.2f}  {r.steps_run:>9}  "
              f"{'yes' if r.diverged else 'no':>8}", *lrs)  # fmt: skip

    ratios: dict[str, float] = {}
    for protocol, loss_of in PROTOCOLS.items():
        grid_loss = {lr: statistics.fmean(loss_of(r.runs[lr]) for r in results.values()) for lr in grid}
        best_lr = min(grid, key=lambda lr: grid_loss[lr])
        print(f"  val loss at the {protocol}:")
        print(f"  {'grid lr':>8}  {'mean val loss':>13}  per seed")
        for lr in grid:
            per_seed = " ".join(f"{loss_of(r.runs[lr]):.4f}" for r in results.values())
            print(f"  {lr:>8.0e}  {grid_loss[lr]:>13.4f}  {per_seed}{'   <- best' if lr == best_lr else ''}")
        print(f"  {'rule':>10}  {'lr (geo mean)':>13}  {'mean val loss':>13}  {'ratio':>6}  goal <= {LOSS_GOAL:.2f}")
        for rule in RULES:
            lrs = [r.suggestions[rule] for r in results.values()]
            if any(lr is None for lr in lrs):
                print(f"  {rule:>10}  no suggestion for {sum(lr is None for lr in lrs)} of {len(lrs)} seeds")
                ratio = math.inf
            else:
                loss = statistics.fmean(loss_of(r.runs[r.suggestions[rule]]) for r in results.values())
                ratio = loss / grid_loss[best_lr]
                geo = statistics.geometric_mean(lr for lr in lrs if lr is not None)
                print(f"  {rule:>10}  {geo:>13.2e}  {loss:>13.4f}  {ratio:>6.3f}  {_ok(ratio <= LOSS_GOAL)}")
            if protocol == "best evaluation":
                ratios[rule] = ratio
        if protocol == "best evaluation":
            best = (best_lr, grid_loss[best_lr])

    test_s = statistics.fmean(r.range_test_s for r in results.values())
    sweep_s = statistics.fmean(r.sweep_s for r in results.values())
    run_s = statistics.fmean(run.seconds for r in results.values() for run in r.runs.values())
    grid_s = statistics.fmean(sum(r.runs[lr].seconds for lr in grid) for r in results.values())
    print(
        f"  cost: range test {test_s:.2f} s (sweep {sweep_s:.2f} s) = {test_s / run_s:.3f} of one training run "
        f"({run_s:.2f} s), "
        f"{test_s / grid_s:.3f} of the {len(grid)}-LR grid ({grid_s:.1f} s)   goal < {COST_GOAL:.2f}: "
        f"{_ok(test_s / grid_s < COST_GOAL)}   (means over seeds)"
    )
    run_seconds = [run.seconds for r in results.values() for run in r.runs.values()]
    sweep_ms = 1000 * sum(r.sweep_s for r in results.values()) / sum(r.steps_run for r in results.values())
    train_ms = 1000 * run_s / (epochs * steps_per_epoch)
    print(
        f"  per optimizer step: sweep {sweep_ms:.1f} ms, training runs {train_ms:.1f} ms (validation and build "
        f"included); training runs {min(run_seconds):.2f} to {max(run_seconds):.2f} s"
    )
    spread = max(max(run_seconds) / min(run_seconds), sweep_ms / train_ms, train_ms / sweep_ms)
    if spread > NOISY_SPREAD:
        print(
            f"  noisy: runs of the same steps differ {spread:.2f}x (> {NOISY_SPREAD}): other load on the machine moved "
            "the timings, so the cost figures mean little; rerun on a quiet machine (load leaves the losses alone)"
        )
    default = cfg.tune.lr_range_test.rule
    summary = (
        f"{workload.label}: grid best lr {best[0]:.0e} -> best-evaluation val loss {best[1]:.4f}; "
        + ", ".join(f"{rule} {ratios[rule]:.3f}" for rule in RULES)
        + f" (ratio, goal <= {LOSS_GOAL:.2f}; default rule {default}: {_ok(ratios[default] <= LOSS_GOAL)}); "
        f"range test {test_s / run_s:.2f} of a training run, {test_s / grid_s:.3f} of the grid (goal < {COST_GOAL:.2f})"
    )
    runs_per_seed = len(GRID) + statistics.fmean(len(r.runs) - len(grid) for r in results.values())
    full_s = len(SEEDS) * (test_s + runs_per_seed * run_s * workload.epochs / epochs)  # run time ~ epochs
    return Outcome(summary, ratios, full_s)


def _config(workload: Workload, epochs: int, seed: int) -> Config:
    train = {"max_epochs": epochs, "early_stopping": {"enabled": False}, "progress_bar": False}
    return config_from_dict({**workload.overrides, "seed": seed, "optim": {"lr": 1e-3}, "train": train})


def _short_test(cfg: Config) -> Any:
    """The smallest range test the config accepts, for the untimed warm-up."""
    lr_test = cfg.tune.lr_range_test
    return cfg.tune.model_copy(update={"lr_range_test": lr_test.model_copy(update={"num_steps": 25})})


def _range_test(cfg: Config, data: PrepareDataResult, store: LocalStore, store_key: str) -> SeedResult:
    """The stage as the pipeline calls it (training settings through tuning_view), timed, and its sweep timed inside."""
    sweep_s = []

    def timed_sweep(*args: Any, **kwargs: Any) -> LRCurve:
        started = time.perf_counter()
        curve = lr_sweep(*args, **kwargs)
        sweep_s.append(time.perf_counter() - started)
        return curve

    started = time.perf_counter()
    with mock.patch.object(core.lr_range_test, "lr_sweep", timed_sweep):  # the stage's own call, timed
        result = lr_range_test(cfg.tune.lr_range_test, cfg.model, cfg.optim, tuning_view(cfg.train),
                               cfg.data.loader, cfg.seed, data, store, store_key)  # fmt: skip
    seconds = time.perf_counter() - started
    return SeedResult(seconds, sum(sweep_s), result.num_steps_run, result.diverged, result.suggestions)


def _train(cfg: Config, data: PrepareDataResult, store: LocalStore, lr: float) -> Run:
    """One training run at `lr`, timed from building the trainer to the end of fit."""
    started = time.perf_counter()
    best = _BestValLoss()
    try:
        trainer = build_trainer(cfg.model, cfg.optim, cfg.train, cfg.data.loader, cfg.seed, data, store, [best], lr=lr)
        last = trainer.fit().last_metrics["val/loss"]
    except TrainingError as exc:  # non-finite gradients too many steps in a row: the LR is too high
        print(f"  lr {lr:.3g}, seed {cfg.seed}: {exc}")
        best.value = last = math.inf
    return Run(best.value, last, time.perf_counter() - started)


class _BestValLoss(Callback):
    def __init__(self) -> None:
        self.value = math.inf

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.value = min(self.value, metrics["val/loss"])


def _verdict(ratios: dict[str, dict[str, float]]) -> str:
    """The rule closest to the grid optimum: the lowest worst-case ratio over the workloads (mean ratio breaks ties)."""
    worst = {rule: max(by_rule[rule] for by_rule in ratios.values()) for rule in RULES}
    mean = {rule: statistics.fmean(by_rule[rule] for by_rule in ratios.values()) for rule in RULES}
    best = min(RULES, key=lambda rule: (worst[rule], mean[rule]))
    scores = ", ".join(f"{rule} {worst[rule]:.3f} (mean {mean[rule]:.3f})" for rule in RULES)
    return (
        f"closest to the grid optimum over {', '.join(ratios)}: {best} "
        f"(by the worst of its workload ratios, mean ratio breaks ties: {scores})"
    )


def _lr(lr: float | None) -> str:
    return "none" if lr is None else f"{lr:.2e}"


def _ok(met: bool) -> str:
    return "met" if met else "NOT met"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
