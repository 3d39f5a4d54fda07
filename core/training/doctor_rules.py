"""The training doctor's rules: pure functions from figures to a `Finding` (or None) that names the rule, the layer
(None for the loop's own signals), the step, the figure against its threshold and a remedy. docs/doctor.md lists
them; `merge` keeps one finding per rule and layer (the first step, the worst figure)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from trainflow.core.records import Finding

DIVERGE_FACTOR = 2.0  # train/loss above its first log window's and above 2x its lowest so far: diverging
EXPLODE_FACTOR = 10.0  # a gradient norm above 10x the largest of the earlier logs (measurements): exploding
MIN_HISTORY = 3  # earlier figures needed first (early training moves norms by several times)
PLATEAU_GAIN = 0.01  # the last window's lowest train/loss less than 1% below the lowest before it ...
PLATEAU_HIGH = 0.5  # ... while above half the first log window's train/loss (a low loss has converged): plateau
GAP_RISE = 0.2  # val/loss 20% above its best while train/loss kept falling: a growing gap ...
GAP_FLOOR = 0.05  # ... and by at least 5% of where the loss started (near-zero losses rise 20% by chance)
LOWER_IS_WORSE = {"vanishing_gradients", "plateau"}

REMEDIES = {
    "diverging_loss": "lower the LR (optim.lr, or optim.lr: auto), clip gradients (train.grad_clip_norm: 1.0), "
    "add warmup (optim.warmup_steps)",
    "exploding_gradients": "clip gradients (train.grad_clip_norm: 1.0) and lower the LR (optim.lr); normalization "
    "layers or residual connections for deep stacks",
    "vanishing_gradients": "residual connections or normalization layers, ReLU-family activations instead of "
    "sigmoid/tanh, He or Xavier init",
    "dead_units": "lower the LR (optim.lr), a leaky activation (LeakyReLU, GELU, SiLU) or another init "
    "(He init, a small positive bias)",
    "saturation": "normalize what feeds it (a norm layer, scaled inputs), lower the LR, Xavier init, or a "
    "ReLU-family activation",
    "plateau": "a schedule with warmup and decay (optim.schedule: cosine, optim.warmup_steps), or another LR "
    "(optim.lr: auto runs the LR range test)",
    "growing_gap": "augment (train.augment), regularize (model.dropout, optim.weight_decay) or stop earlier "
    "(train.early_stopping.patience)",
    "loader_bound": "more loader workers (data.loader.num_workers), augmentation on the device (train.augment) "
    "instead of per sample in the workers",
    "nonfinite_steps": "lower the LR (optim.lr), clip gradients (train.grad_clip_norm); bf16 instead of fp16; check "
    "the data for NaN or inf",
    "lr_far_from_suggestion": "use the suggestion (optim.lr: auto) or search around it (tune.hpo.space optim.lr "
    "without bounds)",
}


def finding(
    rule: str, step: int, figure: float | None, threshold: float, message: str, layer: str | None = None
) -> Finding:
    figure = figure if figure is None or math.isfinite(figure) else None
    return Finding(rule=rule, layer=layer, step=step, figure=figure, threshold=threshold, message=message,
                   remedy=REMEDIES[rule])  # fmt: skip


def merge(findings: dict[tuple[str, str | None], Finding], new: Finding) -> bool:
    """Keep one finding per (rule, layer): the first step, the worst figure (and its message). True when new."""
    key = (new.rule, new.layer)
    old = findings.get(key)
    if old is None:
        findings[key] = new
        return True
    if _severity(new) > _severity(old):
        findings[key] = new.model_copy(update={"step": old.step})
    return False


def _severity(f: Finding) -> float:
    if f.figure is None:
        return math.inf
    if f.rule == "lr_far_from_suggestion":
        return abs(math.log(f.figure)) if f.figure > 0 else math.inf
    return -f.figure if f.rule in LOWER_IS_WORSE else f.figure


# ----------------------------------------------------------------------------------- the loop's signals
def diverging_loss(step: int, loss: float, start: float, lowest: float) -> Finding | None:
    """The logged train/loss is not finite, or above both where it started (`start`: step 1's loss, else the first
    log window's) and DIVERGE_FACTOR x its lowest so far."""
    if not math.isfinite(loss):
        return finding("diverging_loss", step, None, DIVERGE_FACTOR, "train/loss is not finite")
    if loss > start and lowest > 0 and loss > DIVERGE_FACTOR * lowest:
        return finding("diverging_loss", step, loss / lowest, DIVERGE_FACTOR,
                       f"train/loss {loss:.4g} is {loss / lowest:.3g}x its lowest {lowest:.4g} (> {DIVERGE_FACTOR:g}x) "
                       f"and above where it started, {start:.4g}")  # fmt: skip
    return None


def exploding_gradients(step: int, norm: float, largest: float | None, layer: str | None = None) -> Finding | None:
    """A gradient norm (the loop's train/grad_norm before clipping, or a layer's) that is not finite, or above
    EXPLODE_FACTOR x `largest`, the largest finite one of the earlier logs (measurements), given once there are
    MIN_HISTORY of them."""
    what = f"{layer}'s gradient norm" if layer else "train/grad_norm"
    if not math.isfinite(norm):
        return finding("exploding_gradients", step, None, EXPLODE_FACTOR, f"{what} is not finite", layer)
    if largest is not None and largest > 0 and norm > EXPLODE_FACTOR * largest:
        return finding("exploding_gradients", step, norm / largest, EXPLODE_FACTOR,
                       f"{what} {norm:.4g} is {norm / largest:.3g}x the largest before it, {largest:.4g} "
                       f"(> {EXPLODE_FACTOR:g}x)", layer)  # fmt: skip
    return None


def plateau(step: int, losses: Sequence[tuple[int, float]], window_steps: int, start: float) -> Finding | None:
    """Over the last `window_steps` steps the lowest train/loss gained less than PLATEAU_GAIN on the lowest before,
    while still above PLATEAU_HIGH x `start` (where it started). `losses`: (step, finite train/loss) of the logs
    so far, oldest first; those older than a window may be folded into one entry (their lowest, the first step)."""
    if not losses or step - losses[0][0] < window_steps:
        return None
    before = [loss for s, loss in losses if s <= step - window_steps]
    recent = [loss for s, loss in losses if s > step - window_steps]
    if not before or not recent:
        return None
    low_before, low_recent = min(before), min(recent)
    gain = (low_before - low_recent) / low_before if low_before > 0 else 1.0
    if gain < PLATEAU_GAIN and low_recent > PLATEAU_HIGH * start:
        return finding("plateau", step, gain, PLATEAU_GAIN,
                       f"the lowest train/loss of the last {window_steps} steps, {low_recent:.4g}, is {gain:.1%} below "
                       f"the lowest before ({low_before:.4g}; < {PLATEAU_GAIN:.0%}) and above half where it started, "
                       f"{start:.4g}")  # fmt: skip
    return None


def growing_gap(step: int, val: float, train: float, best: tuple[float, float, int], start: float) -> Finding | None:
    """val/loss GAP_RISE above its best, and by GAP_FLOOR x `start` (where the training loss started), while
    train/loss fell below its value then. `best`: (best val/loss, train/loss at that evaluation, its step)."""
    best_val, train_then, best_step = best
    if best_val <= 0 or not math.isfinite(val) or val < (1 + GAP_RISE) * best_val or not train < train_then:
        return None
    if val - best_val < GAP_FLOOR * start:
        return None
    rise = val / best_val - 1
    return finding("growing_gap", step, rise, GAP_RISE,
                   f"val/loss {val:.4g} is {rise:.0%} above its best {best_val:.4g} (step {best_step}; > "
                   f"{GAP_RISE:.0%} and {GAP_FLOOR:.0%} of the starting loss {start:.4g}) while train/loss fell from "
                   f"{train_then:.4g} to {train:.4g}")  # fmt: skip


def loader_bound(step: int, fractions: Sequence[float], threshold: float) -> Finding | None:
    """train/data_wait_fraction above `threshold` in each of the last log windows given."""
    if not fractions or min(fractions) <= threshold:
        return None
    share = sum(fractions) / len(fractions)
    return finding("loader_bound", step, share, threshold,
                   f"the loop waited for the loader {share:.0%} of its training time over the last {len(fractions)} "
                   f"log windows (> {threshold:.0%})")  # fmt: skip


def nonfinite_steps(step: int, total: int) -> Finding | None:
    if total <= 0:
        return None
    return finding("nonfinite_steps", step, float(total), 0.0,
                   f"{total} optimizer step(s) skipped for a non-finite gradient norm so far")  # fmt: skip


def lr_far_from_suggestion(step: int, lr: float, suggestion: float, factor: float) -> Finding | None:
    """The LR used is more than `factor` above or below the LR range test's suggestion."""
    ratio = lr / suggestion
    if 1 / factor <= ratio <= factor:
        return None
    return finding("lr_far_from_suggestion", step, ratio, factor,
                   f"optim.lr {lr:.3g} is {ratio:.3g}x the LR range test's suggestion {suggestion:.3g} "
                   f"(beyond {factor:g}x either way)")  # fmt: skip


# ------------------------------------------------------------------------------------ per-layer figures
def vanishing_layers(rms: dict[str, float], kinds: dict[str, str], ratio: float) -> dict[str, float]:
    """Layers among the first third (forward order; embeddings left out, their gradients are sparse) whose
    gradient RMS is below `ratio` x the median layer's: layer -> its RMS / the median."""
    ordered = [(name, value) for name, value in rms.items() if "Embedding" not in kinds.get(name, "")]
    values = [value for _, value in ordered if math.isfinite(value)]
    if len(values) < 3:
        return {}
    median = statistics.median(values)
    if median <= 0:
        return {}
    first = ordered[: max(1, len(ordered) // 3)]
    return {name: value / median for name, value in first if math.isfinite(value) and value < ratio * median}


def vanishing_gradients(step: int, layer: str, relative: float, ratio: float) -> Finding:
    return finding("vanishing_gradients", step, relative, ratio,
                   f"{layer}'s gradient RMS is {relative:.2g}x the median layer's (< {ratio:g}x) at two "
                   "measurements in a row", layer)  # fmt: skip


def dead_units(step: int, dead: dict[str, float], threshold: float, window_steps: int) -> list[Finding]:
    return [finding("dead_units", step, share, threshold,
                    f"{share:.0%} of {layer}'s units never activated over the last {window_steps} steps "
                    f"(> {threshold:.0%})", layer)
            for layer, share in dead.items() if share > threshold]  # fmt: skip


def saturation(step: int, saturated: dict[str, tuple[str, float]], threshold: float) -> list[Finding]:
    return [finding("saturation", step, share, threshold,
                    f"{share:.0%} of {activation}'s outputs after {layer} are within 0.01 of its bounds "
                    f"(> {threshold:.0%})", layer)
            for layer, (activation, share) in saturated.items() if share > threshold]  # fmt: skip
