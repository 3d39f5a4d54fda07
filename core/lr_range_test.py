"""The lr_range_test stage: sweep the LR on a fresh copy of the model (the training's own step,
AMP and accumulation included), pick a learning rate by the configured rule, and plot the curve.
"""

from __future__ import annotations

import io
import json
import logging

from core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from core.errors import TrainingError
from core.prepare_data import PrepareDataResult
from core.records import StageResult
from core.store import ArtifactStore
from core.train import build_trainer
from core.training.lr_finder import RULES, LRCurve, lr_sweep, suggest_lr
from core.tune_config import LRRangeTestConfig

log = logging.getLogger(__name__)


class LRRangeTestResult(StageResult):
    suggested_lr: float | None  # None: the reason says why
    rule: str
    reason: str
    num_steps_run: int
    diverged: bool
    suggestions: dict[str, float | None]  # what every rule picks from the same curve
    curve_uri: str  # JSON {"lr": [...], "loss": [...]}
    plot_uri: str  # PNG: loss against LR, log x, suggestions marked

    def artifact_uris(self) -> list[str]:
        return [self.curve_uri, self.plot_uri]


def suggestion_or_error(lr_test: LRRangeTestResult | None, field: str, fix: str) -> float:
    """The suggested LR, or a TrainingError naming who needs it and quoting why there is none."""
    if lr_test is None or lr_test.suggested_lr is None:
        reason = lr_test.reason if lr_test else "the LR range test did not run"
        raise TrainingError(f"{field} needs the LR range test's suggestion, but there is none ({reason}); {fix}")
    return lr_test.suggested_lr


def lr_range_test(
    cfg: LRRangeTestConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    store: ArtifactStore,
    store_key: str,
) -> LRRangeTestResult:
    """Run the range test with the training's model, optimizer, precision and accumulation."""
    trainer = build_trainer(model_cfg, optim_cfg, train_cfg, loader_cfg, seed, data, store, lr=cfg.min_lr)
    curve = lr_sweep(trainer, cfg.min_lr, cfg.max_lr, cfg.num_steps, cfg.smoothing, cfg.diverge_factor)
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
