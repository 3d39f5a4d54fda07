"""The compress stage: smaller and faster variants of the trained model, each evaluated like the original,
and the one to ship picked by a stated rule.

Recipe, top to bottom:
  1. the bases: the trained model (fp32); magnitude-pruned (`pruned`); channels removed and fine-tuned
     (`pruned_structured`); a distilled student (`distilled`), each trained through the Trainer;
  2. the formats: every base in eager PyTorch; the trained model also in ONNX Runtime fp32 and int8,
     PyTorch dynamic int8 and half precision (as configured); the combinations the config lists;
  3. the same test metrics for every variant, then batch-1 latency and serving-batch throughput with
     the variants alternated in one process, threads fixed;
  4. the recommendation, the table (Markdown, CSV) and the Pareto plot.
A variant that fails (an op the exporter does not support) is a failed row with its reason; the rest go on.

Builds on core/compression/: pruning.py, quantization.py, onnx_export.py, distillation.py (techniques),
variants.py (base + format -> saved, measurable variant), measure.py (metrics and speed), report.py.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from trainflow.core.compression.distillation import DistillationLoss, student_config
from trainflow.core.compression.measure import Candidate, HeldOut, fixed_threads, held_out, measure_speed, task_metrics
from trainflow.core.compression.plan import check_student, plan_formats
from trainflow.core.compression.pruning import StructuredPruner, prune_unstructured
from trainflow.core.compression.report import csv_table, markdown_table, pareto_png, recommend, table_rows
from trainflow.core.compression.variants import Base, BuildContext, build_variant
from trainflow.core.config import CompressConfig
from trainflow.core.data.prepared import load_splits
from trainflow.core.errors import ConfigError
from trainflow.core.records import CompressedVariant, CompressResult, PrepareDataResult, TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.callbacks import Callback, MetricLogger
from trainflow.core.training.checkpoint import trained_model
from trainflow.core.training.fit import fit_in_folder
from trainflow.core.training.precision import resolve_device
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)

LoggerFor = Callable[[str], AbstractContextManager[MetricLogger | None]]  # a training's run inside the stage, by name


def compress(
    cfg: CompressConfig,
    spec: TrainingSpec,
    trained: TrainResult,
    store: ArtifactStore,
    store_key: str,
    logger_for: LoggerFor = lambda name: nullcontext(),
) -> CompressResult:
    """Build, measure and compare the configured variants of the trained model.

    Fine-tunes and the student train `spec` (the main run's tuned training), each in its own store folder so a
    killed run resumes where it stopped, and each logged where `logger_for(name)` says.

    Raises:
        ConfigError: the compress section does not fit this model (checked before any work).
    """
    data = spec.data
    plan = plan_formats(cfg, spec.model, spec.train)
    check_student(cfg, spec.model, data.spec)
    splits = load_splits(store, data)
    test = held_out(splits, data.spec.task, data.spec.seq_len)
    teacher = trained_model(spec, store, trained.checkpoint_uri)
    folder = store.workdir(f"{store_key}/variants")
    ctx = BuildContext(folder, torch.from_numpy(test.x[:1]), _calibration(splits.x["train"], cfg, data),
                       cfg.measure.threads, plan.onnx_int8, plan.half, resolve_device(spec.train.device))  # fmt: skip
    fit = _Fitter(spec, store, store_key, logger_for)

    bases: dict[str, Base | str] = {"fp32": Base("fp32", teacher, "the trained model, eager PyTorch")}
    builders = {"pruned": (cfg.pruning.enabled, lambda: _pruned(teacher, cfg, fit)),
                "pruned_structured": (plan.structured, lambda: _structured(teacher, cfg, ctx, fit)),
                "distilled": (plan.distill, lambda: _distilled(teacher, cfg, fit))}  # fmt: skip
    for name, (enabled, build) in builders.items():
        if enabled:
            bases[name] = _attempt(name, build)

    candidates: list[Candidate] = []
    failed: list[CompressedVariant] = []
    wanted = [("fp32", "torch"), *[("fp32", fmt) for fmt in plan.fp32_formats]]
    wanted += [(name, "torch") for name in bases if name != "fp32"]
    wanted += [(base, fmt) for base, _, fmt in (item.partition("+") for item in cfg.combinations) if base in bases]
    order: list[str] = []
    for base_name, fmt in wanted:
        base = bases[base_name]
        name = base_name if fmt == "torch" else f"{base_name}+{fmt}"
        order.append(name)
        if isinstance(base, str):
            failed.append(_failed(name, base_name, fmt, base))
            continue
        try:
            with fixed_threads(cfg.measure.threads):
                candidates.append(build_variant(base, fmt, ctx))
        except Exception as exc:  # an exporter or quantizer limitation: a failed row, the others go on
            log.warning("compress: variant %s failed: %s", name, _one_line(exc))
            failed.append(_failed(name, base_name, fmt, _one_line(exc)))

    kept = {c.path for c in candidates}
    for leftover in folder.glob("*.onnx"):  # an fp32 export made only to be quantized is not a variant
        if leftover not in kept:
            leftover.unlink()
    variants = sorted(_measure(candidates, test, cfg, store, store_key) + failed, key=lambda v: order.index(v.name))
    m = cfg.measure
    recommended, reason = recommend(variants, data.spec.task, cfg.tolerance.accuracy_drop,
                                    cfg.tolerance.perplexity_rise, m.latency_tie)  # fmt: skip
    rows = table_rows(variants, data.spec.task, recommended)
    table = markdown_table(rows, m.threads, m.serving_batch)
    log.info("compress: recommended %s: %s", recommended, reason)  # the table: the run's summary, artifacts, report
    log.debug("compress: comparison\n%s", table)
    return CompressResult(
        variants=variants,
        task=data.spec.task,
        recommended=recommended,
        reason=reason,
        threads=m.threads,
        serving_batch=m.serving_batch,
        table_uri=store.put_bytes(table.encode(), f"{store_key}/comparison.md"),
        csv_uri=store.put_bytes(csv_table(variants).encode(), f"{store_key}/comparison.csv"),
        plot_uri=store.put_bytes(pareto_png(variants, data.spec.task, recommended), f"{store_key}/pareto.png"),
    )


# ------------------------------------------------------------------------------------ the bases
class _Fitter:
    """Trains inside the stage (fine-tunes, the student) with the main run's tuned training for `epochs`, each in
    its own store folder and tracked run."""

    def __init__(self, spec: TrainingSpec, store: ArtifactStore, store_key: str, logger_for: LoggerFor):
        self.spec, self.store, self.store_key, self.logger_for = spec, store, store_key, logger_for

    def __call__(
        self, name: str, epochs: int, model: torch.nn.Module | None = None, spec: TrainingSpec | None = None,
        **options: Any,
    ) -> tuple[torch.nn.Module, dict[str, object]]:  # fmt: skip
        """The trained model (`model` itself when given, else `spec`'s) on the CPU, and the fit's facts."""
        spec = spec or self.spec
        train = spec.train.model_copy(
            update={"max_epochs": epochs, "max_steps": None, "distributed": spec.train.distributed.on_this_machine()}
        )
        spec = spec.model_copy(update={"train": train})
        with self.logger_for(name) as logger:
            record = fit_in_folder(spec, self.store, f"{self.store_key}/{name}", logger, model=model, **options)
        trained = model if model is not None else trained_model(spec, self.store, record.checkpoint_uri)
        facts = {"epochs": record.epochs_run, "steps": record.steps, "stop_reason": record.stop_reason,
                 "resumed_from_step": record.resumed_from_step, "best_val": record.best_metrics}  # fmt: skip
        return trained.to("cpu").eval(), facts


class _KeepZeros(Callback):
    """Fine-tuning a magnitude-pruned model: the pruned weights stay zero after every optimizer step."""

    every_rank = True  # data-parallel: every replica keeps its zeros

    def __init__(self, model: torch.nn.Module):
        self.masks = {n: p != 0 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}

    def on_step_end(self, trainer: Trainer) -> None:
        self.apply(trainer.module)

    def apply(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.masks:
                    param.mul_(self.masks[name].to(param.device))


def _pruned(teacher: torch.nn.Module, cfg: CompressConfig, fit: _Fitter) -> Base:
    model = copy.deepcopy(teacher)
    report = prune_unstructured(model, cfg.pruning.sparsity)
    details: dict[str, object] = {"layers": report.layers}
    if cfg.pruning.finetune_epochs:
        keep = _KeepZeros(model)
        model, details["finetune"] = fit("pruned", cfg.pruning.finetune_epochs, model=model, callbacks=[keep])
        keep.apply(model)  # an evaluation between a step and its on_step_end may have saved one step's drift
    note = f"global magnitude pruning, {report.overall:.0%} of the weights zero"
    if cfg.pruning.finetune_epochs:
        note += f", fine-tuned {cfg.pruning.finetune_epochs} epoch(s)"
    return Base("pruned", model, note, details)


def _structured(teacher: torch.nn.Module, cfg: CompressConfig, ctx: BuildContext, fit: _Fitter) -> Base:
    s = cfg.structured_pruning
    model = copy.deepcopy(teacher)
    pruner = StructuredPruner(model, ctx.example, s.ratio, s.rounds)
    rounds = []
    for r in range(s.rounds):
        pruner.step()
        if s.finetune_epochs:
            model, facts = fit(f"pruned_structured/round{r}", s.finetune_epochs, model=model)
            rounds.append(facts)
    report = pruner.report()
    note = (
        f"Torch-Pruning, {s.ratio:.0%} of the channels removed in {s.rounds} round(s) ({report.params_removed:.0%} "
        f"of the parameters), fine-tuned {s.finetune_epochs} epoch(s) per round"
    )
    return Base("pruned_structured", model.eval(), note, {"rounds": rounds})


def _distilled(teacher: torch.nn.Module, cfg: CompressConfig, fit: _Fitter) -> Base:
    d = cfg.distillation
    student_cfg = d.student or student_config(fit.spec.model, d.width)
    epochs = d.max_epochs or fit.spec.train.max_epochs
    loss = DistillationLoss(teacher, alpha=d.alpha, temperature=d.temperature)
    model, facts = fit("distilled", epochs, spec=fit.spec.with_model(student_cfg), loss=loss)
    note = f"student {student_cfg.model_dump(exclude_defaults=True)}, alpha {d.alpha}, T {d.temperature}"
    return Base("distilled", model, note, {"student": student_cfg.model_dump(mode="json"), "fit": facts})


def _attempt(name: str, build: Callable[[], Base]) -> Base | str:
    """The base, or why it could not be made (a failed row in the table; the stage goes on)."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as exc:
        log.warning("compress: %s failed: %s", name, _one_line(exc))
        return _one_line(exc)


# ------------------------------------------------------------------------------------ measuring
def _measure(
    candidates: list[Candidate], test: HeldOut, cfg: CompressConfig, store: ArtifactStore, store_key: str
) -> list[CompressedVariant]:
    with fixed_threads(cfg.measure.threads):
        metrics = {c.name: task_metrics(c.predict, test) for c in candidates}
    speeds = measure_speed({c.name: c.predict for c in candidates}, test.x, cfg.measure)
    out = []
    for c in candidates:
        speed = speeds[c.name]
        uri = store.put_file(c.path, f"{store_key}/variants/{c.path.name}")
        out.append(CompressedVariant(
            name=c.name, base=c.base, format=c.format, runtime=c.runtime, status="ok", reason=c.reason, uri=uri,
            size_bytes=c.path.stat().st_size, params=c.params, sparsity=c.sparsity,
            latency_ms_p50=speed.latency_ms_p50, latency_ms_p95=speed.latency_ms_p95, throughput=speed.throughput,
            metrics=metrics[c.name], details=_jsonable(c.details),
        ))  # fmt: skip
    return out


def _calibration(x_train: np.ndarray, cfg: CompressConfig, data: PrepareDataResult) -> np.ndarray:
    if data.spec.task == "language_modeling":
        return np.zeros((0,), dtype=np.int64)  # static quantization is for fixed-shape float inputs
    rng = np.random.default_rng(0)
    take = rng.permutation(len(x_train))[: cfg.quantization.calibration_samples]
    return x_train[np.sort(take)]


def _failed(name: str, base: str, fmt: str, reason: str) -> CompressedVariant:
    runtime = "onnxruntime" if fmt.startswith("onnx") else "torch"
    return CompressedVariant(name=name, base=base, format=fmt, runtime=runtime, status="failed", reason=reason)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _jsonable(value: object) -> dict[str, object]:
    import json

    return json.loads(json.dumps(value, default=str))
