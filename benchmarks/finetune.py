"""Fine-tuning: transfer against training from scratch, LoRA against full fine-tuning, the LR range test on a
fine-tune against a grid, and a new head on digits (frozen-then-unfrozen, full, scratch); side by side, 3 seeds.

The GPT is configs/text_gpt.yaml's (4 layers x 128, RMSNorm, SwiGLU, AdamW lr 2e-3, weight decay 0.1, betas
0.9/0.95, 50 warmup steps, cosine to 0) with two changes that make it fit 2 CPU cores: 64-byte windows in batches
of 16 (the yaml: 128 x 32) and fp32 (the yaml's bf16 autocast is ~18x slower than fp32 on a CPU without AVX-512
BF16, such as this one). Every run has early stopping off and `restore_best` off: the weights after the last step.
A seed is the config's `seed` of every run of that seed (pretraining included): init, shuffle, LoRA's init and,
for digits, the split and the subsample; text splits are contiguous by design, so there it moves init and shuffle.

1. Transfer. Per seed, the GPT is pretrained on the bundled pydoc text (`data.path: null`) with `core.train.train`,
   then trained on a second corpus, the Python standard library's own top-level .py sources (every k-th file in
   sorted order, the smallest k giving at most ~1.2 MB, in one file; val 1%, test 3%: the contiguous split makes
   the tail the test set): from scratch and fine-tuned (`model.init_from` = the pretrained model.pt), same steps,
   same optimizer settings.
   A callback evaluates the test split every `eval_every_steps` (and before the first step); each curve point is the
   test perplexity of the weights at that step. Figures: scratch's final test perplexity, and the first step at
   which the fine-tune's test perplexity is at or below it, both on the curves averaged over seeds (each seed's
   step beside them). Goal: that step <= 1/3 of the steps.
2. LoRA (`model.lora: {r: 4, target_modules: [qkv]}`, alpha 16, at lr 1e-2: adapters take a higher LR than full
   fine-tuning; chosen before this benchmark by 150-step runs on seed 0 at 2e-3, 1e-2 and 3e-2, val perplexity
   6.79, 6.60 and 6.74 against 5.97 for full fine-tuning at 2e-3; not tuned further) against the full fine-tune of
   part 1: same pretrained model, steps and schedule. Figures: trainable parameters (% of the total, which for
   LoRA includes the adapters; goal <= 2%); final test perplexity (goal: LoRA's <= 1.03 x full's, means over
   seeds); step time: median ms per step over `timing_rounds` rounds of 10 steps per variant, the two trainers
   alternated round by round in one process so that load from other work hits both alike (the median step between
   evaluations of the runs themselves beside it); peak memory: resident set size (psutil, sampled every 2 ms in a
   thread) above its value just before the trainer is built, in a fresh spawned process per variant running
   `memory_steps` steps (torch's CPU allocations are not seen by tracemalloc, and a process that trained before
   re-uses freed pages, so each variant gets its own process; peft and torch._dynamo are imported before the
   baseline in both); that process's peak RSS (ru_maxrss) beside it.
3. LR range test on a fine-tune's first phase: `train.finetune.freeze: [blocks.0, blocks.1]` (the lower half of the
   transformer, frozen throughout these runs) from the pretrained model, on the stdlib corpus. The stage
   (`core.lr_range_test.lr_range_test`, default `tune.lr_range_test`, which sweeps what the first phase trains) as
   benchmarks/lr_range_test.py calls it, one run at each rule's suggestion (valley, steepest, min_div_10: the
   stage's `suggestions`, one curve) and one at every LR of a quarter-decade grid (3.2e-4 .. 1e-1), each
   `grid_steps` steps with warmup and cosine. Figure: the val loss after the last step; ratio = a rule's mean over
   seeds / the grid's best mean. Goal: the default rule's ratio <= 1.10. Beside it, the val loss of the starting
   weights (no step at all): how much of the margin a fine-tune's head start already covers. Cost: the range
   test's seconds over the grid's seconds (build and fit).
4. Digits (sklearn `load_digits`, 8x8, `model.name: cnn`, channels [32, 64], AdamW lr 3e-3, batch 64). Per seed the
   stage's own split (prepare_data, stratified, standard-scaled: 70/15/15) is cut into new prepared .npz files
   (`core.data.prepared.splits_to_npz`, a `PrepareDataResult` with its `DataSpec`): pretraining = the train and val
   samples of classes 0-4 only (5 classes); fine-tuning = all the old classes' (0-4) train samples plus 10% of each
   new class's (5-9) train samples (seeded, at least 1 per class), val likewise; test = the whole ten-class test
   split. The CNN is trained on 0-4 (`core.train.train`), then on the fine-tuning data with `model.reinit: [head]`:
   (a) `train.finetune: {freeze: [stem, blocks], unfreeze_at_epoch: K, layer_lr_decay: 0.5}` (K = a third of the
   epochs), (b) full fine-tuning, (c) from scratch; same epochs. Figure: test accuracy on all ten classes (old and
   new classes apart beside it); the best mean wins.

On a loaded machine timings mean little: the load average is printed at the start and the end. Beside other
work on 2 cores, `--threads 1` is much faster than torch's 2 threads, which then wait on each other (one GPT step:
~0.3 s against ~1.8 s, measured here beside a test run; idle: 0.11 s against 0.07 s).

    cd benchmarks
    ../.venv/bin/python finetune.py             # 3 seeds, all parts
    ../.venv/bin/python finetune.py --threads 1 # the same beside other work: ~25 min measured on a loaded machine
    ../.venv/bin/python finetune.py --quick     # smoke test only (1 seed, a few dozen steps): ~1.2 min
    ../.venv/bin/python finetune.py --part digits --seeds 0 1
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import itertools
import logging
import math
import os
import platform
import resource
import statistics
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

from trainflow.core.config import Config, LRRangeTestConfig, config_from_dict
from trainflow.core.data.prepared import ArraySplits, load_splits, splits_to_npz
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import TrainingError
from trainflow.core.lr_range_test import lr_range_test
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import LRRangeTestResult, PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.metrics import eval_pass, perplexity
from trainflow.core.training.spec import TrainingSpec

GPT = {"name": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "norm": "rmsnorm", "mlp": "swiglu", "dropout": 0.0}
OPTIM = {"weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 50}  # configs/text_gpt.yaml
LR = 2e-3  # configs/text_gpt.yaml: scratch and full fine-tuning
LORA_LR = 1e-2
LORA = {"r": 4, "alpha": 16.0, "target_modules": ["qkv"]}
FREEZE_LOWER = ["blocks.0", "blocks.1"]
SEQ_LEN, BATCH = 64, 16
GRID = tuple(10 ** (k / 4) for k in range(-14, -3))  # quarter decades: 3.2e-4, 5.6e-4, 1e-3, ... 1e-1
DIGITS = {"name": "cnn", "channels": [32, 64]}
DIGITS_LR, DIGITS_BATCH, NEW_SHARE = 3e-3, 64, 0.10
SEEDS = (0, 1, 2)
TIMED_STEPS = 10
PARTS = ("transfer", "lora", "lr", "digits")


@dataclass(frozen=True)
class Budget:
    corpus_bytes: int  # the stdlib corpus
    pretrain_steps: int  # on pydoc text
    steps: int  # each transfer / LoRA run
    eval_every: int  # test perplexity curve
    grid_steps: int  # each LR-grid run of part 3
    grid: tuple[float, ...]
    range_steps: int | None  # the range test's num_steps; None: tune.lr_range_test's default
    memory_steps: int  # each memory probe
    timing_rounds: int  # alternated step timing, TIMED_STEPS steps per round and variant
    digits_pretrain_epochs: int
    digits_epochs: int


FULL = Budget(1_200_000, 600, 500, 50, 100, GRID, None, 40, 7, 30, 30)
QUICK = Budget(200_000, 30, 30, 10, 20, (1e-3, 1e-2), 30, 8, 2, 3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, a few dozen steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="config seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 beside other work")
    args = parser.parse_args()
    if args.seeds is not None and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        parser.error("--seeds must be distinct and >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    seeds = tuple(args.seeds) if args.seeds else (SEEDS[:1] if args.quick else SEEDS)
    parts = PARTS if args.part == "all" else (args.part,)
    import matplotlib  # the range test plots its curve: imported here, outside any timed call

    matplotlib.use("Agg")
    import matplotlib.pyplot

    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    load_start = load_average()
    print(f"machine: {machine}; load average {load_start}")
    if args.quick:
        print("QUICK MODE (smoke test only; its figures decide nothing)")
    print(f"seeds {list(seeds)}; budget {budget}")
    started = time.perf_counter()
    verdicts: list[Verdict] = []
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        if {"transfer", "lora", "lr"} & set(parts):
            corpus = _stdlib_corpus(Path(tmp) / "stdlib.py.txt", budget.corpus_bytes)
            pretrained = {seed: _pretrain(seed, budget, store) for seed in seeds}
            if "transfer" in parts or "lora" in parts:
                verdicts += _transfer_and_lora(parts, seeds, budget, store, corpus, pretrained)
            if "lr" in parts:
                verdicts += _lr_range(seeds, budget, store, corpus, pretrained)
        if "digits" in parts:
            verdicts += _digits(seeds, budget, store)
    total_s = time.perf_counter() - started
    load_end = load_average()
    print(f"\nload average at the end: {load_end}; {total_s / 60:.1f} min in all")
    note = (
        f"{len(seeds)} seed(s); load average {load_start} at the start, {load_end} at the end; {total_s / 60:.0f} min"
    )
    print(f"\nsummary ({'QUICK MODE, decides nothing' if args.quick else note}); {machine}\n")
    print("| comparison | figure | goal | verdict |\n| --- | --- | --- | --- |")
    for v in verdicts:
        print(f"| {v.name} | {v.figure} | {v.goal} | {'met' if v.met else '**MISSED**'} |")


@dataclass(frozen=True)
class Verdict:
    name: str
    figure: str
    goal: str
    met: bool


# ----------------------------------------------------------------------------------------------- text: data, runs
def _stdlib_corpus(path: Path, target_bytes: int) -> str:
    """Every k-th top-level .py file of the standard library in sorted order (k: the smallest giving at most about
    `target_bytes`), each after a `# file:` line, in one UTF-8 file; returns its path."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    total = sum(f.stat().st_size for f in files)
    stride = max(1, math.ceil(total / target_bytes))
    chosen = files[::stride]
    text = "".join(f"# file: {f.name}\n{f.read_text(encoding='utf-8')}\n" for f in chosen)
    path.write_text(text, encoding="utf-8")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    print(f"\nstdlib corpus: {len(chosen)} of {len(files)} top-level .py files of {sysconfig.get_paths()['stdlib']} "
          f"(every {stride}th, sorted; {chosen[0].name} .. {chosen[-1].name}), {path.stat().st_size / 1e6:.2f} MB, "
          f"sha256 {sha}")  # fmt: skip
    return str(path)


def _text_config(seed: int, path: str | None, steps: int, lr: float, eval_every: int | None, **extra: Any) -> Config:
    """The benchmark's GPT training on `path` (None: pydoc text); `extra`: model fields (init_from, lora) and
    `finetune` (train.finetune)."""
    finetune = extra.pop("finetune", None)
    data = {"source": "text", "path": path, "seq_len": SEQ_LEN, "val_fraction": 0.01 if path else 0.05,
            "test_fraction": 0.03 if path else 0.05}  # fmt: skip
    train_cfg = {"max_epochs": 1000, "max_steps": steps, "batch_size": BATCH, "precision": "fp32", "device": "cpu",
                 "eval_every_steps": eval_every, "early_stopping": {"enabled": False, "restore_best": False},
                 "progress_bar": False, "resume": False}  # fmt: skip
    if finetune:
        train_cfg["finetune"] = finetune
    raw = {"seed": seed, "data": data, "model": {**GPT, **extra}, "optim": {**OPTIM, "lr": lr}, "train": train_cfg}
    return config_from_dict(raw)


def _pretrain(seed: int, budget: Budget, store: LocalStore) -> str:
    """The GPT trained on pydoc text with the train stage; returns its model.pt path."""
    cfg = _text_config(seed, None, budget.pretrain_steps, LR, None)
    data = prepare_data(cfg.data, seed, store)
    started = time.perf_counter()
    result = train(TrainingSpec.of(cfg, data), store, f"pretrain/seed-{seed}")
    val = result.best_metrics.get("val/perplexity", float("nan"))
    print(f"pretrained on pydoc text, seed {seed}: {result.steps} steps ({data.n_train} windows of {SEQ_LEN} bytes), "
          f"val perplexity {val:.2f}, {time.perf_counter() - started:.0f} s")  # fmt: skip
    return str(store.local_path(result.checkpoint_uri))


class _TestCurve(Callback):
    """Test perplexity before the first step and at every evaluation; median step time between evaluations."""

    def __init__(self, eval_every: int | None):
        self.eval_every = eval_every
        self.curve: list[tuple[int, float]] = []
        self.step_s: list[float] = []
        self._last = 0.0

    def _test(self, trainer: Any) -> None:
        result = eval_pass(trainer.model, trainer.loaders.test, trainer.device, trainer.autocast)
        self.curve.append((trainer.state.step, perplexity(result.loss)))

    def on_fit_start(self, trainer: Any) -> None:
        self._test(trainer)
        self._last = time.perf_counter()

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if not self.curve or self.curve[-1][0] != trainer.state.step:
            self._test(trainer)

    def on_step_end(self, trainer: Any) -> None:
        now, step = time.perf_counter(), trainer.state.step
        evaluated = self.eval_every is not None and step % self.eval_every == 0
        if step > 1 and not evaluated:  # the first step pays one-time costs; an evaluation step its evaluation
            self.step_s.append(now - self._last)
        self._last = time.perf_counter()


@dataclass
class TextRun:
    curve: list[tuple[int, float]]  # (step, test perplexity)
    ms_per_step: float
    trainable: int
    total: int
    seconds: float

    @property
    def final(self) -> float:
        return self.curve[-1][1]


def _text_run(cfg: Config, corpus_data: PrepareDataResult, store: LocalStore, key: str, eval_every: int) -> TextRun:
    curve = _TestCurve(eval_every)
    started = time.perf_counter()
    result = train(TrainingSpec.of(cfg, corpus_data), store, key, callbacks=[curve])
    seconds = time.perf_counter() - started
    return TextRun(curve.curve, 1000 * statistics.median(curve.step_s), result.trainable_parameters,
                   result.total_parameters, seconds)  # fmt: skip


def _first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, ppl in curve if ppl <= target), None)


def _interpolated(curve: list[tuple[int, float]], target: float) -> float | None:
    """The step where the curve crosses `target`, linear between the evaluations around the first crossing."""
    for (s0, p0), (s1, p1) in itertools.pairwise(curve):
        if p0 > target >= p1:
            return s0 + (s1 - s0) * (p0 - target) / (p0 - p1)
    return None


def _mean_curve(runs: Sequence[TextRun]) -> list[tuple[int, float]]:
    curves = [r.curve for r in runs]
    return [(points[0][0], statistics.fmean(p[1] for p in points)) for points in zip(*curves, strict=True)]


def _spread(values: Sequence[float], fmt: str = ".3f") -> str:
    mean = statistics.fmean(values)
    return f"{mean:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else "")


def _transfer_and_lora(
    parts: Sequence[str],
    seeds: Sequence[int],
    budget: Budget,
    store: LocalStore,
    corpus: str,
    pretrained: dict[int, str],
) -> list[Verdict]:
    steps, every = budget.steps, budget.eval_every
    corpus_data = prepare_data(_text_config(seeds[0], corpus, steps, LR, every).data, seeds[0], store)
    print(f"\n== 1/2. transfer and LoRA on the stdlib corpus: {corpus_data.n_train} train / {corpus_data.n_val} val / "
          f"{corpus_data.n_test} test windows of {SEQ_LEN} bytes; {steps} steps of batch {BATCH} per run "
          f"({steps * BATCH / corpus_data.n_train:.2f} epochs); test perplexity every {every} steps")  # fmt: skip
    variants: dict[str, Callable[[int], Config]] = {
        "scratch": lambda seed: _text_config(seed, corpus, steps, LR, every),
        "full fine-tune": lambda seed: _text_config(seed, corpus, steps, LR, every, init_from=pretrained[seed]),
    }
    if "lora" in parts:
        variants["LoRA r=4 qkv"] = lambda seed: _text_config(seed, corpus, steps, LORA_LR, every,
                                                             init_from=pretrained[seed], lora=LORA)  # fmt: skip
    if "transfer" not in parts:
        del variants["scratch"]
    runs: dict[str, dict[int, TextRun]] = {name: {} for name in variants}
    for seed in seeds:
        for name, make in variants.items():  # the variants alternate within each seed: load hits them alike
            run = _text_run(make(seed), corpus_data, store, f"text/{name.split()[0]}/seed-{seed}", every)
            runs[name][seed] = run
            print(f"  seed {seed}, {name}: test perplexity {run.curve[0][1]:.2f} at step 0 -> {run.final:.3f} at "
                  f"step {run.curve[-1][0]}; {run.ms_per_step:.0f} ms/step; {run.seconds:.0f} s")  # fmt: skip
    verdicts: list[Verdict] = []
    means = {name: _mean_curve(list(r.values())) for name, r in runs.items()}
    print("\ntest perplexity against steps (means over seeds):\n")
    names = list(runs)
    print("| step | " + " | ".join(names) + " |\n| ---: |" + " ---: |" * len(names))
    for i, (step, _) in enumerate(means[names[0]]):
        print(f"| {step} | " + " | ".join(f"{means[n][i][1]:.3f}" for n in names) + " |")

    if "scratch" in runs:
        scratch = [runs["scratch"][s].final for s in seeds]
        target = statistics.fmean(scratch)
        reached = _first_reaching(means["full fine-tune"], target)
        per_seed = [_first_reaching(runs["full fine-tune"][s].curve, runs["scratch"][s].final) for s in seeds]
        shown = ", ".join(
            f"seed {s}: {'not reached' if r is None else r}" for s, r in zip(seeds, per_seed, strict=True)
        )
        fraction = None if reached is None else reached / steps
        between = _interpolated(means["full fine-tune"], target)
        linear = "" if between is None else f"; linear between evaluations ~{between:.0f} ({between / steps:.2f})"
        tuned = runs["full fine-tune"]
        start = _spread([tuned[s].curve[0][1] for s in seeds])
        print(f"\n1. transfer: scratch's final test perplexity {_spread(scratch)} (mean, range over seeds) after "
              f"{steps} steps; the full fine-tune first at or below it at step {reached} of {steps} "
              f"({'never' if fraction is None else f'{fraction:.2f} of the steps'}{linear}; per seed against its own "
              f"scratch run: {shown}); the fine-tune's final {_spread([tuned[s].final for s in seeds])}, its "
              f"step 0 (pretrained, not trained on the corpus) {start}")  # fmt: skip
        figure = (f"scratch's final test ppl {target:.3f} after {steps} steps; fine-tune reaches it at step "
                  f"{reached if reached is not None else 'never'} ({'-' if fraction is None else f'{fraction:.2f}'} "
                  f"of the steps{linear}; per seed {', '.join(str(r) for r in per_seed)}; evaluated every {every} "
                  "steps)")  # fmt: skip
        verdicts.append(Verdict("1. transfer (stdlib .py, GPT 4x128)", figure, "<= 1/3 of the steps",
                                fraction is not None and fraction <= 1 / 3))  # fmt: skip
    if "LoRA r=4 qkv" in runs:
        verdicts += _lora_report(runs, seeds, budget, store, corpus, pretrained)
    return verdicts


def _lora_report(
    runs: dict[str, dict[int, TextRun]],
    seeds: Sequence[int],
    budget: Budget,
    store: LocalStore,
    corpus: str,
    pretrained: dict[int, str],
) -> list[Verdict]:
    full, lora = runs["full fine-tune"], runs["LoRA r=4 qkv"]
    names = {"full fine-tune": ({}, LR), "LoRA r=4 qkv": ({"lora": LORA}, LORA_LR)}
    memory, cfgs = {}, {}
    for name, (extra, lr) in names.items():
        cfg = _text_config(seeds[0], corpus, budget.memory_steps, lr, None, init_from=pretrained[seeds[0]], **extra)
        memory[name], cfgs[name] = _memory_probe(cfg, store.root, torch.get_num_threads()), cfg
    alternated = _alternated_step_ms(cfgs, store, budget.timing_rounds)
    print(f"\n2. LoRA against full fine-tuning ({budget.steps} steps each). Step time (a machine that may be running "
          f"other work): median ms of {budget.timing_rounds} rounds of {TIMED_STEPS} steps per variant, the variants "
          "alternated round by round in one process (the figure used), and the median step between evaluations of "
          "the runs above, mean over seeds, in brackets. Memory: RSS above its value just before the trainer is built "
          f"(peft and torch._dynamo already imported), sampled every 2 ms, in a fresh process per variant running "
          f"{budget.memory_steps} steps; that process's ru_maxrss beside it:\n")  # fmt: skip
    print(
        "| variant | trainable params | % of total | test ppl | ms/step | peak RSS above start (MB) "
        "| process peak RSS (MB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, by_seed in (("full fine-tune", full), ("LoRA r=4 qkv", lora)):
        run, mem = by_seed[seeds[0]], memory[name]
        ppl = _spread([by_seed[s].final for s in seeds])
        in_runs = statistics.fmean(by_seed[s].ms_per_step for s in seeds)
        print(f"| {name} | {run.trainable:,} | {100 * run.trainable / run.total:.2f}% | {ppl} | {alternated[name]:.0f} "
              f"({in_runs:.0f}) | {mem['delta_mb']:.0f} | {mem['maxrss_mb']:.0f} |")  # fmt: skip
    share = lora[seeds[0]].trainable / lora[seeds[0]].total
    lora_ppl, full_ppl = (statistics.fmean(r[s].final for s in seeds) for r in (lora, full))
    ratio = lora_ppl / full_ppl
    ms_ratio = alternated["LoRA r=4 qkv"] / alternated["full fine-tune"]
    mem_ratio = memory["LoRA r=4 qkv"]["delta_mb"] / max(memory["full fine-tune"]["delta_mb"], 1e-9)
    print(f"\nLoRA: {100 * share:.2f}% of the parameters train; test perplexity {ratio:.4f} x full's; step time "
          f"{ms_ratio:.2f} x; training memory (RSS above start) {mem_ratio:.2f} x")  # fmt: skip
    trainable = f"{lora[seeds[0]].trainable:,} of {lora[seeds[0]].total:,} = {100 * share:.2f}%"
    figure = (f"{lora_ppl:.3f} vs {full_ppl:.3f} = {ratio:.4f} x (step time {alternated['LoRA r=4 qkv']:.0f} vs "
              f"{alternated['full fine-tune']:.0f} ms; RSS above start {memory['LoRA r=4 qkv']['delta_mb']:.0f} vs "
              f"{memory['full fine-tune']['delta_mb']:.0f} MB)")  # fmt: skip
    return [
        Verdict("2. LoRA trainable share", trainable, "<= 2%", share <= 0.02),
        Verdict("2. LoRA test perplexity vs full fine-tune", figure, "<= 1.03 x", ratio <= 1.03),
    ]


def _alternated_step_ms(cfgs: dict[str, Config], store: LocalStore, rounds: int) -> dict[str, float]:
    """Median ms per optimizer step of each config's trainer, `rounds` rounds of `TIMED_STEPS` steps each, the
    trainers alternated round by round (after 3 untimed steps each), so load from other work hits them alike."""
    trainers, batches = {}, {}
    for name, cfg in cfgs.items():
        data = prepare_data(cfg.data, cfg.seed, store)
        trainer = build_trainer(TrainingSpec.of(cfg, data), store)
        trainer.model.train()
        trainer.loaders.sampler.set_epoch(0, start=0)
        trainers[name], batches[name] = trainer, iter(trainer.loaders.train)
        for _ in range(3):
            trainer.train_step([next(batches[name])])
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            steps = [[next(batches[name])] for _ in range(TIMED_STEPS)]
            started = time.perf_counter()
            for micro_batches in steps:
                trainer.train_step(micro_batches).loss.item()
            times[name].append((time.perf_counter() - started) / TIMED_STEPS)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------- memory probe
def _memory_probe(cfg: Config, store_root: Path, threads: int) -> dict[str, float]:
    """Peak RSS of training `cfg` in a fresh spawned process (see the module docstring)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_memory_child, cfg.model_dump(mode="json"), str(store_root), threads).result()


def _memory_child(raw: dict[str, Any], store_root: str, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    store = LocalStore(Path(store_root))
    cfg = config_from_dict(raw)
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    for module in ("peft", "torch._dynamo"):  # a LoRA model's build, the first optimizer: modules, not training
        importlib.import_module(module)

    gc.collect()
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        build_trainer(spec, store).fit()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"start_mb": start / 2**20, "delta_mb": (peak[0] - start) / 2**20, "maxrss_mb": maxrss}


# ------------------------------------------------------------------------------------------------ LR range test
def _lr_range(
    seeds: Sequence[int], budget: Budget, store: LocalStore, corpus: str, pretrained: dict[int, str]
) -> list[Verdict]:
    steps = budget.grid_steps
    finetune = {"freeze": FREEZE_LOWER}

    def config(seed: int) -> Config:
        return _text_config(seed, corpus, steps, LR, None, init_from=pretrained[seed], finetune=finetune)

    data = prepare_data(config(seeds[0]).data, seeds[0], store)
    lr_test = config(seeds[0]).tune.lr_range_test
    if budget.range_steps is not None:
        lr_test = lr_test.model_copy(update={"num_steps": budget.range_steps})
    print(f"\n== 3. LR range test on a fine-tune's first phase (freeze {FREEZE_LOWER}, frozen throughout) against "
          f"{len(budget.grid)} grid LRs ({budget.grid[0]:.1e} .. {budget.grid[-1]:.1e}); {steps} steps per run, warmup "
          f"{OPTIM['warmup_steps']} then cosine; range test: default tune.lr_range_test ({lr_test.num_steps} "
          f"steps {lr_test.min_lr:g} .. {lr_test.max_lr:g}, rule {lr_test.rule}); one run at every rule's "
          "suggestion; figure: val loss after the last step; 'untrained': the val loss of the starting weights "
          "(the pretrained model), the reference for what the 1.10 margin allows")  # fmt: skip
    cfg0 = config(seeds[0])
    _range_test(cfg0, lr_test.model_copy(update={"num_steps": 25}), data, store, "warm-up")  # untimed: one-time costs
    suggestions: dict[int, dict[str, float | None]] = {}
    losses: dict[int, dict[float, float]] = {}
    untrained: dict[int, float] = {}
    test_s, grid_s = [], []
    for seed in seeds:
        cfg = config(seed)
        untrained[seed] = build_trainer(TrainingSpec.of(cfg, data), store).validate()["val/loss"]
        started = time.perf_counter()
        result = _range_test(cfg, lr_test, data, store, f"lr-range/seed-{seed}")
        test_s.append(time.perf_counter() - started)
        suggestions[seed] = result.suggestions
        losses[seed] = {}
        seconds = 0.0
        for lr in budget.grid:
            losses[seed][lr], s = _final_val_loss(cfg, data, store, lr)
            seconds += s
        grid_s.append(seconds)
        for lr in result.suggestions.values():
            if lr is not None and lr not in losses[seed]:
                losses[seed][lr], _ = _final_val_loss(cfg, data, store, lr)
        every = ", ".join(f"{k} {v:.2e}" if v else f"{k} none" for k, v in result.suggestions.items())
        diverged = ", diverged" if result.diverged else ""
        print(f"  seed {seed}: range test {test_s[-1]:.1f} s ({result.num_steps_run} steps{diverged}); suggestions: "
              f"{every}; grid {seconds:.0f} s; untrained val loss {untrained[seed]:.4f}")  # fmt: skip
    print("\n| LR | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n| ---: |" + " ---: |" * (len(seeds) + 1))
    grid_means = {lr: statistics.fmean(losses[s][lr] for s in seeds) for lr in budget.grid}
    for lr in budget.grid:
        print(f"| {lr:.2e} | " + " | ".join(f"{losses[s][lr]:.4f}" for s in seeds) + f" | {grid_means[lr]:.4f} |")
    best_lr = min(grid_means, key=grid_means.__getitem__)
    best = grid_means[best_lr]
    cost = sum(test_s) / sum(grid_s)
    print(f"\ngrid's best: {best:.4f} at {best_lr:.2e} (mean over seeds); range test {cost:.3f} of the grid's "
          f"seconds\n\n| rule | suggested LR per seed | val loss (mean) | ratio to the grid's best |\n"
          "| --- | --- | ---: | ---: |")  # fmt: skip
    ratios: dict[str, float | None] = {}
    for rule in suggestions[seeds[0]]:
        picked = [suggestions[s][rule] for s in seeds]
        if any(lr is None for lr in picked):
            ratios[rule] = None
            print(f"| {rule} | {', '.join('none' if v is None else f'{v:.2e}' for v in picked)} | - | - |")
            continue
        mean = statistics.fmean(losses[s][lr] for s, lr in zip(seeds, picked, strict=True))  # type: ignore[index]
        ratios[rule] = mean / best
        default = " (default)" if rule == lr_test.rule else ""
        print(f"| {rule}{default} | {', '.join(f'{v:.2e}' for v in picked)} | {mean:.4f} | {mean / best:.4f} |")
    reference = statistics.fmean(untrained.values())
    print(f"| untrained (no step) | - | {reference:.4f} | {reference / best:.4f} |")
    ratio = ratios[lr_test.rule]
    picked = ", ".join("none" if suggestions[s][lr_test.rule] is None else f"{suggestions[s][lr_test.rule]:.2e}"
                       for s in seeds)  # fmt: skip
    if ratio is None:
        figure = f"{lr_test.rule}: no suggestion for some seed ({picked})"
    else:
        others = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'} x" for k, v in ratios.items() if k != lr_test.rule)
        figure = (f"{lr_test.rule} picked {picked}: val loss {ratio * best:.4f} vs grid best {best:.4f} (lr "
                  f"{best_lr:.2e}) = {ratio:.3f} x, at {cost:.3f} of the grid's time; other rules {others}; "
                  f"untrained weights {reference / best:.3f} x")  # fmt: skip
    met = ratio is not None and ratio <= 1.10
    print(f"\n3. LR range test ({lr_test.rule}, the default rule): {figure}: {'met' if met else 'MISSED'}")
    return [Verdict("3. LR range test on a fine-tune (lower half frozen)", figure, "<= 1.10 x grid's best", met)]


def _range_test(
    cfg: Config, lr_test: LRRangeTestConfig, data: PrepareDataResult, store: LocalStore, key: str
) -> LRRangeTestResult:
    """The stage as benchmarks/lr_range_test.py calls it (the spec's loop settings at their defaults)."""
    spec = TrainingSpec.of(cfg, data, lr=lr_test.min_lr).for_tuning()
    return lr_range_test(lr_test, spec, store, key)


def _final_val_loss(cfg: Config, data: PrepareDataResult, store: LocalStore, lr: float) -> tuple[float, float]:
    """(val loss after the last step, seconds) of one run at `lr`; inf when it diverges."""
    started = time.perf_counter()
    try:
        loss = build_trainer(TrainingSpec.of(cfg, data, lr=lr), store).fit().last_metrics["val/loss"]
    except TrainingError as exc:
        print(f"  lr {lr:.3g}, seed {cfg.seed}: {exc}")
        loss = math.inf
    return loss, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------------- digits
@dataclass
class DigitsRun:
    accuracy: float
    old: float  # classes 0-4
    new: float  # classes 5-9
    seconds: float
    trainable_start: int = 0


def _digits_config(seed: int, epochs: int, model: dict[str, Any] | None = None, **train_extra: Any) -> Config:
    train_cfg = {"max_epochs": epochs, "batch_size": DIGITS_BATCH, "device": "cpu", "progress_bar": False,
                 "early_stopping": {"enabled": False, "restore_best": False}, "resume": False}  # fmt: skip
    raw = {"seed": seed, "data": {"source": "sklearn", "name": "digits"}, "model": {**DIGITS, **(model or {})},
           "optim": {"lr": DIGITS_LR}, "train": train_cfg | train_extra}  # fmt: skip
    return config_from_dict(raw)


def _prepared(store: LocalStore, name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], spec: DataSpec,
              source: str) -> PrepareDataResult:  # fmt: skip
    """A prepared .npz of `splits` and its record, as prepare_data writes them."""
    arrays = ArraySplits({s: x for s, (x, _) in splits.items()}, {s: y for s, (_, y) in splits.items()},
                         spec.class_names, int(np.prod(spec.input_shape)))  # fmt: skip
    payload = splits_to_npz(arrays)
    fingerprint = hashlib.sha256(payload + spec.model_dump_json().encode()).hexdigest()
    uri = store.put_bytes(payload, f"data/{name}-{fingerprint[:16]}/splits.npz")
    counts = [len(splits[s][1]) for s in ("train", "val", "test")]
    return PrepareDataResult(fingerprint=fingerprint, uri=uri, source=source, n_train=counts[0], n_val=counts[1],
                             n_test=counts[2], spec=spec)  # fmt: skip


def _digits_data(seed: int, store: LocalStore) -> tuple[PrepareDataResult, PrepareDataResult, str]:
    """(classes 0-4, the fine-tuning set, a description) from the stage's ten-class split of `seed`."""
    full = prepare_data(_digits_config(seed, 1).data, seed, store)
    arrays = load_splits(store.local_path(full.uri), full.spec)
    rng = np.random.default_rng(seed)
    old_data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    new_data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "val", "test"):
        x, y = arrays.x[split], arrays.y[split]
        old = y < 5
        old_data[split] = (x[old], y[old])
        if split == "test":
            new_data[split] = (x, y)  # every class, all of it
            continue
        keep = list(np.flatnonzero(old))
        for c in range(5, 10):
            members = np.flatnonzero(y == c)
            keep += list(rng.choice(members, max(1, round(NEW_SHARE * len(members))), replace=False))
        keep_idx = np.sort(np.array(keep))
        new_data[split] = (x[keep_idx], y[keep_idx])
    spec5 = full.spec.model_copy(update={"n_classes": 5, "class_names": full.spec.class_names[:5]})
    pre = _prepared(store, f"digits-0to4-seed{seed}", old_data, spec5, "sklearn:digits classes 0-4")
    ft = _prepared(store, f"digits-ft-seed{seed}", new_data, full.spec, "sklearn:digits 0-4 + 10% of 5-9")
    n_new = {s: int((new_data[s][1] >= 5).sum()) for s in ("train", "val")}
    text = (f"pretraining {pre.n_train} train / {pre.n_val} val (classes 0-4); fine-tuning {ft.n_train} train "
            f"({ft.n_train - n_new['train']} old + {n_new['train']} new) / {ft.n_val} val ({n_new['val']} new); test "
            f"{ft.n_test} (ten classes)")  # fmt: skip
    return pre, ft, text


def _digits_fit(cfg: Config, data: PrepareDataResult, store: LocalStore) -> DigitsRun:
    started = time.perf_counter()
    trainer = build_trainer(TrainingSpec.of(cfg, data), store)
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    trainer.fit()
    result = eval_pass(trainer.model, trainer.loaders.test, trainer.device, trainer.autocast, collect=True)
    assert result.predictions is not None and result.targets is not None
    right, y = result.predictions == result.targets, result.targets
    return DigitsRun(float(right.mean()), float(right[y < 5].mean()), float(right[y >= 5].mean()),
                     time.perf_counter() - started, trainable)  # fmt: skip


def _digits(seeds: Sequence[int], budget: Budget, store: LocalStore) -> list[Verdict]:
    epochs = budget.digits_epochs
    unfreeze = max(1, epochs // 3)
    print(f"\n== 4. digits: CNN {DIGITS['channels']} pretrained on classes 0-4 ({budget.digits_pretrain_epochs} "
          f"epochs), then on all old-class samples + {NEW_SHARE:.0%} of each new class's for {epochs} epochs, head "
          f"re-initialised; AdamW lr {DIGITS_LR:g}, batch {DIGITS_BATCH}, cosine; (a) freeze [stem, blocks] until "
          f"epoch {unfreeze}, layer_lr_decay 0.5; (b) full fine-tune; (c) scratch")  # fmt: skip
    variants = {
        f"(a) frozen, unfrozen at epoch {unfreeze}, layer_lr_decay 0.5": (
            True, {"finetune": {"freeze": ["stem", "blocks"], "unfreeze_at_epoch": unfreeze, "layer_lr_decay": 0.5}}),
        "(b) full fine-tune": (True, {}),
        "(c) from scratch": (False, {}),
    }  # fmt: skip
    runs: dict[str, dict[int, DigitsRun]] = {name: {} for name in variants}
    for seed in seeds:
        pre, ft, text = _digits_data(seed, store)
        cfg = _digits_config(seed, budget.digits_pretrain_epochs)
        parent = train(TrainingSpec.of(cfg, pre), store, f"digits/pretrain-seed-{seed}")
        path = str(store.local_path(parent.checkpoint_uri))
        print(f"  seed {seed}: {text}; pretrained val accuracy (0-4) {parent.best_metrics.get('val/accuracy', 0):.3f}")
        for name, (warm, extra) in variants.items():
            model = {"init_from": path, "reinit": ["head"]} if warm else {}
            run = _digits_fit(_digits_config(seed, epochs, model, **extra), ft, store)
            runs[name][seed] = run
            print(f"    {name}: test accuracy {run.accuracy:.4f} (old {run.old:.3f}, new {run.new:.3f}); "
                  f"{run.trainable_start:,} parameters train at the start; {run.seconds:.1f} s")  # fmt: skip
    print("\n| variant | test accuracy, 10 classes | old classes 0-4 | new classes 5-9 |\n| --- | ---: | ---: | ---: |")
    means = {}
    for name, by_seed in runs.items():
        values = [by_seed[s] for s in seeds]
        means[name] = statistics.fmean(r.accuracy for r in values)
        print(f"| {name} | {_spread([r.accuracy for r in values], '.4f')} | {_spread([r.old for r in values])} | "
              f"{_spread([r.new for r in values])} |")  # fmt: skip
    winner = max(means, key=means.__getitem__)
    ranked = " > ".join(f"{n.split()[0]} {means[n]:.4f}" for n in sorted(means, key=means.__getitem__, reverse=True))
    print(f"\n4. digits: {ranked} (mean test accuracy over {len(seeds)} seeds): {winner} wins")
    return [Verdict("4. digits 0-4 -> 0-9 (10% of new-class samples)", f"{ranked}; winner {winner.split()[0]}",
                    "report the winner", True)]  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
