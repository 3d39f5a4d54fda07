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
from dataclasses import dataclass

import numpy as np
import torch

from trainflow.core.compression.distillation import DistillationLoss, student_config
from trainflow.core.compression.measure import Candidate, HeldOut, fixed_threads, held_out, measure_speed, task_metrics
from trainflow.core.compression.plan import check_student, plan_formats
from trainflow.core.compression.pruning import StructuredPruner, prune_unstructured
from trainflow.core.compression.report import csv_table, markdown_table, pareto_png, recommend, table_rows
from trainflow.core.compression.variants import Base, BuildContext, build_variant
from trainflow.core.config import CompressConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.data.prepared import load_splits
from trainflow.core.errors import ConfigError
from trainflow.core.models import build_model
from trainflow.core.records import CompressedVariant, CompressResult, PrepareDataResult, TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.callbacks import Callback, MetricLogger
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.precision import resolve_device
from trainflow.core.training.run import fit_in_folder
from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)

LoggerFor = Callable[[str], MetricLogger | None]  # a logger for a training inside the stage, by name


@dataclass(frozen=True)
class TrainingSetup:
    """What a fine-tune or a student trains with: the main run's tuned sections."""

    optim: OptimConfig
    train: TrainConfig
    loader: LoaderConfig
    seed: int


def compress(
    cfg: CompressConfig,
    model_cfg: ModelConfig,
    setup: TrainingSetup,
    data: PrepareDataResult,
    trained: TrainResult,
    store: ArtifactStore,
    store_key: str,
    logger_for: LoggerFor = lambda name: None,
) -> CompressResult:
    """Build, measure and compare the configured variants of the trained model.

    Raises:
        ConfigError: the compress section does not fit this model (checked before any work).
    """
    plan = plan_formats(cfg, model_cfg, setup.train)
    check_student(cfg, model_cfg, data.spec)
    splits = load_splits(store.local_path(data.uri), data.spec)
    test = held_out(splits, data.spec.task, data.spec.seq_len)
    teacher = build_model(model_cfg, data.spec)
    teacher.load_state_dict(load_checkpoint(store.local_path(trained.checkpoint_uri))["model"])
    teacher.eval()
    folder = store.workdir(f"{store_key}/variants")
    ctx = BuildContext(folder, torch.from_numpy(test.x[:1]), _calibration(splits.x["train"], cfg, data),
                       cfg.measure.threads, plan.onnx_int8, plan.half, resolve_device(setup.train.device))  # fmt: skip
    fit = _Fitter(model_cfg, setup, data, store, store_key, logger_for)

    bases: dict[str, Base | str] = {"fp32": Base("fp32", teacher, "the trained model, eager PyTorch")}
    builders = {"pruned": (cfg.pruning.enabled, lambda: _pruned(teacher, cfg, fit)),
                "pruned_structured": (plan.structured, lambda: _structured(teacher, cfg, ctx, fit)),
                "distilled": (plan.distill, lambda: _distilled(teacher, cfg, model_cfg, data, fit))}  # fmt: skip
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
    """Trains inside the stage (fine-tunes, the student) with the main run's features, each in its own
    store folder so a killed run resumes where it stopped."""

    def __init__(self, model_cfg: ModelConfig, setup: TrainingSetup, data: PrepareDataResult, store: ArtifactStore,
                 store_key: str, logger_for: LoggerFor):  # fmt: skip
        self.model_cfg, self.setup, self.data, self.store = model_cfg, setup, data, store
        self.store_key, self.logger_for = store_key, logger_for

    def __call__(
        self, name: str, epochs: int, model: torch.nn.Module | None = None, model_cfg: ModelConfig | None = None,
        **options: object,
    ) -> tuple[torch.nn.Module, dict[str, object]]:  # fmt: skip
        s = self.setup
        train_cfg = s.train.model_copy(
            update={"max_epochs": epochs, "max_steps": None, "distributed": s.train.distributed.on_this_machine()}
        )
        run = fit_in_folder(model_cfg or self.model_cfg, s.optim, train_cfg, s.loader, s.seed, self.data, self.store,
                            f"{self.store_key}/{name}", logger=self.logger_for(name), model=model, **options)  # type: ignore[arg-type]  # fmt: skip
        trained = run.model.to("cpu").eval()
        facts = {"epochs": run.fit.epochs_run, "steps": run.fit.steps, "stop_reason": run.fit.stop_reason.value,
                 "resumed_from_step": run.resumed_from, "best_val": run.best_metrics}  # fmt: skip
        return trained, facts


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


def _distilled(
    teacher: torch.nn.Module, cfg: CompressConfig, model_cfg: ModelConfig, data: PrepareDataResult, fit: _Fitter
) -> Base:
    d = cfg.distillation
    student_cfg = d.student or student_config(model_cfg, d.width)
    epochs = d.max_epochs or fit.setup.train.max_epochs
    loss = DistillationLoss(teacher, alpha=d.alpha, temperature=d.temperature)
    model, facts = fit("distilled", epochs, model_cfg=student_cfg, loss=loss)
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
    m = cfg.measure
    out = []
    with fixed_threads(m.threads):
        metrics = {c.name: task_metrics(c.predict, test) for c in candidates}
        batch = _serving_batch(test.x, m.serving_batch)
        speeds = measure_speed(candidates, test.x[:1], batch, m.warmup, m.latency_calls, m.rounds,
                               m.throughput_calls, m.threads)  # fmt: skip
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


def _serving_batch(x: np.ndarray, size: int) -> np.ndarray:
    """`size` test inputs, repeated when the test split is smaller (throughput needs a full batch)."""
    return x[np.arange(size) % len(x)]


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
