"""The lr_range_test stage: sweep the LR on a fresh copy of the model (the training's own step,
AMP and accumulation included), pick a learning rate by the configured rule, and plot the curve.

Builds on core/tuning/lr_finder.py (the sweep and the rules) and core/training/builder.py (the
Trainer whose step it runs). Whether it runs at all: core/tuning/plan.py `lr_range_test_plan`.
"""

from __future__ import annotations

import io
import json
import logging

from trainflow.core.config import LRRangeTestConfig
from trainflow.core.records import LRRangeTestResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.diagnostics import search_doctor
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.tuning.lr_finder import RULES, LRCurve, lr_sweep, suggest_lr

log = logging.getLogger(__name__)


def lr_range_test(
    cfg: LRRangeTestConfig, spec: TrainingSpec, store: ArtifactStore, store_key: str
) -> LRRangeTestResult:
    """Run the range test with the training's model, optimizer, precision and accumulation (`spec`, whose LR the
    sweep replaces: `core.tuning.plan.lr_range_test_spec`); augmented only with `train.augment.in_lr_range_test`."""
    doctor = search_doctor(spec)  # train.diagnostics.in_search: per-layer rules over the sweep
    trainer = build_trainer(spec, store, doctor)
    if not spec.train.augment.in_lr_range_test:  # the sweep measures the loss curve of the plain data
        trainer.augment = None
    curve = lr_sweep(trainer, cfg.min_lr, cfg.max_lr, cfg.num_steps, cfg.smoothing, cfg.diverge_factor)
    for watching in doctor:
        watching.close()
    suggestions = {rule: suggest_lr(curve, rule, cfg.skip_start, cfg.skip_end)[0] for rule in RULES}
    lr, reason = suggest_lr(curve, cfg.rule, cfg.skip_start, cfg.skip_end)
    if lr is None:
        log.warning("lr_range_test: no suggestion: %s", reason)
    else:
        log.info("lr_range_test: %s suggests lr=%.3g (%s)", cfg.rule, lr, reason)
    curve_json = json.dumps({"lr": curve.lrs, "loss": curve.losses}).encode()
    return LRRangeTestResult(
        suggested_lr=lr,
        rule=cfg.rule,
        reason=reason,
        num_steps_run=len(curve.lrs),
        diverged=curve.diverged,
        suggestions=suggestions,
        curve_uri=store.put_bytes(curve_json, f"{store_key}/lr_curve.json"),
        plot_uri=store.put_bytes(_plot(curve, suggestions, cfg.rule), f"{store_key}/lr_range_test.png"),
        findings=doctor[0].findings if doctor else [],
    )


def _plot(curve: LRCurve, suggestions: dict[str, float | None], chosen: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(curve.lrs, curve.losses, color="tab:blue")
    for (rule, lr), color in zip(suggestions.items(), ("tab:red", "tab:green", "tab:purple"), strict=False):
        if lr is not None:
            style = {"linewidth": 2.0} if rule == chosen else {"linewidth": 1.0, "linestyle": "--"}
            axes.axvline(lr, color=color, label=f"{rule}: {lr:.2g}{' (used)' if rule == chosen else ''}", **style)
    axes.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    axes.legend(loc="upper left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
