"""The training doctor (`train.diagnostics`): a callback that measures the trainable layers on a schedule
(layer_stats.py) and watches the loop's own signals (train/loss, train/grad_norm, train/data_wait_fraction,
val/loss, skipped non-finite steps, the LR against the range test's suggestion), and turns them into findings with
a remedy (doctor_rules.py): logged as they appear, kept in the fit's record and in diagnosis.json (docs/doctor.md).

Measured steps are step 1 and every `every_steps`-th; the hooks are armed at the end of the step before, so other
steps pay a few attribute reads. With `on_finding: stop` the first new finding ends the fit
(`StopReason.DIAGNOSIS`); a re-run resumes from the checkpoint, and the findings it holds do not stop it again.

Data-parallel it runs on every rank, but measures and judges on the main rank only (DDP's gradients are already
all-reduced there); a stop is the main rank's decision, shared at every `every_steps`-th step. Under FSDP the
parameters and gradients are sharded: the activation figures and the loop's signals are watched, not the per-layer
gradient and update figures (their norms would be collectives). Under torch.compile no activation hooks (they would
recompile the graph).
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

from trainflow.core.config import DiagnosticsConfig
from trainflow.core.records import Finding
from trainflow.core.training import doctor_rules as rules
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.layer_stats import LayerProbe, Measured
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import FitResult, StopReason

if TYPE_CHECKING:
    from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)
MAX_SERIES = 256  # measurements kept for diagnosis.json; beyond it every other one is dropped (the first kept)
GAP_EVALS = 2  # evaluations in a row with a growing gap (one noisy validation is not a trend)
LOADER_WINDOWS = 3  # log windows in a row above train.diagnostics.data_wait_fraction: loader-bound (not a hiccup)


class Doctor(Callback):
    """Watches a fit. `lr` and `lr_suggestion`: the LR used and the LR range test's suggestion, when there was one."""

    every_rank = True  # data-parallel: every rank takes part in a stop and resumes past one; only the main measures

    def __init__(self, cfg: DiagnosticsConfig, lr: float | None = None, lr_suggestion: float | None = None):
        self.cfg, self.lr, self.lr_suggestion = cfg, lr, lr_suggestion
        self.found: dict[tuple[str, str | None], Finding] = {}
        self.series: list[dict[str, Any]] = []  # per measurement: step and per-layer figures (diagnosis.json)
        self.start: float | None = None  # where the loss started: step 1's (measured), else the first log's
        self.lowest = math.inf  # the lowest finite train/loss logged
        self.train_loss = math.nan  # the last train/loss logged
        self.losses: list[tuple[int, float]] = []  # (step, finite train/loss) of the logs: a window's, older folded
        self.norms: dict[str | None, tuple[int, float]] = {}  # layer (None: the loop) -> (count, largest) grad norm
        self.vanishing: set[str] = set()  # layers vanishing at the last measurement
        self.best_val: tuple[float, float, int] | None = None  # (val/loss, train/loss then, step)
        self.gap_evals = 0  # evaluations in a row with a growing gap
        self.nonfinite_seen = 0
        self._reset_fit()

    @property
    def findings(self) -> list[Finding]:
        """One per rule and layer, in the order first seen."""
        return list(self.found.values())

    def diagnosis(self) -> dict[str, Any]:
        """diagnosis.json: the settings, the findings and the per-layer figures of each measurement kept."""
        return {"settings": self.cfg.model_dump(mode="json"), "findings": [f.model_dump() for f in self.findings],
                "measurements": self.series}  # fmt: skip

    def diagnosis_json(self) -> bytes:
        """`diagnosis` as strict JSON (a non-finite figure is null)."""
        return json.dumps(_finite(self.diagnosis()), indent=1).encode()

    # -------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        s = trainer.state
        if s.stop_reason == StopReason.DIAGNOSIS.value:
            log.info("doctor: resuming past its stop at step %d (%s)", s.step, s.stop_message)
            s.stop_reason, s.stop_message = None, ""
        self._reset_fit()
        self.main, self.window_start = trainer.rank.is_main, s.step
        if not self.main:
            return
        compiled = hasattr(trainer.model, "_orig_mod")
        self.probe = LayerProbe(trainer.module, activations=not compiled, gradients=not trainer.sharded)
        if self.lr and self.lr_suggestion:
            self._add(rules.lr_far_from_suggestion(s.step, self.lr, self.lr_suggestion, self.cfg.lr_factor))
        self._arm_if_due(trainer)

    def on_epoch_start(self, trainer: Trainer) -> None:
        if self.probe is not None and self.probe.armed:  # train.finetune may have frozen or thawed layers just now
            self.probe.arm()

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        if self.probe is not None and self.probe.armed:
            self.probe.after_backward()

    def on_step_end(self, trainer: Trainer) -> None:
        s = trainer.state
        if self.probe is not None:
            if self.probe.measuring:
                window_end = s.step - self.window_start >= self.cfg.window_steps
                losses = trainer.log_window.losses  # this step's loss, read with the layers' figures
                loop = {"loss": losses[-1]} if losses else None
                self._judge(self.probe.finish(s.step, dead=window_end, loop=loop))
                self.window_start = s.step if window_end else self.window_start
            if s.nonfinite_total > self.nonfinite_seen:
                self._add(rules.nonfinite_steps(s.step, s.nonfinite_total))
                self.nonfinite_seen = s.nonfinite_total
            self._arm_if_due(trainer)
        self._stop_if_asked(trainer)

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        step, loss, self.train_loss = trainer.state.step, metrics["train/loss"], metrics["train/loss"]
        if self.start is None and math.isfinite(loss):
            self.start = loss
        start = self.start if self.start is not None else loss
        self._add(rules.diverging_loss(step, loss, start, min(start, self.lowest)))
        self._add(rules.exploding_gradients(step, metrics["train/grad_norm"], self._largest(None)))
        self._count_norm(None, metrics["train/grad_norm"])
        if math.isfinite(loss):
            self.lowest = min(self.lowest, loss)
            self.losses = _folded([*self.losses, (step, loss)], step - self.cfg.window_steps)
            self._add(rules.plateau(step, self.losses, self.cfg.window_steps, start))
        self.waits.append(metrics.get("train/data_wait_fraction", 0.0))
        if len(self.waits) > LOADER_WINDOWS:  # the fit's first window (the loader's start-up) left out
            self._add(rules.loader_bound(step, self.waits[-LOADER_WINDOWS:], self.cfg.data_wait_fraction))

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        val, train = metrics.get("val/loss", math.nan), self.train_loss
        if not self.main or self.start is None or not math.isfinite(val) or not math.isfinite(train):
            return
        if self.best_val is None or val < self.best_val[0]:
            self.best_val, self.gap_evals = (val, train, trainer.state.step), 0
            return
        gap = rules.growing_gap(trainer.state.step, val, train, self.best_val, self.start)
        self.gap_evals = self.gap_evals + 1 if gap is not None else 0
        if self.gap_evals >= GAP_EVALS:
            self._add(gap)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.close()
        if self.main:
            names = ", ".join(f"{f.rule}" + (f" ({f.layer})" if f.layer else "") for f in self.findings)
            log.info("doctor: %d finding(s)%s", len(self.found), f": {names}" if names else "")

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self.close()

    def on_micro_batch_split(self, trainer: Trainer) -> None:
        if self.probe is not None:  # the step runs again on the same data: measure it afresh
            armed = self.probe.armed or self.probe.measuring
            self.probe.close()
            if armed:
                self.probe.arm()

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [f.model_dump() for f in self.findings], "series": self.series, "start": self.start,
                "lowest": self.lowest, "train_loss": self.train_loss, "losses": self.losses,
                "norms": [[layer, *seen] for layer, seen in self.norms.items()], "vanishing": sorted(self.vanishing),
                "best_val": self.best_val, "gap_evals": self.gap_evals,
                "nonfinite_seen": self.nonfinite_seen}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        found = [Finding.model_validate(f) for f in state["findings"]]
        self.found = {(f.rule, f.layer): f for f in found}
        self.series, self.start, self.lowest = state["series"], state["start"], state["lowest"]
        self.train_loss, self.losses = state["train_loss"], [(s, loss) for s, loss in state["losses"]]
        self.norms = {layer: (count, largest) for layer, count, largest in state["norms"]}
        self.vanishing, self.nonfinite_seen = set(state["vanishing"]), state["nonfinite_seen"]
        self.best_val = tuple(state["best_val"]) if state["best_val"] is not None else None  # type: ignore[assignment]
        self.gap_evals = state["gap_evals"]

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"probe": None}  # hooks and device tensors stay in their process

    # ------------------------------------------------------------------------------------------ helpers
    def _reset_fit(self) -> None:
        self.probe: LayerProbe | None = None
        self.main, self.window_start, self.pending = True, 0, None
        self.waits: list[float] = []  # train/data_wait_fraction of this fit's logs

    def _due(self, step: int) -> bool:
        return step == 1 or step % self.cfg.every_steps == 0

    def _arm_if_due(self, trainer: Trainer) -> None:
        if self.probe is not None and self._due(trainer.state.step + 1):
            self.probe.arm()

    def _judge(self, m: Measured) -> None:
        """The per-layer rules on one measurement; the measurement joins the series."""
        if self.start is None and math.isfinite(m.loop.get("loss", math.nan)):
            self.start = m.loop["loss"]  # the fit's first measured step's (step 1): where the loss started
        self.series.append({"step": m.step, "loss": m.loop.get("loss"), "layers": m.layers, "dead": m.dead,
                            "saturated": {k: v[1] for k, v in m.saturated.items()}})  # fmt: skip
        if len(self.series) > MAX_SERIES:
            self.series = self.series[:1] + self.series[2::2]
        rms = {name: m.layers[name]["grad_rms"] for name in _forward_order(m) if "grad_rms" in m.layers[name]}
        for name, figures in m.layers.items():
            if "grad_norm" in figures:
                self._add(rules.exploding_gradients(m.step, figures["grad_norm"], self._largest(name), name))
                self._count_norm(name, figures["grad_norm"])
        vanishing = rules.vanishing_layers(rms, m.kinds, self.cfg.vanishing_ratio)
        for name in [name for name in vanishing if name in self.vanishing]:  # forward order
            self._add(rules.vanishing_gradients(m.step, name, vanishing[name], self.cfg.vanishing_ratio))
        self.vanishing = set(vanishing)
        for found in rules.dead_units(m.step, m.dead, self.cfg.dead_share, self.cfg.window_steps):
            self._add(found)
        for found in rules.saturation(m.step, m.saturated, self.cfg.saturated_share):
            self._add(found)

    def _largest(self, layer: str | None) -> float | None:
        """The largest finite gradient norm seen of `layer` (None: the loop's), once there are enough of them."""
        count, largest = self.norms.get(layer, (0, 0.0))
        return largest if count >= rules.MIN_HISTORY else None

    def _count_norm(self, layer: str | None, norm: float) -> None:
        if math.isfinite(norm):
            count, largest = self.norms.get(layer, (0, 0.0))
            self.norms[layer] = (count + 1, max(largest, norm))

    def _add(self, found: Finding | None) -> None:
        if found is None or not rules.merge(self.found, found):
            return
        log.warning("doctor: %s", found.line())
        if self.cfg.on_finding == "stop" and self.pending is None:
            self.pending = found

    def _stop_if_asked(self, trainer: Trainer) -> None:
        """on_finding: stop: end the fit after this step on a new finding (data-parallel: the main rank's, shared
        at measured steps, where every rank calls the collective)."""
        if self.cfg.on_finding != "stop":
            return
        if trainer.rank.distributed:
            if trainer.state.step % self.cfg.every_steps:
                return
            stop = trainer.main_decides(self.pending is not None)
        else:
            stop = self.pending is not None
        if stop:
            message = self.pending.line() if self.pending is not None else "the training doctor's finding (main rank)"
            trainer.request_stop(StopReason.DIAGNOSIS, message)
            self.pending = None

    def close(self) -> None:
        """Remove any hooks left (after a loop that ends without on_fit_end: the LR range test's sweep)."""
        if self.probe is not None:
            self.probe.close()


def search_doctor(spec: TrainingSpec) -> list[Doctor]:
    """[a Doctor] for an HPO trial or the LR range test when `train.diagnostics.in_search` asks for one, else []."""
    cfg = spec.train.diagnostics
    return [Doctor(cfg, spec.optim.lr)] if cfg.enabled and cfg.in_search else []


def _forward_order(m: Measured) -> list[str]:
    """The measured layers in forward order when the hooks saw it, else in the module's order."""
    seen = [name for name in m.order if name in m.layers]
    return seen + [name for name in m.layers if name not in seen]


def _folded(losses: list[tuple[int, float]], before: int) -> list[tuple[int, float]]:
    """`losses` with the entries at or before step `before` folded into one: their lowest, at the first's step."""
    old = [loss for s, loss in losses if s <= before]
    if len(old) < 2:
        return losses
    return [(losses[0][0], min(old)), *((s, loss) for s, loss in losses if s > before)]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
