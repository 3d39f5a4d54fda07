"""A pipeline run's summary, built once from what `PipelineRun.summary()` returns (summary.json's content) and
shown three ways: plain text at the end of `trainflow run` (flows/cli.py), Markdown in the Prefect artifact
`run-summary-<config>` (tasks/artifacts.py), and the report's Run section (sections.py `overview`).

What it holds: each stage's time and cache status (or why it was skipped), the tuned values, the test metrics
and latency, the training and the doctor's findings, the compression recommendation and table, what was
published. Every text passes `mask_secrets`, so a password a URL carries reaches no console, artifact or report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trainflow.core.compression.report import COLUMNS, table_rows
from trainflow.core.config.secrets import mask_secrets
from trainflow.core.records import CompressedVariant, Finding
from trainflow.core.report.blocks import Block, Table, Text, fmt
from trainflow.core.report.render import markdown_blocks, render_text

STAGES = ("prepare_data", "lr_range_test", "hpo_search", "train", "evaluate", "compress", "publish")
# the comparison's columns a summary shows; the report's Compression section and the table artifact show all
SHOWN_COLUMNS = ("variant", "runtime", "metric", "change", "p50 ms", "x fp32", "x onnx fp32", "size KB", "x smaller")


@dataclass(frozen=True)
class PipelineSummary:
    """A run's summary as blocks, in the order they are shown."""

    stages: Table  # every stage in pipeline order: seconds and cached, or skipped (why), or not run
    results: list[Text]  # the tuned values, the test metrics, latency and size, the training
    compression: list[Block]  # the recommendation, the comparison table, its note; [] when compress did not run
    published: list[Text]  # the manifest, the registered model version and its aliases

    def groups(self, compression_table: bool = True) -> list[list[Block]]:
        """The non-empty groups; `compression_table=False` keeps only the recommendation of the compression."""
        compression = self.compression if compression_table else self.compression[:1]
        return [group for group in ([self.stages], self.results, compression, self.published) if group]

    def blocks(self, compression_table: bool = True) -> list[Block]:
        return [block for group in self.groups(compression_table) for block in group]

    def text(self) -> str:
        """Plain text, the groups a blank line apart."""
        return "\n\n".join(render_text(group) for group in self.groups())

    def markdown(self) -> str:
        return markdown_blocks(self.blocks())


def summarize(summary: dict[str, Any]) -> PipelineSummary:
    """The summary of `summary` (a `PipelineRun.summary()` dict; a flow that ran part of the pipeline has fewer
    stages, which show as not run)."""
    summary = json.loads(mask_secrets(json.dumps(summary)))
    stages = summary["stages"]
    return PipelineSummary(
        stages=stage_table(stages, summary.get("skipped") or {}),
        results=_results(summary.get("tuned") or {}, stages.get("evaluate"), stages.get("train")),
        compression=_compression(stages["compress"]) if "compress" in stages else [],
        published=_published(stages["publish"]) if "publish" in stages else [],
    )


def stage_table(stages: dict[str, dict[str, Any]], skipped: dict[str, str]) -> Table:
    """stage | seconds | cached (yes, no, `skipped: <why>` or `not run`), pipeline order first."""
    rows = []
    for name in [*STAGES, *(s for s in [*stages, *skipped] if s not in STAGES)]:
        if name in stages:
            rows.append([name, f"{stages[name]['seconds']:.1f}", "yes" if stages[name]["cached"] else "no"])
        elif name in skipped:
            rows.append([name, "", f"skipped: {skipped[name]}"])
        else:
            rows.append([name, "", "not run"])
    return Table(["stage", "seconds", "cached"], rows, align="lrl")


def _results(tuned: dict[str, Any], evaluated: dict[str, Any] | None, trained: dict[str, Any] | None) -> list[Text]:
    lines = []
    if tuned:
        lines.append(Text("tuned: " + ", ".join(f"{path}={fmt(value)}" for path, value in tuned.items())))
    if evaluated:
        lines.append(Text("test: " + ", ".join(f"{k}={v:.4f}" for k, v in evaluated["metrics"].items())))
        lines.append(Text(f"latency p50 {evaluated['latency_ms_p50']:.2f} ms (batch 1), "
                          f"size {evaluated['size_bytes'] / 1e6:.2f} MB"))  # fmt: skip
    if trained:
        lines.append(Text(f"train: {trained['epochs_run']} epochs, stopped by {trained['stop_reason']}, "
                          f"{trained['samples_per_s']:.0f} samples/s"))  # fmt: skip
        total, trainable = trained.get("total_parameters") or 0, trained.get("trainable_parameters") or 0
        if total and trainable < total:
            lines.append(Text(f"trained {trainable:,} of {total:,} parameters ({trainable / total:.2%})"))
        parent = trained.get("parent")
        if parent:
            version = f" (version {parent['version']}, run {parent['run_id']})" if parent.get("version") else ""
            lines.append(Text(f"started from: {parent['source']}{version}, sha256 {parent['sha256'][:12]}"))
        if trained.get("diagnosis_uri"):
            lines += diagnosis_lines(trained.get("findings") or [])
    return lines


def diagnosis_lines(findings: list[dict[str, Any]], shown: int = 5) -> list[Text]:
    """The training doctor's findings, one line each (the first `shown`), or that it found nothing."""
    if not findings:
        return [Text("doctor: no findings")]
    lines = [Text(f"doctor: {len(findings)} finding(s)")]
    lines += [Text(f"- {Finding.model_validate(f).line()}") for f in findings[:shown]]
    if len(findings) > shown:
        lines.append(Text(f"- ... and {len(findings) - shown} more (diagnosis.json of the train run)"))
    return lines


def _compression(compressed: dict[str, Any]) -> list[Block]:
    variants = [CompressedVariant.model_validate(v) for v in compressed["variants"]]
    keep = [COLUMNS.index(column) for column in SHOWN_COLUMNS]
    rows = [[row[i] for i in keep] for row in table_rows(variants, compressed["task"], compressed["recommended"])]
    return [
        Text(f"compress: recommended **{compressed['recommended']}**: {compressed['reason']}"),
        Table(list(SHOWN_COLUMNS), rows),
        Text(f"(batch-1 latency at {compressed['threads']} thread(s), variants alternated; "
             f"table: {compressed['table_uri']})"),
    ]  # fmt: skip


def _published(published: dict[str, Any]) -> list[Text]:
    lines = [Text(f"model: {published['manifest_uri']}")]
    if published.get("registered_model"):
        aliases = ", ".join(published.get("aliases") or []) or "none"
        lines.append(Text(f"registered: {published['registered_model']} version {published['registered_version']} "
                          f"(aliases: {aliases})"))  # fmt: skip
    if published.get("champion_decision"):
        lines.append(Text(f"champion: {published['champion_decision']}: {published.get('champion_reason') or ''}"))
    return lines
