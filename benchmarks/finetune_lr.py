"""Part 3 of `finetune.py`: the LR range test on a fine-tune's first phase against a grid of LRs."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

from finetune_common import FREEZE_LOWER, LR, OPTIM, Budget, Verdict, text_config

from trainflow.core.config import Config, LRRangeTestConfig
from trainflow.core.errors import TrainingError
from trainflow.core.lr_range_test import lr_range_test
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import LRRangeTestResult, PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.spec import TrainingSpec


# ------------------------------------------------------------------------------------------------ LR range test
def lr_range(
    seeds: Sequence[int], budget: Budget, store: LocalStore, corpus: str, pretrained: dict[int, str]
) -> list[Verdict]:
    steps = budget.grid_steps
    finetune = {"freeze": FREEZE_LOWER}

    def config(seed: int) -> Config:
        return text_config(seed, corpus, steps, LR, None, init_from=pretrained[seed], finetune=finetune)

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
    range_test(cfg0, lr_test.model_copy(update={"num_steps": 25}), data, store, "warm-up")  # untimed: one-time costs
    suggestions: dict[int, dict[str, float | None]] = {}
    losses: dict[int, dict[float, float]] = {}
    untrained: dict[int, float] = {}
    test_s, grid_s = [], []
    for seed in seeds:
        cfg = config(seed)
        untrained[seed] = build_trainer(TrainingSpec.of(cfg, data), store).validate()["val/loss"]
        started = time.perf_counter()
        result = range_test(cfg, lr_test, data, store, f"lr-range/seed-{seed}")
        test_s.append(time.perf_counter() - started)
        suggestions[seed] = result.suggestions
        losses[seed] = {}
        seconds = 0.0
        for lr in budget.grid:
            losses[seed][lr], s = final_val_loss(cfg, data, store, lr)
            seconds += s
        grid_s.append(seconds)
        for lr in result.suggestions.values():
            if lr is not None and lr not in losses[seed]:
                losses[seed][lr], _ = final_val_loss(cfg, data, store, lr)
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


def range_test(
    cfg: Config, lr_test: LRRangeTestConfig, data: PrepareDataResult, store: LocalStore, key: str
) -> LRRangeTestResult:
    """The stage as benchmarks/lr_range_test.py calls it (the spec's loop settings at their defaults)."""
    spec = TrainingSpec.of(cfg, data, lr=lr_test.min_lr).for_tuning()
    return lr_range_test(lr_test, spec, store, key)


def final_val_loss(cfg: Config, data: PrepareDataResult, store: LocalStore, lr: float) -> tuple[float, float]:
    """(val loss after the last step, seconds) of one run at `lr`; inf when it diverges."""
    started = time.perf_counter()
    try:
        loss = build_trainer(TrainingSpec.of(cfg, data, lr=lr), store).fit().last_metrics["val/loss"]
    except TrainingError as exc:
        print(f"  lr {lr:.3g}, seed {cfg.seed}: {exc}")
        loss = math.inf
    return loss, time.perf_counter() - started
