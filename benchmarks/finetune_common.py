"""Shared by the fine-tuning benchmark (`finetune.py`, whose docstring states the protocol): its settings and
budgets, the verdict rows, the text corpus, configs, pretraining and test-perplexity curves."""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainflow.core.config import Config, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
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


@dataclass(frozen=True)
class Verdict:
    name: str
    figure: str
    goal: str
    met: bool


# ----------------------------------------------------------------------------------------------- text: data, runs
def stdlib_corpus(path: Path, target_bytes: int) -> str:
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


def text_config(seed: int, path: str | None, steps: int, lr: float, eval_every: int | None, **extra: Any) -> Config:
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


def pretrain(seed: int, budget: Budget, store: LocalStore) -> str:
    """The GPT trained on pydoc text with the train stage; returns its model.pt path."""
    cfg = text_config(seed, None, budget.pretrain_steps, LR, None)
    data = prepare_data(cfg.data, seed, store)
    started = time.perf_counter()
    result = train(TrainingSpec.of(cfg, data), store, f"pretrain/seed-{seed}")
    val = result.best_metrics.get("val/perplexity", float("nan"))
    print(f"pretrained on pydoc text, seed {seed}: {result.steps} steps ({data.n_train} windows of {SEQ_LEN} bytes), "
          f"val perplexity {val:.2f}, {time.perf_counter() - started:.0f} s")  # fmt: skip
    return str(store.local_path(result.checkpoint_uri))


class TestCurve(Callback):
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


def text_run(cfg: Config, corpus_data: PrepareDataResult, store: LocalStore, key: str, eval_every: int) -> TextRun:
    curve = TestCurve(eval_every)
    started = time.perf_counter()
    result = train(TrainingSpec.of(cfg, corpus_data), store, key, callbacks=[curve])
    seconds = time.perf_counter() - started
    return TextRun(curve.curve, 1000 * statistics.median(curve.step_s), result.trainable_parameters,
                   result.total_parameters, seconds)  # fmt: skip


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, ppl in curve if ppl <= target), None)


def interpolated(curve: list[tuple[int, float]], target: float) -> float | None:
    """The step where the curve crosses `target`, linear between the evaluations around the first crossing."""
    for (s0, p0), (s1, p1) in itertools.pairwise(curve):
        if p0 > target >= p1:
            return s0 + (s1 - s0) * (p0 - target) / (p0 - p1)
    return None


def mean_curve(runs: Sequence[TextRun]) -> list[tuple[int, float]]:
    curves = [r.curve for r in runs]
    return [(points[0][0], statistics.fmean(p[1] for p in points)) for points in zip(*curves, strict=True)]


def spread(values: Sequence[float], fmt: str = ".3f") -> str:
    mean = statistics.fmean(values)
    return f"{mean:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else "")
