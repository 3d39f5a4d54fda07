"""Trainer overhead: `core.train.train` with its default callbacks against a bare PyTorch loop. Goal: >= 0.95.

The engine run is the train stage itself: MLflow tracking (MlflowMetricLogger on a temporary SQLite
database, a real run per fit), early stopping (on, with patience above max_epochs so it never ends a
run early), checkpointing with its defaults (at evaluations at most once per min_interval_s, always at
the end: last state, best.pt, model.pt) and the progress bar (shown only when stderr is a terminal).
The bare loop does what a hand-written loop does on the same model, data and batches (the same
`build_loaders` output and shuffle, initialisation, optimizer and LR schedule): forward,
cross-entropy, backward, clip_grad_norm_, step, schedule step, zero_grad. Runs alternate in one
process (engine, bare, engine, bare, ...) after one warm-up run of each. Both figures are training
samples/s over the whole loop, the engine's end-of-fit saves included: both loops run a validation
pass per epoch and neither counts its time.

    .venv/bin/python benchmarks/trainer_overhead.py                  # digits/cnn and pydoc/gpt, 5 pairs each
    .venv/bin/python benchmarks/trainer_overhead.py --workload gpt --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)
from torch import nn
from torch.utils.data import DataLoader

from core.config import Config, config_from_dict
from core.data.loaders import Batch
from core.models import build_model
from core.prepare_data import prepare_data
from core.records import PrepareDataResult
from core.storage.store import LocalStore
from core.storage.tracking import Tracker
from core.train import train
from core.training.builder import prepared_loaders
from core.training.callbacks import Callback
from core.training.optim import build_optimizer, build_scheduler
from core.training.precision import resolve_device
from core.training.seed import seed_everything
from core.training.state import FitResult
from core.training.trainer import Trainer

GOAL = 0.95
NOISY_SPREAD = 0.10  # max - min pair ratio above which the table says its figures are noisy


@dataclass(frozen=True)
class Workload:
    label: str
    overrides: dict[str, Any]  # on top of the default config, which is what `make demo` trains
    epochs: int  # per run: sized so the whole benchmark takes a few minutes on 2 CPU cores


WORKLOADS = {
    "digits": Workload(
        "digits/cnn", {"data": {"source": "sklearn", "name": "digits"}}, epochs=20
    ),  # the demo early-stops after about 30
    "gpt": Workload(
        "pydoc/gpt",
        {"data": {"source": "text", "seq_len": 64}, "model": {"name": "gpt", "n_layer": 2, "n_embd": 64}},
        epochs=2,
    ),
}


@dataclass(frozen=True)
class Sample:
    samples_per_s: float  # training samples (images, or seq_len windows) per second, validation excluded
    steps: int
    best_val_loss: float  # equal in both loops when they did the same work


def main() -> None:
    default_threads = torch.get_num_threads()  # torch's choice for this machine, before anything changes it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5, help="timed (engine, bare) pairs after one warm-up pair")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: per workload)")
    parser.add_argument("--threads", type=int, default=default_threads, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.repeats < 1 or (args.epochs is not None and args.epochs < 1) or args.threads < 1:
        parser.error("--repeats, --epochs and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    import mlflow  # up front, so its import time falls in no run

    for name in ("mlflow", "alembic"):  # a fresh SQLite database logs its schema set-up at INFO
        logging.getLogger(name).setLevel(logging.WARNING)

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()}; python "
        f"{platform.python_version()}, torch {torch.__version__}, torch.set_num_threads({torch.get_num_threads()}) "
        f"(torch's default here: {default_threads}), mlflow {mlflow.__version__}"
    )
    bar = "on (stderr is a terminal)" if sys.stderr.isatty() else "off (stderr is not a terminal)"
    print(
        f"engine: core.train.train with its default callbacks: MLflow tracking (SQLite), early stopping "
        f"(patience > max_epochs), checkpoints as configured by default (min_interval_s 60, always at the end), "
        f"progress bar {bar}"
    )
    print(
        "samples/s: from the first step to the end of fit (the engine's final checkpoint, best.pt and model.pt "
        "writes included); both loops run the same per-epoch validation pass and neither counts its time"
    )

    summaries = []
    with tempfile.TemporaryDirectory(prefix="trainer_overhead-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        tracker = Tracker.for_experiment(f"sqlite:///{tmp}/mlflow.db", "trainer_overhead")
        parent_run_id = tracker.client.create_run(tracker.experiment_id, run_name="trainer_overhead").info.run_id
        for flag in WORKLOADS if args.workload == "all" else [args.workload]:
            workload = WORKLOADS[flag]
            epochs = args.epochs or workload.epochs
            train_overrides = {"max_epochs": epochs, "early_stopping": {"patience": epochs + 1}}
            cfg = config_from_dict({**workload.overrides, "optim": {"lr": 3e-3}, "train": train_overrides})
            data = prepare_data(cfg.data, cfg.seed, store)
            summaries.append(_compare(workload.label, cfg, data, store, tracker, parent_run_id, args.repeats))
        tracker.end_run(parent_run_id)
    print(f"\nload average at the end: {load_average()}")
    for line in summaries:
        print(line)


def _compare(
    label: str, cfg: Config, data: PrepareDataResult, store: LocalStore, tracker: Tracker, parent: str, repeats: int
) -> str:
    """Warm up, then alternate engine and bare runs; print the table and return the summary line."""
    started = time.perf_counter()
    n_params = sum(p.numel() for p in build_model(cfg.model, data.spec).parameters())
    steps_per_epoch = math.ceil(data.n_train / cfg.train.batch_size)
    print(
        f"\n{label}: {cfg.train.max_epochs} epochs x {steps_per_epoch} steps of batch {cfg.train.batch_size} "
        f"({data.n_train} train samples, {data.n_val} val), {n_params:,} parameters; "
        f"1 warm-up pair, then {repeats} timed pairs"
    )
    pairs: list[tuple[Sample, Sample]] = []
    for i in range(repeats + 1):
        engine = _engine_run(cfg, data, store, tracker, parent, f"{label}/engine-{i}")
        bare = _bare_run(cfg, data, store)
        if i > 0:  # the first pair is the warm-up
            pairs.append((engine, bare))

    ratios = [engine.samples_per_s / bare.samples_per_s for engine, bare in pairs]
    print(f"  {'pair':>6}  {'engine samples/s':>16}  {'bare samples/s':>14}  {'ratio':>6}")
    for i, ((engine, bare), ratio) in enumerate(zip(pairs, ratios, strict=True), 1):
        print(f"  {i:>6}  {engine.samples_per_s:>16.1f}  {bare.samples_per_s:>14.1f}  {ratio:>6.3f}")
    engine_median = statistics.median(engine.samples_per_s for engine, _ in pairs)
    bare_median = statistics.median(bare.samples_per_s for _, bare in pairs)
    ratio = statistics.median(ratios)
    print(
        f"  {'median':>6}  {engine_median:>16.1f}  {bare_median:>14.1f}  {ratio:>6.3f}   "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    steps = sorted({sample.steps for pair in pairs for sample in pair})
    loss_gap = max(abs(engine.best_val_loss - bare.best_val_loss) for engine, bare in pairs)
    print(
        f"  same work: optimizer steps per run {steps}; best val/loss engine {pairs[0][0].best_val_loss:.6f}, "
        f"bare {pairs[0][1].best_val_loss:.6f} (largest gap over pairs {loss_gap:.1e}); "
        f"{time.perf_counter() - started:.0f} s for this workload"
    )
    if max(ratios) - min(ratios) > NOISY_SPREAD:
        print(
            f"  noisy: pair ratios span {max(ratios) - min(ratios):.2f} (> {NOISY_SPREAD}), more than the overhead "
            "being measured; other load on the machine moves single runs: rerun, or raise --repeats"
        )
    return (
        f"{label}: engine {engine_median:.0f} samples/s, bare {bare_median:.0f} samples/s, "
        f"ratio {ratio:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}; goal >= {GOAL})"
    )


def _engine_run(
    cfg: Config, data: PrepareDataResult, store: LocalStore, tracker: Tracker, parent: str, store_key: str
) -> Sample:
    """The train stage as the pipeline's task calls it, in a fresh folder (nothing to resume) and MLflow run."""
    run_id = tracker.start_stage_run(parent, "train")
    logger = tracker.logger(run_id)
    clock = _FitClock()
    result = train(cfg.model, cfg.optim, cfg.train, cfg.data.loader, cfg.seed, data, store, store_key,
                   logger=logger, run_id=run_id, callbacks=[clock])  # fmt: skip
    logger.flush()
    tracker.end_run(run_id)
    shutil.rmtree(store.workdir(store_key))
    return Sample(clock.samples / clock.seconds, result.steps, result.best_val_loss)


class _FitClock(Callback):
    """Passed last, so its on_fit_end runs after the checkpoint callback's end-of-fit saves."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.started, self.samples_before = time.perf_counter(), trainer.state.samples_seen

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.seconds = time.perf_counter() - self.started - trainer.eval_seconds
        self.samples = trainer.state.samples_seen - self.samples_before


def _bare_run(cfg: Config, data: PrepareDataResult, store: LocalStore) -> Sample:
    """A hand-written loop over the stage's loaders, initialisation, optimizer and schedule."""
    seed_everything(cfg.seed)  # then loaders, then model: the stage's order, so both draw the same numbers
    loaders = prepared_loaders(data, store, cfg.train.batch_size, cfg.data.loader, cfg.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, data.spec).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_epochs * len(loaders.train))
    clip_norm = cfg.train.grad_clip_norm or math.inf
    steps = samples = 0
    eval_seconds, best_val_loss = 0.0, math.inf
    model.train()
    started = time.perf_counter()
    for epoch in range(cfg.train.max_epochs):
        loaders.sampler.set_epoch(epoch)
        for x, y in loaders.train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)  # (B, classes) or (B, T, vocab)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps, samples = steps + 1, samples + len(y)
        eval_started = time.perf_counter()
        best_val_loss = min(best_val_loss, _val_loss(model, loaders.val, device))
        eval_seconds += time.perf_counter() - eval_started
    return Sample(samples / (time.perf_counter() - started - eval_seconds), steps, best_val_loss)


@torch.no_grad()
def _val_loss(model: nn.Module, loader: DataLoader[Batch], device: torch.device) -> float:
    model.eval()
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss_sum += F.cross_entropy(model(x).flatten(0, -2), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.train()
    return loss_sum / n


if __name__ == "__main__":
    main()
