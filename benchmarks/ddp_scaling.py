"""Data-parallel scaling: 1 process against N processes (torch's elastic launcher) on the same global work.

Method. Each pair trains the same model, data, seed and number of optimizer steps to the same effective batch:
1 process with micro-batch N*B against N processes with micro-batch B each (early stopping and restore_best off,
a checkpoint at the end only), with and without gradient accumulation (grad_accum_steps 2, which multiplies the
effective batch on both sides alike). Models: the digits CNN and a small GPT (2 layers x 64) on pydoc text.

- Backend: on a CUDA machine with >= 2 GPUs, nccl and one process per GPU (`train.device: cuda`); else gloo on
  CPU with N = 2. On CPU every side gets the same total threads: the 1-process side runs with
  `torch.set_num_threads(cores)`, each rank with cores/N (OMP_NUM_THREADS, which the ranks inherit: torch's
  `elastic_launch` API, unlike the `torchrun` CLI, does not default it to 1; a warm-up probe with it unset shows
  what ranks get by default). A callback on the main rank reports the threads a rank actually runs with.
- samples/s: `TrainResult.samples_per_s` (global, over the training steps, evaluation excluded); tokens/s for
  the GPT = samples/s x seq_len. start-up s = wall time of the whole `fit_in_folder` call minus the steps' time
  (samples trained / samples/s): process launch, imports, rendezvous, model build, evaluation and the final
  save; the launched side pays the first four on top of what the 1-process side pays.
- max |dw|: the largest absolute difference between the final weights (model.pt) of the pair (fp32: the
  gradient sums run in another order across ranks, so ~1e-7..1e-6 is equality), largest over the rounds. The
  CNN cannot match: its BatchNorm normalises over each rank's micro-batch (B, not N*B; no SyncBatchNorm, and
  DDP broadcasts rank 0's running statistics) and its dropout (0.1) draws other masks per rank. The GPT (layer
  norm, no dropout) and the tests' MLP do match.
- Rounds alternate which side runs first; the table shows medians. An untimed 1-process warm-up per model runs
  first. This machine is shared and noisy: read the load average beside the figures.

    .venv/bin/python benchmarks/ddp_scaling.py            # 3 rounds
    .venv/bin/python benchmarks/ddp_scaling.py --quick    # smoke test: 1 round, a few steps
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

from trainflow.core.config import Config, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.checkpoint import FINAL, load_checkpoint
from trainflow.core.training.fit import fit_in_folder
from trainflow.core.training.optim import import_optimizer_dependencies
from trainflow.core.training.spec import TrainingSpec

SEQ_LEN, BATCH = 64, 32  # B: the micro-batch of each of the N processes; the 1-process side runs N*B
MODELS = {
    "digits CNN": {"data": {"source": "sklearn", "name": "digits"}, "model": {"name": "cnn"}},
    "GPT 2x64": {"data": {"source": "text", "seq_len": SEQ_LEN}, "model": {"name": "gpt", "n_layer": 2, "n_embd": 64}},
}
STEPS = {"digits CNN": 300, "GPT 2x64": 150}  # optimizer steps per fit (--quick: a tenth)


class Probe(Callback):
    """On the main rank (it travels there pickled): the threads it runs with, and the samples it trained."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, trainer: Any) -> None:
        self.started = time.time()

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        samples = trainer.state.samples_seen * trainer.rank.world_size
        facts = {"threads": torch.get_num_threads(), "samples": samples, "fit_started": self.started}
        self.path.write_text(json.dumps(facts))


@dataclass(frozen=True)
class Run:
    samples_per_s: float
    wall_s: float
    startup_s: float  # wall minus the steps' time
    to_first_step_s: float  # from the call to the main rank's fit start
    threads: int
    steps: int
    weights: dict[str, torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, a tenth of the steps")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    for name in ("trainflow", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="torch.distributed")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    world = torch.cuda.device_count() if cuda else 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = max(1, cores // world)
    torch.set_num_threads(per_rank * world)
    import_optimizer_dependencies()  # what the first optimizer would import inside a timed run
    backend = f"nccl, {world} processes (one per GPU)" if cuda else f"gloo on CPU, {world} processes"
    print(f"machine: {cpu_model()}, {cores} cores, load average {load_average()}; python "
          f"{platform.python_version()}, torch {torch.__version__}; backend: {backend}; threads: 1 process "
          f"{torch.get_num_threads()}, each rank {per_rank} (OMP_NUM_THREADS)")  # fmt: skip
    if cuda:
        print(f"GPUs: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    if args.quick:
        print("QUICK MODE: a smoke test of the benchmark itself; its figures say little")
    lines = []
    with tempfile.TemporaryDirectory(prefix="ddp_scaling-") as tmp:
        root, store = Path(tmp), LocalStore(Path(tmp) / "artifacts")
        bench = Bench(root, store, world, per_rank, cuda, args.quick)
        if not cuda and "OMP_NUM_THREADS" not in os.environ:
            probe = bench.fit("digits CNN", 1, world, "probe", 2, omp=None)
            print(f"probe, OMP_NUM_THREADS unset in the parent: a launched rank runs with {probe.threads} threads")
        for label in MODELS:
            bench.fit(label, 1, 1, "warm-up", 2)
        for label in MODELS:
            for accum in (1, 2):
                lines += bench.pair(label, accum, rounds)
    print(f"\nload average at the end: {load_average()}\n")
    print("| model | processes | samples/s | tokens/s | speed-up vs 1 process | scaling efficiency "
          "| start-up s (wall - steps) | threads per process | max abs dw |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for line in lines:
        print(line)


@dataclass
class Bench:
    root: Path
    store: LocalStore
    world: int  # N: the processes of the launched side
    per_rank: int  # threads of each rank (OMP_NUM_THREADS)
    cuda: bool
    quick: bool
    data: dict[str, PrepareDataResult] = field(default_factory=dict)

    def config(self, label: str, world: int, accum: int, steps: int) -> Config:
        timeout = {"collective_timeout_s": 120}  # a hang fails in 2 minutes, not 10
        distributed = {"nproc_per_node": world, "rdzv_endpoint": "localhost:0"} | timeout
        train = {"batch_size": BATCH * self.world // world, "grad_accum_steps": accum, "max_steps": steps,
                 "max_epochs": 10_000, "log_every_steps": 10, "progress_bar": False, "resume": False,
                 "early_stopping": {"enabled": False, "restore_best": False},
                 "checkpoint": {"every_steps": None, "min_interval_s": 1e9}, "distributed": distributed,
                 "device": "cuda" if self.cuda else "cpu"}  # fmt: skip
        raw = {**MODELS[label], "seed": 0, "optim": {"lr": 3e-3}, "train": train}
        return config_from_dict(raw, source="ddp_scaling")

    def fit(self, label: str, accum: int, world: int, key: str, steps: int, omp: str | None = "") -> Run:
        """One `fit_in_folder` call, timed; `omp`: OMP_NUM_THREADS for launched ranks ("" = cores / N, None = unset)."""
        cfg = self.config(label, world, accum, steps)
        if label not in self.data:
            self.data[label] = prepare_data(cfg.data, cfg.seed, self.store)
        data, probe_file = self.data[label], self.root / f"{key}.json"
        with _omp_threads(str(self.per_rank) if omp == "" else omp):
            started = time.time()
            done = fit_in_folder(TrainingSpec.of(cfg, data), self.store, key,
                                 callbacks=[Probe(probe_file)])  # fmt: skip
            wall = time.time() - started
        facts = json.loads(probe_file.read_text())
        assert done.world_size == world and done.steps == steps, done
        steps_s = facts["samples"] / done.samples_per_s
        weights = load_checkpoint(self.store.workdir(key) / FINAL)["model"]
        return Run(done.samples_per_s, wall, wall - steps_s, facts["fit_started"] - started, facts["threads"],
                   done.steps, weights)  # fmt: skip

    def pair(self, label: str, accum: int, rounds: int) -> list[str]:
        steps = max(4, STEPS[label] // 10) if self.quick else STEPS[label]
        name = f"{label}{', accum 2' if accum > 1 else ''}"
        print(f"\n{name}: {steps} steps, effective batch {BATCH * self.world * accum} (1 x {BATCH * self.world} "
              f"vs {self.world} x {BATCH}, x {accum} accumulation); {rounds} rounds")  # fmt: skip
        one: list[Run] = []
        many: list[Run] = []
        gaps = []
        for i in range(rounds):
            sides = [(one, 1), (many, self.world)]
            for runs, world in sides if i % 2 == 0 else sides[::-1]:
                runs.append(self.fit(label, accum, world, f"{label[:3]}-a{accum}-p{world}-r{i}", steps))
            gaps.append(_max_abs_diff(one[-1].weights, many[-1].weights))
            a, b = one[-1], many[-1]
            print(f"  round {i + 1}: samples/s 1 process {a.samples_per_s:.0f}, {self.world} processes "
                  f"{b.samples_per_s:.0f}; wall {a.wall_s:.2f} s vs {b.wall_s:.2f} s (to the first step "
                  f"{a.to_first_step_s:.2f} s vs {b.to_first_step_s:.2f} s); threads {a.threads} vs {b.threads} "
                  f"per process; max |dw| {gaps[-1]:.1e}; load average {load_average()}", flush=True)  # fmt: skip
        base = statistics.median(r.samples_per_s for r in one)
        rows = []
        for runs, world in ((one, 1), (many, self.world)):
            rate = statistics.median(r.samples_per_s for r in runs)
            tokens = f"{rate * SEQ_LEN:,.0f}" if label.startswith("GPT") else ""
            speedup = rate / base
            startup = statistics.median(r.startup_s for r in runs)
            gap = f"{max(gaps):.1e}" if world > 1 else ""
            rows.append(f"| {name} | {world} | {rate:,.0f} | {tokens} | {speedup:.2f}x | {speedup / world:.0%} | "
                        f"{startup:.2f} | {runs[0].threads} | {gap} |")  # fmt: skip
        return rows


@contextmanager
def _omp_threads(value: str | None):  # type: ignore[no-untyped-def]
    """OMP_NUM_THREADS in this process's environment (which spawned ranks inherit) for the block."""
    before = os.environ.pop("OMP_NUM_THREADS", None)
    if value is not None:
        os.environ["OMP_NUM_THREADS"] = value
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if before is not None:
            os.environ["OMP_NUM_THREADS"] = before


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), "the same model on both sides"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())


if __name__ == "__main__":
    main()
