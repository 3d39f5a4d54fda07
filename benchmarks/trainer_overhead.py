"""Trainer overhead: the train stage against a bare PyTorch loop (and Lightning), side by side in one process.

Two kinds of rows, each ratio = median bare seconds / median engine seconds (1.0: as fast as the bare loop),
with a 95% bootstrap interval over rounds, and a check that both sides took the same steps to the same loss.

loop rows (goal >= 0.95): the train stage's code as its Prefect task runs it, without Prefect: the MLflow child
    run is created and its params logged, `core.train.train` fits with its default callbacks (MLflow metrics
    through the background writer, early stopping with patience above max_epochs, checkpoints at their default
    cadence, the end-of-fit saves), the record is logged and the run ended; against `loops.bare_fit`. Rounds
    alternate the order (engine-bare, bare-engine, ...).
stage rows (goals: >= 0.85 at 20 digits epochs, >= 0.97 at 100, ahead of Lightning): the whole train stage as a
    user meets it, its seconds read from summary.json of `flows.pipeline.training_pipeline` on Prefect's
    temporary server (task orchestration, cache key, MLflow child run, data and model setup, fit, saves,
    record); against `loops.bare_fit` and Lightning's `fit` (`lightning_loop.py`), rotating the order per round.
    Each round uses a new seed, so the stage never resumes or reuses a cached result, and all three sides train
    that seed's split and initialisation.
doctor rows (goal >= 0.97, i.e. at most 3% slower): the loop rows' train task body with the training doctor at
    its default schedule (`train.diagnostics`, measuring step 1 and every 50th) against the same body with
    `train.diagnostics.enabled: false`: same model, data, seed and steps, alternating the order per round.

Every side runs after its imports and one untimed warm-up (torch imports torch._dynamo lazily at the first
optimizer, about 1.3 s here): the figures compare the work of a run, not interpreter start-up.

    .venv/bin/python benchmarks/trainer_overhead.py                  # loop, stage and doctor rows (about 15 minutes)
    .venv/bin/python benchmarks/trainer_overhead.py --rows loop --rounds 3
    .venv/bin/python benchmarks/trainer_overhead.py --rows doctor --rounds 10
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from loops import Sample, bare_fit, bootstrap_interval, paired_interval, paired_ratio, speed_ratio
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

from trainflow.core.config import Config, StoreConfig, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.runs import Tracker
from trainflow.core.train import train
from trainflow.core.training.optim import import_optimizer_dependencies
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.context import StageContext, log_result, stage_run

LOOP_GOAL, STAGE_GOALS, DOCTOR_GOAL = 0.95, {20: 0.85, 100: 0.97}, 0.97
DIGITS = {"data": {"source": "sklearn", "name": "digits"}, "model": {"name": "cnn"}}
GPT = {"data": {"source": "text", "seq_len": 64}, "model": {"name": "gpt", "n_layer": 2, "n_embd": 64}}


@dataclass(frozen=True)
class Row:
    label: str
    sections: dict[str, Any]  # on top of BASE
    epochs: int


LOOP_ROWS = [Row("digits, CNN 77k params, 20 epochs x 20 steps of 64", DIGITS, 20),
             Row("pydoc text, GPT 2x64 (119k params), 2 epochs x 103 steps of 64", GPT, 2)]  # fmt: skip
STAGE_ROWS = [Row("digits CNN, 20 epochs", DIGITS, 20), Row("digits CNN, 100 epochs", DIGITS, 100)]
DOCTOR_ROWS = [Row("doctor on vs off: digits, CNN, 20 epochs x 20 steps of 64", DIGITS, 20),
               Row("doctor on vs off: pydoc text, GPT 2x64, 2 epochs x 80 steps of 64", GPT, 2)]  # fmt: skip


def main() -> None:
    default_threads = torch.get_num_threads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=["loop", "stage", "doctor", "all"], default="all")
    parser.add_argument("--only", help="run only the rows whose label contains this text, e.g. '100 epochs'")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per row, after one warm-up round")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, 2 and 4 epochs")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", module="lightning")
    import lightning
    import mlflow

    import_optimizer_dependencies()  # what the first optimizer would import inside a timed run

    for name in ("mlflow", "alembic", "lightning", "lightning.pytorch", "prefect", "trainflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()}; python "
          f"{platform.python_version()}, torch {torch.__version__} ({default_threads} threads), mlflow "
          f"{mlflow.__version__}, lightning {lightning.__version__}")  # fmt: skip
    if args.quick:
        print("QUICK MODE: a smoke test of the benchmark itself; its figures say nothing about the goals")
    lines = []
    with tempfile.TemporaryDirectory(prefix="trainer_overhead-") as tmp:
        if args.rows in ("loop", "all"):
            lines += [_loop_row(row, Path(tmp), args.rounds, args.quick) for row in LOOP_ROWS if _chosen(row, args)]
        if args.rows in ("stage", "all"):
            lines += [_stage_row(row, Path(tmp), args.rounds, args.quick) for row in STAGE_ROWS if _chosen(row, args)]
        if args.rows in ("doctor", "all"):
            lines += [_doctor_row(row, Path(tmp), args.rounds, args.quick) for row in DOCTOR_ROWS if _chosen(row, args)]
    print(f"\nload average at the end: {load_average()}\n")
    print("| row | engine s | bare s | Lightning s | engine vs bare: ratio of medians (95% interval) "
          "| paired per round | Lightning vs bare | goal (on the ratio of medians) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | --- | --- | --- | --- |")
    for line in lines:
        print(line)


def _chosen(row: Row, args: argparse.Namespace) -> bool:
    return args.only is None or args.only in row.label


def _config(row: Row, epochs: int, seed: int, root: Path, doctor: bool = True) -> Config:
    raw = {
        **row.sections,
        "seed": seed,
        "optim": {"lr": 3e-3},
        "train": {
            "max_epochs": epochs,
            "early_stopping": {"patience": epochs + 1},
            "diagnostics": {"enabled": doctor},
        },
        "compress": {
            "enabled": False,
            "measure": {"warmup": 1, "latency_calls": 20, "rounds": 1, "throughput_calls": 1},
        },
        "publish": {"log_mlflow_model": False},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "trainer_overhead"},
        "store": {"uri": str(root / "artifacts")},
    }
    return config_from_dict(raw, source="trainer_overhead")


# ----------------------------------------------------------------------------------------- loop rows
def _loop_row(row: Row, root: Path, rounds: int, quick: bool) -> str:
    store, epochs = LocalStore(root / "artifacts"), (1 if quick else row.epochs)
    cfg = _config(row, epochs, 0, root)
    data = prepare_data(cfg.data, cfg.seed, store)
    tracker = Tracker.for_experiment(cfg.tracking.uri, cfg.tracking.experiment or "trainflow")
    parent = tracker.client.create_run(tracker.experiment_id, run_name="trainer_overhead").info.run_id
    ctx = StageContext(store=StoreConfig(uri=store.uri), tracking_uri=tracker.uri, experiment_id=tracker.experiment_id,
                       parent_run_id=parent)  # fmt: skip
    print(f"\nloop row: {row.label}: {data.n_train} train samples; {rounds} rounds after a warm-up")
    engine, bare = [], []
    for i in range(rounds + 1):
        sides: list[tuple[list[Sample], Callable[[], Sample]]] = [
            (engine, lambda i=i: _engine_fit(cfg, data, store, ctx, f"loop/{row.epochs}/{i}")),
            (bare, lambda i=i: bare_fit(cfg, data, store, root / f"bare-{i}.pt")),
        ]
        for samples, run in sides if i % 2 else sides[::-1]:
            sample = run()
            if i > 0:  # round 0 warms up
                samples.append(sample)
    return _report(row.label, engine, bare, None, LOOP_GOAL)


def _engine_fit(cfg: Config, data: PrepareDataResult, store: LocalStore, ctx: StageContext, key: str) -> Sample:
    """tasks/train.py's body without Prefect: child run and params, fit, record, end of run."""
    started = time.perf_counter()
    spec = TrainingSpec.of(cfg, data)
    with stage_run(ctx, "train", spec.sections()) as run:
        result = train(spec, store, key, logger=run, run_id=run.run_id)
        log_result(run, result)
    seconds = time.perf_counter() - started
    return Sample(seconds, _samples(data, cfg), result.steps, result.best_val_loss)


def _samples(data: PrepareDataResult, cfg: Config) -> int:
    return data.n_train * cfg.train.max_epochs


# ---------------------------------------------------------------------------------------- stage rows
def _stage_row(row: Row, root: Path, rounds: int, quick: bool) -> str:
    from lightning_loop import lightning_fit

    from trainflow.flows.pipeline import training_pipeline

    store, epochs = LocalStore(root / "artifacts"), (row.epochs // 10 if quick else row.epochs)
    print(f"\nstage row: {row.label}; {rounds} rounds after a warm-up, a new seed each")
    engine, bare, lightning = [], [], []
    for i in range(rounds + 1):
        seed = 100 * epochs + i
        cfg = _config(row, epochs, seed, root)
        config_file = root / f"stage-{epochs}-{seed}.yaml"
        config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        data = prepare_data(cfg.data, cfg.seed, store)
        run_engine = partial(_pipeline_train_stage, training_pipeline, config_file, cfg, data)
        run_bare = partial(bare_fit, cfg, data, store, root / f"bare-{seed}.pt")
        lightning_db = f"sqlite:///{root / 'lightning.db'}"
        run_lightning = partial(lightning_fit, cfg, data, store, root / f"lightning-{seed}", lightning_db)
        sides: list[tuple[list[Sample], Callable[[], Sample]]] = [
            (engine, run_engine),
            (bare, run_bare),
            (lightning, run_lightning),
        ]
        for samples, run in sides[i % 3 :] + sides[: i % 3]:
            sample = run()
            if i > 0:
                samples.append(sample)
        if i > 0:
            print(f"  round {i} (seed {seed}): engine {engine[-1].seconds:.2f} s, bare {bare[-1].seconds:.2f} s, "
                  f"lightning {lightning[-1].seconds:.2f} s", flush=True)  # fmt: skip
    goal = STAGE_GOALS.get(row.epochs, STAGE_GOALS[20])
    return _report(row.label, engine, bare, lightning, goal)


def _pipeline_train_stage(
    pipeline: Callable[..., dict[str, Any]], config_file: Path, cfg: Config, data: PrepareDataResult
) -> Sample:
    """The train stage's seconds as summary.json reports them, from a whole pipeline run of `config_file`."""
    stage = pipeline(str(config_file), [], None)["stages"]["train"]
    return Sample(stage["seconds"], _samples(data, cfg), stage["steps"], stage["best_val_loss"])


# --------------------------------------------------------------------------------------- doctor rows
def _doctor_row(row: Row, root: Path, rounds: int, quick: bool) -> str:
    """The train task body with the doctor at its default schedule ("engine") against it without ("bare")."""
    store, epochs = LocalStore(root / "artifacts"), (1 if quick else row.epochs)
    on, off = _config(row, epochs, 0, root), _config(row, epochs, 0, root, doctor=False)
    data = prepare_data(on.data, on.seed, store)
    tracker = Tracker.for_experiment(on.tracking.uri, on.tracking.experiment or "trainflow")
    parent = tracker.client.create_run(tracker.experiment_id, run_name="trainer_overhead doctor").info.run_id
    ctx = StageContext(store=StoreConfig(uri=store.uri), tracking_uri=tracker.uri, experiment_id=tracker.experiment_id,
                       parent_run_id=parent)  # fmt: skip
    every = on.train.diagnostics.every_steps
    print(f"\ndoctor row: {row.label}: {data.n_train} train samples; every_steps {every}; {rounds} rounds after a "
          "warm-up")  # fmt: skip
    watched, plain = [], []
    for i in range(rounds + 1):
        sides: list[tuple[list[Sample], Callable[[], Sample]]] = [
            (watched, lambda i=i: _engine_fit(on, data, store, ctx, f"doctor/{row.epochs}/on/{i}")),
            (plain, lambda i=i: _engine_fit(off, data, store, ctx, f"doctor/{row.epochs}/off/{i}")),
        ]
        for samples, run in sides if i % 2 else sides[::-1]:
            sample = run()
            if i > 0:
                samples.append(sample)
    print("  (engine = doctor on, bare = doctor off)")
    for schedule in (every, 1):  # the default schedule, then a measurement at every step: the doctor's own time
        cfg = _config(row, epochs, 0, root).with_values({"train.diagnostics.every_steps": schedule})
        with _doctor_clock() as clock:
            sample = _engine_fit(cfg, data, store, ctx, f"doctor/{row.epochs}/clock/{schedule}")
        per = clock.seconds / max(1, clock.measured) * 1e3
        print(f"  inside the doctor at every_steps {schedule}: {clock.seconds * 1e3:.0f} ms of {sample.seconds:.2f} s "
              f"({clock.seconds / sample.seconds:.2%}; {clock.measured} measurements, {per:.1f} ms each with the "
              "unmeasured steps' share)")  # fmt: skip
    return _report(row.label, watched, plain, None, DOCTOR_GOAL)


class _Clock:
    seconds, measured = 0.0, 0


@contextmanager
def _doctor_clock() -> Iterator[_Clock]:
    """Time spent in the doctor's callbacks and forward hooks (each call timed), and its measurements counted."""
    from trainflow.core.training.diagnostics import Doctor
    from trainflow.core.training.layer_stats import LayerProbe

    clock = _Clock()
    names = [(Doctor, n) for n in ("on_fit_start", "on_before_optimizer_step", "on_step_end", "on_log",
                                   "on_eval_end", "on_fit_end")]  # fmt: skip
    names += [(LayerProbe, n) for n in ("_layer_hook", "_frozen_hook", "_saturation_hook", "finish")]
    originals = {(cls, n): getattr(cls, n) for cls, n in names}

    def timed(original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - started
                clock.measured += name == "finish"

        return call

    for (cls, name), original in originals.items():
        setattr(cls, name, timed(original, name))
    try:
        yield clock
    finally:
        for (cls, name), original in originals.items():
            setattr(cls, name, original)


# --------------------------------------------------------------------------------------------- report
def _report(label: str, engine: list[Sample], bare: list[Sample], lightning: list[Sample] | None, goal: float) -> str:
    e, b = [s.seconds for s in engine], [s.seconds for s in bare]
    ratio, (low, high) = speed_ratio(e, b), bootstrap_interval(e, b)
    steps = {"engine": {s.steps for s in engine}, "bare": {s.steps for s in bare}}
    gaps = [abs(x.best_val_loss - y.best_val_loss) for x, y in zip(engine, bare, strict=True)]
    print(f"  engine seconds {_list(e)}; bare {_list(b)}")
    print(f"  same work: optimizer steps {steps}; best val/loss gap engine-bare at most {max(gaps):.1e}")
    lightning_cell, lightning_ratio = "", ""
    if lightning:
        lt = [s.seconds for s in lightning]
        lightning_ratio = f"{speed_ratio(lt, b):.3f}"
        lightning_cell = f"{statistics.median(lt):.2f}"
        losses = _list([s.best_val_loss for s in lightning], 4)
        print(
            f"  lightning seconds {_list(lt)}; steps {sorted({s.steps for s in lightning})}, best val/loss {losses} "
            f"(engine {_list([s.best_val_loss for s in engine], 4)})"
        )
    verdict = "met" if ratio >= goal else "**missed**"
    if lightning:
        ahead = ratio > speed_ratio([s.seconds for s in lightning], b)
        verdict += ", ahead of Lightning" if ahead else ", **behind Lightning**"
    paired, (p_low, p_high) = paired_ratio(list(e), list(b)), paired_interval(list(e), list(b))
    print(f"  engine vs bare: {ratio:.3f} (95% interval {low:.3f}-{high:.3f}); goal >= {goal}: {verdict}; "
          f"paired per round: {paired:.3f} ({p_low:.3f}-{p_high:.3f})")  # fmt: skip
    return (f"| {label} | {statistics.median(e):.2f} | {statistics.median(b):.2f} | {lightning_cell} | **{ratio:.3f}** "
            f"({low:.3f}-{high:.3f}) | {paired:.3f} ({p_low:.3f}-{p_high:.3f}) | {lightning_ratio} | "
            f">= {goal}: {verdict} |")  # fmt: skip


def _list(values: list[float], digits: int = 2) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


if __name__ == "__main__":
    sys.exit(main())
