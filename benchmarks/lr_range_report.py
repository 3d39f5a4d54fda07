"""Figures of benchmarks/lr_range_test.py: what one seed measured, the per-workload tables, the verdict on the goal
(selection and held-out workloads apart) and the markdown table for README. Run lr_range_test.py, not this."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from trainflow.core.tuning.lr_finder import RULES

LOSS_GOAL = 1.10  # rule's mean val loss / grid's best mean val loss
COST_GOAL = 0.10  # range test seconds (the stage alone) / the whole grid's training seconds
NOISY_SPREAD = 1.25  # runs doing the same steps this many times slower or faster than others: other load interfered
RULE_TITLES = {"valley": "valley (fastai)", "steepest": "steepest", "min_div_10": "min_div_10"}


@dataclass(frozen=True)
class Run:
    best_val_loss: float  # at the best evaluation: the weights the train stage hands on (restore_best)
    last_val_loss: float  # after the last epoch; both inf when training stopped on non-finite gradients
    seconds: float


PROTOCOLS: dict[str, Callable[[Run], float]] = {
    "best evaluation": lambda run: run.best_val_loss,
    "last epoch": lambda run: run.last_val_loss,
}


@dataclass
class SeedResult:
    range_test_s: float  # the whole stage call
    sweep_s: float  # of which the sweep (lr_sweep)
    steps_run: int
    diverged: bool
    suggestions: dict[str, float | None]
    runs: dict[float, Run] = field(default_factory=dict)  # by LR: the grid's and the suggestions'


@dataclass(frozen=True)
class Outcome:
    label: str
    title: str  # the workload as README's table names it
    held_out: bool  # played no part in choosing the default rule
    epochs: int  # per training run
    best_lr: float  # the grid's, by mean best-evaluation val loss
    best_loss: float
    ratios: dict[str, dict[str, float]]  # protocol -> rule -> its mean val loss / the grid's best (inf: no suggestion)
    test_s: float  # range test (the stage call), mean over seeds
    run_s: float  # one training run, mean over all runs
    test_cost: float  # range test alone / the grid's training seconds
    test_and_run_cost: float  # (range test + the run at the default rule's suggestion) / the grid's training seconds


def report_workload(
    label: str,
    title: str,
    held_out: bool,
    results: dict[int, SeedResult],
    grid: tuple[float, ...],
    default_rule: str,
    epochs: int,
    steps_per_epoch: int,
) -> Outcome:
    """Print a workload's suggestions, loss tables and cost; return its figures."""
    print(f"  {'seed':>4}  {'range test s':>12}  {'sweep s':>7}  {'steps run':>9}  {'diverged':>8}",
          *(f"{rule:>10}" for rule in RULES))  # fmt: skip
    for seed, r in results.items():
        lrs = ("none" if r.suggestions[rule] is None else f"{r.suggestions[rule]:.2e}" for rule in RULES)
        print(f"  {seed:>4}  {r.range_test_s:>12.2f}  {r.sweep_s:>7.2f}  {r.steps_run:>9}  "
              f"{'yes' if r.diverged else 'no':>8}", *(f"{lr:>10}" for lr in lrs))  # fmt: skip

    ratios: dict[str, dict[str, float]] = {}
    for protocol, loss_of in PROTOCOLS.items():
        grid_loss = {lr: statistics.fmean(loss_of(r.runs[lr]) for r in results.values()) for lr in grid}
        best_lr = min(grid, key=lambda lr: grid_loss[lr])
        if protocol == "best evaluation":
            best = (best_lr, grid_loss[best_lr])
        print(f"  val loss at the {protocol}:")
        print(f"  {'grid lr':>8}  {'mean val loss':>13}  per seed")
        for lr in grid:
            per_seed = " ".join(f"{loss_of(r.runs[lr]):.4f}" for r in results.values())
            print(f"  {lr:>8.1e}  {grid_loss[lr]:>13.4f}  {per_seed}{'   <- best' if lr == best_lr else ''}")
        print(f"  {'rule':>10}  {'lr (geo mean)':>13}  {'mean val loss':>13}  {'ratio':>6}  goal <= {LOSS_GOAL:.2f}")
        ratios[protocol] = {}
        for rule in RULES:
            lrs = [lr for r in results.values() if (lr := r.suggestions[rule]) is not None]
            if len(lrs) < len(results):
                print(f"  {rule:>10}  no suggestion for {len(results) - len(lrs)} of {len(results)} seeds")
                ratios[protocol][rule] = math.inf
                continue
            loss = statistics.fmean(loss_of(r.runs[lr]) for r, lr in zip(results.values(), lrs, strict=True))
            ratio = ratios[protocol][rule] = loss / grid_loss[best_lr]
            geo = statistics.geometric_mean(lrs)
            print(f"  {rule:>10}  {geo:>13.2e}  {loss:>13.4f}  {ratio:>6.3f}  {_ok(ratio <= LOSS_GOAL)}")

    test_s = statistics.fmean(r.range_test_s for r in results.values())
    sweep_s = statistics.fmean(r.sweep_s for r in results.values())
    run_seconds = [run.seconds for r in results.values() for run in r.runs.values()]
    run_s = statistics.fmean(run_seconds)
    grid_s = statistics.fmean(sum(r.runs[lr].seconds for lr in grid) for r in results.values())
    with_run = [r.range_test_s + r.runs[lr].seconds for r in results.values() if (lr := r.suggestions[default_rule])]
    test_and_run_s = statistics.fmean(with_run) if with_run else math.inf
    print(
        f"  cost (means over seeds; grid = {len(grid)} training runs, {grid_s:.1f} s): range test alone "
        f"{test_s:.2f} s (sweep {sweep_s:.2f} s) = {test_s / run_s:.3f} of one training run ({run_s:.2f} s), "
        f"{test_s / grid_s:.3f} of the grid   goal < {COST_GOAL:.2f}: {_ok(test_s / grid_s < COST_GOAL)}"
    )
    print(
        f"        range test + the one training run at its {default_rule} suggestion: {test_and_run_s:.2f} s = "
        f"{test_and_run_s / grid_s:.3f} of the grid (not the goal's figure)"
    )
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
    return Outcome(
        label=label,
        title=title,
        held_out=held_out,
        epochs=epochs,
        best_lr=best[0],
        best_loss=best[1],
        ratios=ratios,
        test_s=test_s,
        run_s=run_s,
        test_cost=test_s / grid_s,
        test_and_run_cost=test_and_run_s / grid_s,
    )


def verdict(outcomes: list[Outcome], default_rule: str) -> list[str]:
    """The rule closest to the grid optimum on the selection workloads, and the goal per group of workloads."""
    lines = []
    for held_out, group in ((False, "selection"), (True, "held-out")):
        chosen = [o for o in outcomes if o.held_out == held_out]
        if not chosen:
            continue
        names = ", ".join(o.label for o in chosen)
        ratios = [o.ratios["best evaluation"] for o in chosen]
        worst = {rule: max(by_rule[rule] for by_rule in ratios) for rule in RULES}
        mean = {rule: statistics.fmean(by_rule[rule] for by_rule in ratios) for rule in RULES}
        best = min(RULES, key=lambda rule: (worst[rule], mean[rule]))
        scores = ", ".join(f"{rule} {worst[rule]:.3f} (mean {mean[rule]:.3f})" for rule in RULES)
        role = "the choice of the default rule" if not held_out else "for reference only: no part in the choice"
        lines.append(
            f"{group} workloads ({names}): closest to the grid optimum: {best} (worst ratio over the workloads, mean "
            f"breaks ties; {role}): {scores}"
        )
        worst_cost = max(o.test_cost for o in chosen)
        met = worst[default_rule] <= LOSS_GOAL and worst_cost < COST_GOAL
        lines.append(
            f"  goal on the {group} workloads, default rule {default_rule}: worst ratio {worst[default_rule]:.3f} "
            f"(<= {LOSS_GOAL:.2f}), worst range-test-alone cost {worst_cost:.3f} of the grid (< {COST_GOAL:.2f}), "
            f"with its training run {max(o.test_and_run_cost for o in chosen):.3f}: {_ok(met)}"
        )
    return lines


def markdown(outcomes: list[Outcome], default_rule: str, machine: str) -> str:
    """README's table: ratio at the best evaluation (at the last epoch in brackets) per rule, and both costs."""
    rules = [default_rule, *(rule for rule in RULES if rule != default_rule)]
    header = ["workload", "held out", "epochs", "grid best", *(RULE_TITLES[rule] for rule in rules),
              "range test alone / grid", "range test + its run / grid"]  # fmt: skip
    lines = [f"| {' | '.join(header)} |", f"| {' | '.join('---' for _ in header)} |"]
    for o in outcomes:
        cells = [o.title, "**yes**" if o.held_out else "no", str(o.epochs), f"{o.best_loss:.4f} at {o.best_lr:.1e}"]
        for rule in rules:
            best, last = o.ratios["best evaluation"][rule], o.ratios["last epoch"][rule]
            cell = f"{best:.3f} ({last:.3f})"
            cells.append(f"**{cell}**" if rule == default_rule else cell)
        cells.append(f"{o.test_s:.1f} s: {o.test_s / o.run_s:.2f} of one run, **{o.test_cost:.3f}**")
        cells.append(f"{o.test_and_run_cost:.3f}")
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join([machine, "", *lines])


def _ok(met: bool) -> str:
    return "met" if met else "NOT met"
