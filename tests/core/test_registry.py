"""The registry's candidate/champion aliases: every published version becomes the candidate, the champion
moves only to a version that beats it by the margin, the champion's served model scored in the same run on the
new version's test split, and the decision is recorded with both figures (version tags, publish run tags,
manifest). MLflow runs on a throwaway SQLite file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_raw
from tests.core.serving_support import open_run
from tests.core.trained_support import Trained, train_and_evaluate
from trainflow.core.config import PublishConfig, config_from_dict
from trainflow.core.data.spec import TEST_METRICS
from trainflow.core.errors import ConfigError
from trainflow.core.publish import publish
from trainflow.core.records import (
    CompressedVariant,
    CompressResult,
    EvaluateResult,
    PrepareDataResult,
    PublishResult,
)
from trainflow.core.serving.champion import served_scores
from trainflow.core.serving.registry import champion_metric, judge, promote_margin, record, served_metrics
from trainflow.core.tracking.backend import fluent_tracking_uri
from trainflow.core.tracking.runs import Tracker

pytestmark = pytest.mark.slow  # models trained, logged and registered in MLflow: left out of `pytest -m 'not slow'`

NAME = "tiny-wine"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny wine MLP trained and evaluated once for the module; publishes vary only its figures."""
    cfg = config_from_dict(tiny_raw(publish={"name": NAME, "registered_model_name": NAME}))
    return train_and_evaluate(tmp_path_factory.mktemp("registry"), cfg)


@dataclass
class Registry:
    """A fresh tracking database, and publishes into it, each under its own publish run."""

    uri: str
    tracker: Tracker
    trained: Trained
    published: int = 0

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def publish(self, accuracy: float, data: PrepareDataResult | None = None) -> tuple[PublishResult, str]:
        """Publish the trained model as if its test accuracy were `accuracy`; the result and its run id."""
        t = self.trained
        evaluated = t.evaluated.model_copy(update={"metrics": {**t.evaluated.metrics, "accuracy": accuracy}})
        run = open_run(self.tracker, "publish")
        self.published += 1
        key = f"published/{self.published}"
        spec = t.spec.model_copy(update={"data": data or t.data})
        result = publish(t.config, spec, t.trained, evaluated, t.store, key, run)
        return result, run.run_id

    def tags(self, version: int) -> dict[str, str]:
        return self.client.get_model_version(NAME, str(version)).tags

    def holder(self, alias: str) -> int:
        return int(self.client.get_model_version_by_alias(NAME, alias).version)

    def manifest(self, result: PublishResult) -> dict[str, Any]:
        return json.loads(self.trained.store.local_path(result.manifest_uri).read_text())


@pytest.fixture
def registry(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.for_experiment(uri, "registry-tests")
    return Registry(uri, tracker, trained)


# ---------------------------------------------------------------------------- through publish
def test_candidate_always_champion_only_when_beaten_by_the_margin_on_the_new_test_split(registry: Registry) -> None:
    first, run1 = registry.publish(0.8)
    assert (first.registered_model, first.registered_version) == (NAME, 1)
    assert first.aliases == ["candidate", "champion"] and first.champion_decision == "promoted"
    assert "no champion yet" in (first.champion_reason or "")
    tags = registry.tags(1)
    assert tags["trainflow.manifest_uri"] == first.manifest_uri
    assert tags["trainflow.data_fingerprint"] == registry.trained.data.fingerprint
    assert tags["trainflow.config_sha256"] == registry.trained.config.sha256()
    assert tags["trainflow.variant"] == "fp32" and tags["trainflow.champion_metric"] == "accuracy"
    assert float(tags["trainflow.metric.accuracy"]) == 0.8 and "trainflow.metric.f1_macro" in tags
    assert registry.client.get_run(run1).data.tags["trainflow.aliases"] == "candidate,champion"

    # the champion is scored now, through its served model on the raw test rows: the evaluate stage's real figure,
    # not the 0.8 its version was published with
    real = registry.trained.evaluated.metrics["accuracy"]
    assert served_scores(f"models:/{NAME}/1", registry.trained.data, registry.trained.store, registry.uri)[
        "accuracy"] == pytest.approx(real, abs=1e-12)  # fmt: skip
    second, run2 = registry.publish(real - 0.1)  # worse: candidate only
    assert second.registered_version == 2 and second.aliases == ["candidate"]
    assert (registry.holder("candidate"), registry.holder("champion")) == (2, 1)
    tags = registry.tags(2)
    assert tags["trainflow.champion_decision"] == "kept" == second.champion_decision
    reason = tags["trainflow.champion_reason"]
    assert f"{real - 0.1:.6g} (v2)" in reason and f"{real:.6g} (champion v1), both on v2's test split" in reason
    assert tags["trainflow.champion_reason"] == second.champion_reason
    assert float(tags["trainflow.champion_score"]) == second.champion_score == pytest.approx(real)
    assert float(tags["trainflow.challenger_score"]) == pytest.approx(real - 0.1)
    run_tags = registry.client.get_run(run2).data.tags
    assert run_tags["trainflow.champion_decision"] == "kept" and run_tags["trainflow.registered_version"] == "2"
    assert second.run_tags()["trainflow.champion_reason"] == second.champion_reason  # the pipeline's parent run
    manifest = registry.manifest(second)["registered_model"]
    assert manifest == {"name": NAME, "version": 2, "aliases": ["candidate"], "champion_metric": "accuracy",
                        "champion_decision": "kept", "champion_reason": second.champion_reason,
                        "challenger_score": real - 0.1, "champion_score": second.champion_score,
                        "champion_version": 1}  # fmt: skip

    noise, _ = registry.publish(real + 0.004)  # better, but within the default margin of 0.005: no churn
    assert noise.champion_decision == "kept" and "does not beat the champion by +0.004" in (noise.champion_reason or "")
    third, _ = registry.publish(real + 0.01)  # better by more than the margin: champion moves
    assert third.aliases == ["candidate", "champion"] and third.champion_decision == "promoted"
    assert f"{real + 0.01:.6g} (v4) vs {real:.6g} (champion v1), both on v4's test split: beats" in (
        third.champion_reason or "")  # fmt: skip
    assert (registry.holder("candidate"), registry.holder("champion")) == (4, 4)

    import mlflow.pyfunc

    data, store = registry.trained.data, registry.trained.store
    raw = pd.read_pickle(store.local_path(data.preprocessor_uri))["examples"]
    with fluent_tracking_uri(registry.uri):
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = served.predict(raw)
    assert len(out) == len(raw) and set(out["label"]) <= set(data.spec.class_names)
    np.testing.assert_allclose(out.filter(like="proba_").sum(axis=1), 1.0, atol=1e-5)


def test_a_champion_trained_on_other_data_is_scored_on_the_new_data(registry: Registry) -> None:
    """Continual training always changes the data fingerprint: the champion is compared on the new test split
    instead of being kept because its own figures came from other data."""
    registry.publish(0.5)
    other = registry.trained.data.model_copy(update={"fingerprint": "f" * 64})
    result, _ = registry.publish(0.99, data=other)
    real = registry.trained.evaluated.metrics["accuracy"]
    assert result.champion_score == pytest.approx(real)
    assert result.champion_decision == ("promoted" if 0.99 - real > 0.005 else "kept")
    assert registry.tags(2)["trainflow.data_fingerprint"] == "f" * 64


# ------------------------------------------------------------------------------ the rule alone
def _version(client: MlflowClient, name: str) -> int:
    """A registry version without a logged model (the rule reads only tags and aliases)."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return int(client.create_model_version(name, source="file:///nowhere").version)


def _judge_and_record(client: MlflowClient, name: str, metrics: dict[str, float], task: str) -> tuple[int, str]:
    cfg = PublishConfig()
    metric, higher = champion_metric(cfg, task)  # type: ignore[arg-type]
    version = _version(client, name)

    def recorded(uri: str) -> dict[str, float]:  # the champion's own figure stands in for a fresh scoring
        tags = client.get_model_version(name, uri.rsplit("/", 1)[1]).tags
        return {metric: float(tags[f"trainflow.metric.{metric}"])}

    decision = judge(client, name, version, champion_alias="champion", metric=metric, higher_is_better=higher,
                     metrics=metrics, margin=promote_margin(cfg, higher), score_champion=recorded)  # fmt: skip
    record(client, name, version, decision, alias="candidate", champion_alias="champion",
           tags={"data_fingerprint": "abc"}, metrics=metrics)  # fmt: skip
    return version, decision.name


def test_perplexity_lower_is_better_for_a_language_model(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    lm = EvaluateResult(metrics={"loss": 1.6, "perplexity": 5.0, "bits_per_byte": 2.3}, n_test=10,
                        latency_ms_p50=1, latency_ms_p95=1, throughput_per_s=1, n_parameters=1, size_bytes=1,
                        plot_uris=[])  # fmt: skip
    assert champion_metric(PublishConfig(), "language_modeling") == ("perplexity", False)
    _, figures = served_metrics(lm, None)
    assert _judge_and_record(client, "gpt", figures, "language_modeling") == (1, "promoted")
    assert _judge_and_record(client, "gpt", {**figures, "perplexity": 6.0}, "language_modeling") == (2, "kept")
    # 0.6% lower: within the default 1% relative margin, so the champion stays
    assert _judge_and_record(client, "gpt", {**figures, "perplexity": 4.97}, "language_modeling") == (3, "kept")
    assert _judge_and_record(client, "gpt", {**figures, "perplexity": 4.0}, "language_modeling") == (4, "promoted")
    assert int(client.get_model_version_by_alias("gpt", "champion").version) == 4
    reason = client.get_model_version("gpt", "4").tags["trainflow.champion_reason"]
    assert "lower is better" in reason and "by +20.00%, margin 1.00% (relative)" in reason


def test_the_served_figures_are_the_recommended_variants_when_compress_ran(trained: Trained) -> None:
    variants = [
        CompressedVariant(name="fp32", base="fp32", format="torch", runtime="torch", status="ok",
                          metrics={"accuracy": 0.9}),
        CompressedVariant(name="fp32+onnx_int8", base="fp32", format="onnx_int8", runtime="onnxruntime",
                          status="ok", metrics={"accuracy": 0.85}),
    ]  # fmt: skip
    compressed = CompressResult(variants=variants, task="classification", recommended="fp32+onnx_int8", reason="",
                                threads=1, serving_batch=1, table_uri="", csv_uri="", plot_uri="")  # fmt: skip
    assert served_metrics(trained.evaluated, compressed) == ("fp32+onnx_int8", {"accuracy": 0.85})
    assert served_metrics(trained.evaluated, None) == ("fp32", trained.evaluated.metrics)


# ---------------------------------------------------------------------------------- the config
@pytest.mark.parametrize(
    ("publish", "message"),
    [
        ({"champion_metric": "perplexity"}, "c.yaml: publish.champion_metric: 'perplexity' is not a test metric "
         "of classification; available: accuracy, precision_macro, recall_macro, f1_macro, loss"),
        ({"champion_alias": "latest"}, "c.yaml: publish.champion_alias: 'latest' is reserved"),
        ({"alias": "champion"}, "c.yaml: publish: alias and champion_alias are both 'champion'"),
    ],
    ids=["metric-of-another-task", "reserved-alias", "same-alias-twice"],
)  # fmt: skip
def test_a_bad_registry_setting_is_one_config_line(publish: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(tiny_raw(publish=publish), source="c.yaml")
    (line,) = caught.value.problems
    assert line.startswith(message), line


def test_the_metric_table_matches_what_the_evaluate_stage_reports(trained: Trained) -> None:
    from trainflow.core.compression.measure import HeldOut, task_metrics

    assert sorted(TEST_METRICS["classification"]) == sorted(trained.evaluated.metrics)
    text = HeldOut(x=np.zeros((2, 4), np.int64), y=np.zeros((2, 4), np.int64), task="language_modeling")
    assert sorted(TEST_METRICS["language_modeling"]) == sorted(task_metrics(lambda x: np.zeros((*x.shape, 3)), text))
    with pytest.raises(ConfigError, match=r"^publish\.champion_metric: 'accuracy' is not a test metric"):
        champion_metric(PublishConfig(champion_metric="accuracy"), "language_modeling")


def test_an_old_publish_record_still_validates() -> None:
    old = {"objects": [], "manifest_uri": "file:///m.json", "mlflow_model_uri": None, "registered_version": None}
    result = PublishResult.model_validate(old)
    assert (result.registered_model, result.aliases, result.champion_decision) == (None, [], None)
    assert result.run_tags() == {}
