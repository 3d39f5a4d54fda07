"""The MLflow Model Registry's candidate/champion aliases for a newly registered served model.

Every new version gets the candidate alias (`publish.alias`) and tags saying what it is (manifest URI, data
fingerprint, config sha256, shipped variant, every test metric, the model it grew from). The champion alias
(`publish.champion_alias`) moves to it only when there is no champion yet, or when its `publish.champion_metric`
beats the champion's by `publish.promote_margin`, the champion's served model being scored in the same run on
the new version's raw test split (`core.serving.champion`): continual training on new data is compared on that
data, and noise does not churn the champion. The decision, its reason and both scores are tagged on the version.

`judge` only reads the registry, `record` writes it, so the publish stage can put the decision into the
manifest between the two. Plain MlflowClient calls by explicit name and run id; no Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
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


def promote_margin(cfg: PublishConfig, higher_is_better: bool) -> float:
    """`publish.promote_margin`, else 0.005 (absolute, higher is better) or 0.01 (relative, lower is better)."""
    if cfg.promote_margin is not None:
        return cfg.promote_margin
    return 0.005 if higher_is_better else 0.01


@dataclass(frozen=True)
class Decision:
    """Whether the new version becomes champion, and why (with both figures)."""

    promote: bool
    reason: str
    champion_version: int | None  # the champion when judged; None when there was none
    challenger_score: float | None = None  # the new version's figure
    champion_score: float | None = None  # the champion's, scored now on the new version's test split

    @property
    def name(self) -> str:
        return "promoted" if self.promote else "kept"

    def tags(self) -> dict[str, str]:
        scores = {"challenger_score": self.challenger_score, "champion_score": self.champion_score,
                  "champion_version": self.champion_version}  # fmt: skip
        return {"champion_decision": self.name, "champion_reason": self.reason[:5000]} | {
            k: repr(v) if isinstance(v, float) else str(v) for k, v in scores.items() if v is not None}  # fmt: skip


def judge(
    client: MlflowClient,
    name: str,
    version: int,
    *,
    champion_alias: str,
    metric: str,
    higher_is_better: bool,
    metrics: Mapping[str, float],
    margin: float,
    score_champion: Callable[[str], Mapping[str, float]],
) -> Decision:
    """Compare version `version` of `name` with the version holding `champion_alias` (reads only):
    `score_champion(model_uri)` scores the champion's served model on the new version's test split, so both
    figures come from the same data in the same run, and the new version must beat it by `margin` (absolute
    when higher is better, relative when lower is better)."""
    new = metrics.get(metric)
    holder = client.get_registered_model(name).aliases.get(champion_alias)
    if holder is not None and int(holder) == version:
        return Decision(True, f"v{version} already holds {champion_alias}", version, new)
    if holder is None:
        if new is None:
            return Decision(False, f"no {champion_alias} yet, but v{version} has no test {metric} to judge it by", None)
        return Decision(True, f"no {champion_alias} yet: v{version} {metric} {new:.6g} becomes {champion_alias}", None,
                        new)  # fmt: skip
    try:
        old: float | None = score_champion(f"models:/{name}/{holder}").get(metric)
    except Exception as exc:  # a champion that cannot take the new data is not replaced silently either
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return Decision(False, f"{champion_alias} v{holder} could not be scored on v{version}'s test split ({why}); "
                        f"move the alias by hand if v{version} should serve", int(holder), new)  # fmt: skip
    figures = f"{metric} {_show(new)} (v{version}) vs {_show(old)} ({champion_alias} v{holder})"
    if new is None or old is None:
        return Decision(False, f"{figures}: a figure is missing, nothing to compare", int(holder), new, old)
    if higher_is_better:
        gain, needed = new - old, f"{margin:.4g} (absolute)"
        better = gain > margin
    else:
        gain, needed = (old - new) / old if old else 0.0, f"{margin:.2%} (relative)"
        better = gain > margin
    shown = f"{gain:+.4g}" if higher_is_better else f"{gain:+.2%}"
    verdict = "beats" if better else "does not beat"
    direction = "higher" if higher_is_better else "lower"
    return Decision(better, f"{figures}, both on v{version}'s test split: {verdict} the {champion_alias} by {shown}, "
                    f"margin {needed}; {direction} is better", int(holder), new, old)  # fmt: skip


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
    outcome = decision.tags()
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
