"""The stage records: what each stage of the pipeline hands on, in one place.

prepare_data -> PrepareDataResult -> lr_range_test -> LRRangeTestResult -> hpo_search -> HPOSearchResult
-> train -> TrainResult -> evaluate -> EvaluateResult -> compress -> CompressResult -> publish -> PublishResult

A record is small, frozen and JSON-serialisable: numbers, names, reasons and artifact URIs, never
tensors. It is the DAG's contract: a stage imports the records it consumes from here, never another
stage's module. `stage_key` is a stage run's cache key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from trainflow.core.data.spec import DataSpec
from trainflow.core.storage.version import code_version


class StageResult(BaseModel):
    """The base of every record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def artifact_uris(self) -> list[str]:
        """URIs this record points to; a cached record whose artifacts are gone is recomputed."""
        return []

    def run_tags(self) -> dict[str, str]:
        """MLflow tags for the stage's run and the pipeline's parent run (e.g. the data fingerprint)."""
        return {}


def stage_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """Cache key of a stage run: its name, its inputs (config sections and upstream records) and the
    code version, so a change to any of them re-runs the stage and, through its record, those after it."""
    payload = {"stage": stage, "inputs": to_jsonable_python(dict(inputs)), "code": code_version()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{stage}-{digest[:24]}"


class ReusedPreprocessing(BaseModel):
    """A parent model's fitted preprocessor that prepare_data applies instead of fitting one."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    uri: str
    sha256: str


class WarmStart(BaseModel):
    """Where a training's first weights came from (`model.init_from`, resolved): the version an alias pointed to,
    never the alias, and the sha256 of the weights, so a moved alias or a replaced file re-runs training."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str  # models:/<name>/<version>, a manifest URI, or the state dict's path
    weights_uri: str  # the fp32 state dict loaded: a published folder's model.pt, or the file itself
    sha256: str
    registered_model: str | None = None
    version: int | None = None
    run_id: str | None = None  # the registered version's run (publish), else the manifest's
    data_fingerprint: str | None = None  # the data the parent was trained and tested on
    manifest_uri: str | None = None
    preprocessor: ReusedPreprocessing | None = None  # the parent's fitted preprocessing (data.refit_preprocessing)
    endpoint_url: str | None = None  # an s3:// parent's S3 endpoint (store.endpoint_url): where ranks fetch it from

    def lineage(self) -> dict[str, str]:
        """What this model grew from, as `trainflow.parent.*` tags (MLflow runs and versions, the manifest)."""
        facts = {"source": self.source, "sha256": self.sha256, "registered_model": self.registered_model,
                 "version": self.version, "run_id": self.run_id, "data_fingerprint": self.data_fingerprint}  # fmt: skip
        return {f"trainflow.parent.{k}": str(v) for k, v in facts.items() if v is not None}


class Finding(BaseModel):
    """What the training doctor found (core/training/diagnostics.py): the rule, where, when, how bad, what to do.
    One per rule and layer: the step it was first seen, the worst figure seen."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rule: str  # diverging_loss, exploding_gradients, vanishing_gradients, dead_units, saturation, plateau, ...
    layer: str | None  # the module's name; None when the finding is about the loop (loss, loader, LR)
    step: int  # optimizer step it was first seen at
    figure: float | None  # the worst value seen (None: not finite); what it measures is in `message`
    threshold: float  # the figure beyond which the rule fires
    message: str  # one line: the figure against the threshold
    remedy: str

    def line(self) -> str:
        where = f", {self.layer}" if self.layer else ""
        return f"{self.rule} (step {self.step}{where}): {self.message}. Remedy: {self.remedy}"


class PrepareDataResult(StageResult):
    fingerprint: str  # content, settings and seed of the split: equal fingerprints, equal arrays
    uri: str  # .npz with x_train, y_train, x_val, ... (tokens only for text), or splits.json indexing their shards
    source: str  # the source as read: a file path as configured, sklearn:<name>, pydoc_data.topics, synthetic
    dataset_uri: str = ""  # the dataset's one name (core.data.sources.dataset_uri): MLflow inputs, the data event
    n_train: int  # samples, or seq_len windows for text
    n_val: int
    n_test: int
    spec: DataSpec
    preprocessor_uri: str | None = None  # pickled fitted transformer + raw columns (tables and images)
    raw_test_uri: str | None = None  # the test split's raw rows and class names (tables and images)
    skipped_files: list[str] = []  # folder sources under data.skip_bad_files: "file: why", each left out
    layout: Literal["memory", "shards"] = "memory"  # read whole, or lazily from shards (data.in_memory_max_mb)
    nbytes: int = 0  # the model-ready arrays' size in memory (float32 pixels, features, tokens, labels)

    def artifact_uris(self) -> list[str]:
        return [self.uri] + [uri for uri in (self.preprocessor_uri, self.raw_test_uri) if uri]

    def run_tags(self) -> dict[str, str]:
        return {"trainflow.data_fingerprint": self.fingerprint}


class LRRangeTestResult(StageResult):
    suggested_lr: float | None  # None: the reason says why
    rule: str
    reason: str
    num_steps_run: int
    diverged: bool
    suggestions: dict[str, float | None]  # what every rule picks from the same curve
    curve_uri: str  # JSON {"lr": [...], "loss": [...]}
    plot_uri: str  # PNG: loss against LR, log x, suggestions marked
    findings: list[Finding] = []  # the training doctor's over the sweep (train.diagnostics.in_search only)

    def artifact_uris(self) -> list[str]:
        return [self.curve_uri, self.plot_uri]

    def run_tags(self) -> dict[str, str]:
        return {"trainflow.lr_reason": self.reason[:5000]}


class HPOSearchResult(StageResult):
    study_name: str
    storage: str  # without credentials
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_params: dict[str, Any]  # dotted config path -> value, merged into the training config
    best_value: float
    best_trial: int
    metric: str
    direction: str
    lr_bounds: tuple[float, float] | None  # optim.lr's range when taken from the LR range test
    importances: dict[str, float]  # importance of each parameter (empty below 2 complete trials)
    plot_uri: str  # optimisation history PNG

    def artifact_uris(self) -> list[str]:
        return [self.plot_uri]


class TrainResult(StageResult):
    epochs_run: int
    steps: int
    stopped_early: bool
    stop_reason: str
    stop_message: str
    best_val_loss: float
    best_step: int | None
    best_metrics: dict[str, float]
    samples_per_s: float
    effective_batch_size: int  # micro-batch x accumulation x processes
    micro_batch_size: int = 0  # per process, as training ended (train.batch_size: auto resolved; split after an OOM)
    world_size: int = 1
    nonfinite_steps: int
    n_parameters: int
    trainable_parameters: int = 0  # at the end of the fit: LoRA's adapters, or what train.finetune left unfrozen
    total_parameters: int = 0  # every parameter of the model as trained (a LoRA model's base and adapters)
    parent: WarmStart | None = None  # model.init_from, resolved: which model this one grew from
    resumed_from_step: int | None
    checkpoint_uri: str  # the weights handed on (a LoRA fit's: its adapters); the best evaluation's with restore_best
    mlflow_run_id: str | None
    findings: list[Finding] = []  # the training doctor's (train.diagnostics), in the order first seen
    diagnosis_uri: str | None = None  # diagnosis.json: the findings and the per-layer figures; None: doctor off

    def artifact_uris(self) -> list[str]:
        return [self.checkpoint_uri] + ([self.diagnosis_uri] if self.diagnosis_uri else [])

    def run_tags(self) -> dict[str, str]:
        tags = self.parent.lineage() if self.parent is not None else {}
        if self.diagnosis_uri is not None:
            tags["trainflow.diagnosis"] = diagnosis_tag(self.findings)
        return tags


def diagnosis_tag(findings: list[Finding]) -> str:
    """`none`, or the count and the first finding: `2 findings, first dead_units (net.0) at step 50`."""
    if not findings:
        return "none"
    first = findings[0]
    where = f" ({first.layer})" if first.layer else ""
    plural = "s" if len(findings) > 1 else ""
    return f"{len(findings)} finding{plural}, first {first.rule}{where} at step {first.step}"


class EvaluateResult(StageResult):
    metrics: dict[str, float]  # accuracy, precision/recall/f1_macro, loss | loss, perplexity, bits_per_byte
    n_test: int
    latency_ms_p50: float  # batch 1, measured as the compress stage's fp32 row (compress.measure, eager on the CPU)
    latency_ms_p95: float
    throughput_per_s: float  # samples (or sequences) per second at compress.measure.serving_batch
    n_parameters: int
    size_bytes: int  # serialized weights
    plot_uris: list[str]  # confusion matrix (classification)

    def artifact_uris(self) -> list[str]:
        return list(self.plot_uris)


class CompressedVariant(BaseModel):
    """One row of the compression table: a model in a runtime, measured like the fp32 baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # fp32, fp32+onnx, fp32+onnx_int8, pruned, pruned_structured+onnx_int8, distilled, ...
    base: str  # which model: fp32 (trained), pruned, pruned_structured, distilled
    format: str  # torch (eager), onnx, onnx_int8, torch_int8, half
    runtime: str  # torch | onnxruntime
    status: str  # ok | failed
    reason: str = ""  # why it failed, or how it was made (exporter, quantization mode, ...)
    uri: str | None = None  # the saved variant (.pt2, .ts or .onnx)
    size_bytes: int | None = None
    params: int | None = None
    sparsity: float | None = None  # zero fraction of the prunable weights
    latency_ms_p50: float | None = None  # batch 1
    latency_ms_p95: float | None = None
    throughput: float | None = None  # samples (or sequences) per second at the serving batch
    metrics: dict[str, float] = {}  # the evaluate stage's test metrics
    details: dict[str, Any] = {}  # per-layer sparsity, int8 share of the weights, fit facts, ...


class CompressResult(StageResult):
    variants: list[CompressedVariant]  # the fp32 baseline first
    task: str  # classification | language_modeling: which metric the variants are judged by
    recommended: str  # name of the variant to ship
    reason: str  # why it was recommended
    threads: int  # intra-op threads of every runtime while measuring
    serving_batch: int
    table_uri: str  # Markdown table
    csv_uri: str
    plot_uri: str  # Pareto plot: metric against batch-1 latency, marker area = size

    def artifact_uris(self) -> list[str]:
        return [self.table_uri, self.csv_uri, self.plot_uri] + [v.uri for v in self.variants if v.uri]

    def variant(self, name: str) -> CompressedVariant:
        return next(v for v in self.variants if v.name == name)


class PublishedObject(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    uri: str
    sha256: str
    bytes: int


class PublishResult(StageResult):
    objects: list[PublishedObject]  # every file written, the manifest last
    manifest_uri: str
    mlflow_model_uri: str | None  # the served model: raw inputs in (core/serving/)
    registered_version: int | None
    recommended: str | None = None  # the compress stage's variant shipped beside the fp32 weights
    registered_model: str | None = None  # the registry name the version went to
    aliases: list[str] = []  # aliases set on the new version: the candidate alias, and champion when promoted
    champion_decision: str | None = None  # promoted | kept
    champion_reason: str | None = None  # why, with the new version's and the champion's figures
    challenger_score: float | None = None  # the new version's champion_metric on its test split
    champion_score: float | None = None  # the champion's served model scored in this run on the same split

    def artifact_uris(self) -> list[str]:
        return [o.uri for o in self.objects]

    def run_tags(self) -> dict[str, str]:
        if self.registered_model is None or self.registered_version is None:
            return {}
        return {
            "trainflow.registered_model": self.registered_model,
            "trainflow.registered_version": str(self.registered_version),
            "trainflow.aliases": ",".join(self.aliases),
            "trainflow.champion_decision": self.champion_decision or "",
            "trainflow.champion_reason": (self.champion_reason or "")[:5000],
        } | {f"trainflow.{k}": repr(v) for k in ("challenger_score", "champion_score")
             if (v := getattr(self, k)) is not None}  # fmt: skip
