"""The MLflow Model Registry's candidate/champion aliases for a newly registered served model.

Every new version gets the candidate alias (`publish.alias`) and tags saying what it is (manifest URI, data
fingerprint, config sha256, shipped variant, every test metric). The champion alias (`publish.champion_alias`)
moves to it only when there is no champion yet, or when its `publish.champion_metric` beats the champion's
on the same test data: a champion whose data fingerprint differs was measured on other data, so the figures
are not comparable and it stays. The decision and its reason, with both figures, are tagged on the version.

`judge` only reads the registry, `record` writes it, so the publish stage can put the decision into the
manifest between the two. Plain MlflowClient calls by explicit name and run id; no Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainflow.core.data.spec import Task, check_test_metric

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from trainflow.core.config import PublishConfig
    from trainflow.core.records import CompressResult, EvaluateResult
    from trainflow.core.tracking.runs import RunLogger

log = logging.getLogger(__name__)

TAG = "trainflow."
METRIC_TAG = "trainflow.metric."  # + metric name: the served model's test figure, repr(float)
DEFAULT_METRIC: dict[Task, str] = {"classification": "accuracy", "language_modeling": "perplexity"}


def champion_metric(cfg: PublishConfig, task: Task) -> tuple[str, bool]:
    """(metric, higher is better) deciding the champion: `cfg.champion_metric`, else the task's default.

    Raises:
        ConfigError: the metric is not one the evaluate stage reports for `task`.
    """
    metric = cfg.champion_metric or DEFAULT_METRIC[task]
    return metric, check_test_metric(metric, task, "publish.champion_metric")


def served_metrics(evaluated: EvaluateResult, compressed: CompressResult | None) -> tuple[str, dict[str, float]]:
    """(variant, test metrics) of the model that is served: the compress stage's recommended variant when
    it ran, else the trained fp32 weights as the evaluate stage measured them."""
    if compressed is None:
        return "fp32", dict(evaluated.metrics)
    return compressed.recommended, dict(compressed.variant(compressed.recommended).metrics)


@dataclass(frozen=True)
class Decision:
    """Whether the new version becomes champion, and why (with both figures)."""

    promote: bool
    reason: str
    champion_version: int | None  # the champion when judged; None when there was none

    @property
    def name(self) -> str:
        return "promoted" if self.promote else "kept"


def judge(
    client: MlflowClient,
    name: str,
    version: int,
    *,
    champion_alias: str,
    metric: str,
    higher_is_better: bool,
    metrics: Mapping[str, float],
    data_fingerprint: str,
) -> Decision:
    """Compare version `version` of `name` with the version holding `champion_alias` (reads only)."""
    new = metrics.get(metric)
    holder = client.get_registered_model(name).aliases.get(champion_alias)
    if holder is not None and int(holder) == version:
        return Decision(True, f"v{version} already holds {champion_alias}", version)
    if holder is None:
        if new is None:
            return Decision(False, f"no {champion_alias} yet, but v{version} has no test {metric} to judge it by", None)
        return Decision(True, f"no {champion_alias} yet: v{version} {metric} {new:.6g} becomes {champion_alias}", None)
    champion = client.get_model_version(name, str(holder))
    old_tag = champion.tags.get(METRIC_TAG + metric)
    old = float(old_tag) if old_tag is not None else None
    figures = f"{metric} {_show(new)} (v{version}) vs {_show(old)} ({champion_alias} v{holder})"
    old_data = champion.tags.get(TAG + "data_fingerprint")
    if old_data != data_fingerprint:
        other = f"fingerprint {_short(old_data)}, v{version}'s {_short(data_fingerprint)}"
        why = f"{champion_alias} v{holder} was tested on other data ({other}), so {figures} are not comparable"
        return Decision(False, f"{why}; move the alias by hand if the new data should count", int(holder))
    if new is None or old is None:
        return Decision(False, f"{figures}: a figure is missing, nothing to compare", int(holder))
    better = new > old if higher_is_better else new < old
    direction = "higher" if higher_is_better else "lower"
    verdict = "beats" if better else "does not beat"
    return Decision(better, f"{figures}: {verdict} the {champion_alias} ({direction} is better)", int(holder))


def record(
    client: MlflowClient,
    name: str,
    version: int,
    decision: Decision,
    *,
    alias: str,
    champion_alias: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    run: RunLogger | None = None,
) -> list[str]:
    """Tag version `version` (`tags` under `trainflow.`, each metric, the decision), set `alias` on it and
    `champion_alias` when promoted; the decision also as tags of `run` (publish's). Returns the aliases set."""
    outcome = {"champion_decision": decision.name, "champion_reason": decision.reason[:5000]}
    values = {f"{TAG}{k}": str(v) for k, v in {**tags, **outcome}.items()}
    values |= {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()}
    for key, value in values.items():
        client.set_model_version_tag(name, str(version), key, value)
    aliases = [alias] + ([champion_alias] if decision.promote else [])
    for each in aliases:
        client.set_registered_model_alias(name, each, str(version))
    if run is not None:
        run_tags = {f"{TAG}{k}": v for k, v in outcome.items()}
        run_tags |= {f"{TAG}registered_model": name, f"{TAG}registered_version": str(version)}
        run.set_tags(run_tags | {f"{TAG}aliases": ",".join(aliases)})
    log.info("registry: %s v%d as %s; %s", name, version, ", ".join(aliases), decision.reason)
    return aliases


def _show(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def _short(fingerprint: str | None) -> str:
    return "none" if not fingerprint else fingerprint[:12]
