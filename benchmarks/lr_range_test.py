"""LR range test: training at each rule's suggestion vs the best of a quarter-decade LR grid (13 LRs, 1e-4 .. 1e-1).
Goal: ratio <= 1.10 at < 0.10 of the grid's cost, on the selection workloads and on the held-out ones.

Workloads: digits/cnn and tabular/mlp chose the default rule (`steepest`); hard_table/mlp (another generator
setting: 8 classes, 40 features, less separation, a wider MLP) and text/gpt (the bundled pydoc text, a 2-layer GPT,
fewer epochs to bound the time) are held out: they played no part in the choice.
For each workload and seed: the lr_range_test stage (`core.lr_range_test.lr_range_test` with the default
`tune.lr_range_test` config and the training settings the pipeline gives it), one training run at each rule's
suggestion (valley, steepest, min_div_10: the stage's `suggestions`, all from one curve) and one at every grid LR.
Every run has the same seed, epochs and schedule (AdamW, cosine to 0, no warmup) and no early stopping. Two val
losses are read from each run: at its best evaluation (what the train stage hands on: `restore_best` is on by
default), which the goal and the choice of the default rule use, and after the last epoch, shown beside it.
A seed is a whole pipeline seed (the config's `seed`): split (and synthetic table), init, shuffle, dropout; text
splits are contiguous by design, so there a seed moves init and shuffle only (each workload prints which).
Ratio: a rule's val loss over the grid's best, each a mean over seeds. Cost, two figures: the range test alone
(wall-clock seconds of the stage call: model build, sweep, suggestion, curve and plot written to a temporary store;
its sweep is timed apart) over the grid's training seconds (build and fit, per-epoch validation included), which the
goal uses; and the range test plus the one training run at the default rule's suggestion, over the same. matplotlib
is imported and a short untimed range test runs per workload first, so one-time costs fall in no timed call. On a
loaded machine the timings mean little: the load average is printed at the start and the end, and a `noisy:` line
flags steps timed unequally. At the end: the verdict per group of workloads and a markdown table for README.

    cd benchmarks
    ../.venv/bin/python lr_range_test.py             # 4 workloads, 3 seeds, 13 LRs: ~15 min on 2 idle cores (est.)
    ../.venv/bin/python lr_range_test.py --workload text --seeds 0
    ../.venv/bin/python lr_range_test.py --quick     # smoke test only: 1 seed, 3 LRs, 2 epochs
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lr_range_report import Outcome, Run, SeedResult, markdown, report_workload, verdict
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

import trainflow.core.lr_range_test
from trainflow.core.config import Config, LRRangeTestConfig, config_from_dict
from trainflow.core.errors import TrainingError
from trainflow.core.lr_range_test import lr_range_test
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.tuning.lr_finder import LRCurve, lr_sweep

GRID = tuple(10 ** (k / 4) for k in range(-16, -3))  # quarter decades: 1e-4, 1.8e-4, 3.2e-4, 5.6e-4, ... 1e-1
QUICK_GRID = (1e-3, 1e-2, 1e-1)
SEEDS = (0, 1, 2)
QUICK_EPOCHS = 2


@dataclass(frozen=True)
class Workload:
    label: str
    title: str  # as README's table names it
    overrides: dict[str, Any]  # on top of the default config (AdamW, cosine); every config needs its data section
    epochs: int  # per training run
    held_out: bool  # True: played no part in choosing the default rule


WORKLOADS = {
    "digits": Workload(
        "digits/cnn",
        "digits, CNN",
        {"data": {"source": "sklearn", "name": "digits"}, "model": {"name": "cnn"}},
        epochs=20,
        held_out=False,
    ),
    "tabular": Workload(
        "tabular/mlp",
        "synthetic table 3000×20, 4 classes, MLP 64×64",
        {
            "data": {"source": "synthetic", "n_samples": 3000, "n_features": 20, "n_classes": 4},
            "model": {"name": "mlp", "hidden_sizes": [64, 64]},
        },
        epochs=20,
        held_out=False,
    ),
    # breast_cancer was tried here: its val loss is ~0.001 at the grid's best, so ratios measure noise.
    "hard_table": Workload(
        "hard_table/mlp",
        "synthetic table 4000×40, 8 classes, class_sep 0.7, MLP 128×128",
        {
            "data": {"source": "synthetic", "n_samples": 4000, "n_features": 40, "n_classes": 8, "class_sep": 0.7},
            "model": {"name": "mlp"},
        },
        epochs=20,
        held_out=True,
    ),
    "text": Workload(  # 4 epochs, not 20: an epoch takes ~2.5 s on 2 cores, so 20 would make this workload 40 min
        "text/gpt",
        "pydoc text (bytes, seq_len 64), GPT 2 layers × 64",
        {
            "data": {"source": "text", "seq_len": 64},
            "model": {"name": "gpt", "n_layer": 2, "n_embd": 64, "n_head": 4},
        },
        epochs=4,
        held_out=True,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 3 grid LRs, 2 epochs")
    parser.add_argument("--epochs", type=int, help="epochs per training run (default: per workload, or 2 with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", help="config seeds (default: 0 1 2, or 0 with --quick)")
    args = parser.parse_args()
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.seeds is not None and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        parser.error("--seeds must be distinct and >= 0")
    seeds, grid = (SEEDS[:1], QUICK_GRID) if args.quick else (SEEDS, GRID)
    seeds = tuple(args.seeds) if args.seeds else seeds
    import matplotlib  # up front, so its import time falls in no range test (the stage plots its curve)

    matplotlib.use("Agg")
    import matplotlib.pyplot  # what the stage's plot imports

    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    load_start = load_average()
    print(f"machine: {machine}; load average {load_start}")
    if args.quick:
        print(f"QUICK MODE (smoke test only; its figures decide nothing): {len(seeds)} seed, {len(grid)} grid LRs, "
              f"{args.epochs or QUICK_EPOCHS} epochs per training run")  # fmt: skip
    print(
        f"grid: {len(grid)} LRs, {', '.join(f'{lr:.1e}' for lr in grid)}; val loss: at the best evaluation (what the "
        "train stage hands on, restore_best; the goal and the default rule use it) and after the last epoch (shown "
        "beside it); early stopping off; ratio = rule's mean val loss / grid's best mean val loss (means over seeds)"
    )

    started = time.perf_counter()
    outcomes: list[Outcome] = []
    full_estimate_s = 0.0
    with tempfile.TemporaryDirectory(prefix="lr_range_test-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        for flag in WORKLOADS if args.workload == "all" else [args.workload]:
            workload = WORKLOADS[flag]
            epochs = args.epochs or (QUICK_EPOCHS if args.quick else workload.epochs)
            outcome = _benchmark(workload, epochs, seeds, grid, store)
            outcomes.append(outcome)
            runs_per_seed = len(GRID) + 3  # at most 3 suggestions beside the grid
            full_estimate_s += len(SEEDS) * (outcome.test_s + runs_per_seed * outcome.run_s * workload.epochs / epochs)
    total_s = time.perf_counter() - started
    load_end = load_average()
    print(f"\nload average at the end: {load_end}; {total_s:.0f} s in all")
    if args.quick:
        print(f"full mode (default epochs) estimated from this run's timings: at most {full_estimate_s / 60:.1f} min "
              "at this machine's load")  # fmt: skip
    default_rule = LRRangeTestConfig().rule  # the stage's default, which this benchmark judges
    print("\n" + "\n".join(verdict(outcomes, default_rule)))
    note = (
        f"{len(seeds)} seed(s), {len(grid)}-LR grid; ratio at the best evaluation (last epoch in brackets); "
        f"load average {load_start} at the start, {load_end} at the end; {total_s / 60:.1f} min in all"
    )
    print(f"\nfor README ({'QUICK MODE, not for README' if args.quick else note}):\n")
    print(markdown(outcomes, default_rule, f"{machine}; {note}"))


def _benchmark(
    workload: Workload, epochs: int, seeds: tuple[int, ...], grid: tuple[float, ...], store: LocalStore
) -> Outcome:
    """Range test, rule runs and grid runs for every seed; print the workload's tables and return its figures."""
    cfgs = {seed: _config(workload, epochs, seed) for seed in seeds}
    datas = {seed: prepare_data(cfg.data, seed, store) for seed, cfg in cfgs.items()}
    cfg, data = cfgs[seeds[0]], datas[seeds[0]]
    lr_test = cfg.tune.lr_range_test
    steps_per_epoch = math.ceil(data.n_train / cfg.train.batch_size)
    role = "HELD OUT (no part in choosing the default rule)" if workload.held_out else "selection workload"
    print(
        f"\n{workload.label} [{role}]: {data.n_train} train / {data.n_val} val samples, batch "
        f"{cfg.train.batch_size}, {epochs} epochs x {steps_per_epoch} steps, {cfg.optim.name} {cfg.optim.schedule}; "
        f"range test: default tune.lr_range_test ({lr_test.num_steps} steps from {lr_test.min_lr:g} to "
        f"{lr_test.max_lr:g}, rule {lr_test.rule}); seeds {list(seeds)}"
    )
    if len(seeds) > 1:
        splits = len({d.fingerprint for d in datas.values()})
        moves = "split, init, shuffle, dropout" if splits == len(seeds) else "init, shuffle, dropout; NOT the split"
        print(f"  the seed moves: {moves} ({splits} distinct data splits over {len(seeds)} seeds)")
    _range_test(cfg.model_copy(update={"tune": _short_test(cfg)}), data, store, "warm-up")  # untimed

    results: dict[int, SeedResult] = {}
    for seed in seeds:
        result = _range_test(cfgs[seed], datas[seed], store, f"{workload.label}/seed-{seed}")
        for lr in [*grid, *(lr for lr in result.suggestions.values() if lr is not None)]:
            if lr not in result.runs:
                result.runs[lr] = _train(cfgs[seed], datas[seed], store, lr)
        results[seed] = result
    return report_workload(
        workload.label, workload.title, workload.held_out, results, grid, lr_test.rule, epochs, steps_per_epoch
    )


def _config(workload: Workload, epochs: int, seed: int) -> Config:
    train = {"max_epochs": epochs, "early_stopping": {"enabled": False}, "progress_bar": False}
    return config_from_dict({**workload.overrides, "seed": seed, "optim": {"lr": 1e-3}, "train": train})


def _short_test(cfg: Config) -> Any:
    """The smallest range test the config accepts, for the untimed warm-up."""
    lr_test = cfg.tune.lr_range_test
    return cfg.tune.model_copy(update={"lr_range_test": lr_test.model_copy(update={"num_steps": 25})})


def _range_test(cfg: Config, data: PrepareDataResult, store: LocalStore, store_key: str) -> SeedResult:
    """The stage as the pipeline calls it (the spec's loop settings at their defaults), timed, and its sweep timed
    inside."""
    sweep_s = []

    def timed_sweep(*args: Any, **kwargs: Any) -> LRCurve:
        started = time.perf_counter()
        curve = lr_sweep(*args, **kwargs)
        sweep_s.append(time.perf_counter() - started)
        return curve

    started = time.perf_counter()
    with mock.patch.object(trainflow.core.lr_range_test, "lr_sweep", timed_sweep):  # wraps the stage's own call, timed
        spec = TrainingSpec.of(cfg, data, lr=cfg.tune.lr_range_test.min_lr).for_tuning()
        result = lr_range_test(cfg.tune.lr_range_test, spec, store, store_key)
    seconds = time.perf_counter() - started
    return SeedResult(seconds, sum(sweep_s), result.num_steps_run, result.diverged, result.suggestions)


def _train(cfg: Config, data: PrepareDataResult, store: LocalStore, lr: float) -> Run:
    """One training run at `lr`, timed from building the trainer to the end of fit."""
    started = time.perf_counter()
    best = _BestValLoss()
    try:
        trainer = build_trainer(TrainingSpec.of(cfg, data, lr=lr), store, [best])
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
