"""The training doctor in the train stage: `on_finding: stop` ends a fit resumably (also on 2 DDP ranks), the
record names diagnosis.json and tags the run, FSDP measures activations only, the search is watched only when asked,
and a healthy CNN has no finding."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.conftest import tiny_raw
from trainflow.core.config import DiagnosticsConfig, config_from_dict
from trainflow.core.errors import TrainingError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import TrainResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import raise_if_stopped_by_doctor, train
from trainflow.core.training.checkpoint import FINAL, load_checkpoint
from trainflow.core.training.diagnostics import Doctor
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import StopReason


def _spec(store: LocalStore, **diagnostics: Any) -> TrainingSpec:
    cfg = config_from_dict(tiny_raw(train={"max_epochs": 3, "diagnostics": diagnostics}))
    return TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store), lr_suggestion=1e-4)  # 100x below 0.01


def test_on_finding_stop_ends_the_fit_with_the_finding_and_a_rerun_resumes_past_it(store: LocalStore) -> None:
    warned = train(_spec(store), store, "warned")
    stopped = train(_spec(store, on_finding="stop"), store, "stopped")
    assert (stopped.stop_reason, stopped.steps) == (StopReason.DIAGNOSIS.value, 1)
    assert stopped.stop_message.startswith("lr_far_from_suggestion (step 0): optim.lr 0.01 is 100x the LR range")
    with pytest.raises(TrainingError, match=r"^train: stopped at step 1 by the training doctor .* resume from step 1$"):
        raise_if_stopped_by_doctor(stopped)
    resumed = train(_spec(store, on_finding="stop"), store, "stopped")
    assert (resumed.resumed_from_step, resumed.steps, resumed.stop_reason) == (1, warned.steps, "max_epochs")
    assert [f.rule for f in resumed.findings] == [f.rule for f in warned.findings] == ["lr_far_from_suggestion"]
    raise_if_stopped_by_doctor(resumed)
    for name, tensor in load_checkpoint(store.workdir("warned") / FINAL)["model"].items():
        torch.testing.assert_close(load_checkpoint(store.workdir("stopped") / FINAL)["model"][name], tensor)


def test_the_record_names_diagnosis_json_and_tags_the_run(store: LocalStore) -> None:
    result = train(_spec(store, every_steps=5), store, "record")
    diagnosis = json.loads(store.local_path(result.diagnosis_uri).read_text())
    assert diagnosis["findings"] == [f.model_dump() for f in result.findings]
    assert diagnosis["measurements"][0]["step"] == 1 and diagnosis["settings"]["every_steps"] == 5
    assert result.run_tags()["trainflow.diagnosis"] == "1 finding, first lr_far_from_suggestion at step 0"
    assert TrainResult.model_validate_json(result.model_dump_json()) == result
    off = train(_spec(store, enabled=False), store, "off")
    assert (off.findings, off.diagnosis_uri, off.run_tags()) == ([], None, {})


def _ranks(store: LocalStore, strategy: str, **diagnostics: Any) -> TrainingSpec:
    ranks = {"nproc_per_node": 2, "rdzv_endpoint": "localhost:0", "collective_timeout_s": 60, "strategy": strategy}
    settings = {"max_epochs": 2, "batch_size": 8, "log_every_steps": 2, "diagnostics": diagnostics,
                "early_stopping": {"enabled": False}, "distributed": ranks}  # fmt: skip
    cfg = config_from_dict(tiny_raw(train=settings))
    return TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store), lr_suggestion=1e-4)


@pytest.mark.slow
def test_under_ddp_every_rank_stops_where_the_main_rank_decides_and_resumes(store: LocalStore) -> None:
    """The finding is seen at step 0 on the main rank; the ranks share the decision at the next measured step."""
    spec = _ranks(store, "ddp", on_finding="stop", every_steps=3)
    stopped = train(spec, store, "ddp")
    assert (stopped.stop_reason, stopped.steps, stopped.world_size) == ("diagnosis", 3, 2)
    resumed = train(spec, store, "ddp")
    assert (resumed.resumed_from_step, resumed.stop_reason, resumed.steps) == (3, "max_epochs", 16)
    assert [f.rule for f in resumed.findings] == ["lr_far_from_suggestion"]
    measured = json.loads(store.local_path(resumed.diagnosis_uri).read_text())["measurements"]
    assert [m["step"] for m in measured] == [1, 3, 6, 9, 12, 15] and "grad_norm" in measured[-1]["layers"]["net.1"]


@pytest.mark.slow
def test_under_fsdp_the_activations_are_measured_not_the_sharded_gradients(store: LocalStore) -> None:
    result = train(_ranks(store, "fsdp", every_steps=2), store, "fsdp")
    measured = json.loads(store.local_path(result.diagnosis_uri).read_text())["measurements"]
    assert [m["step"] for m in measured] == [1, *range(2, 17, 2)]
    figures = measured[-1]["layers"]["net.1"]
    assert {"out_mean", "out_std", "act_zero_share"} <= set(figures) and "grad_norm" not in figures


def test_the_search_is_watched_only_when_asked(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """HPO trials and the LR range test train a `for_tuning` spec: the doctor's settings there are the defaults
    (so they stay out of the tuning stages' cache keys) unless `in_search` keeps them, and the doctor with them."""
    from trainflow.core import lr_range_test as stage
    from trainflow.core.training.diagnostics import search_doctor

    plain, asked = _spec(store).for_tuning(), _spec(store, in_search=True, every_steps=5).for_tuning()
    assert search_doctor(plain) == [] and plain.train.diagnostics == DiagnosticsConfig()
    assert [type(d) for d in search_doctor(asked)] == [Doctor] and asked.train.diagnostics.every_steps == 5
    made: list[list[Doctor]] = []
    monkeypatch.setattr(stage, "search_doctor", lambda spec: made.append(search_doctor(spec)) or made[-1])
    sweep_cfg = {"num_steps": 20, "max_lr": 1e-3, "skip_start": 2, "skip_end": 2}
    lr_test = config_from_dict(tiny_raw(tune={"lr_range_test": sweep_cfg})).tune.lr_range_test
    sweep = stage.lr_range_test(lr_test, asked, store, "lrt")
    assert [m["step"] for m in made[0][0].series] == [1, 5, 10, 15, 20] and sweep.findings == made[0][0].findings
    assert stage.lr_range_test(lr_test, plain, store, "lrt-plain").findings == [] and made[1] == []


def test_a_healthy_digits_cnn_has_no_finding(store: LocalStore) -> None:
    """The shipped digits CNN's shape (residual blocks, BatchNorm, functional ReLUs), smaller and shorter."""
    raw = tiny_raw(data={"name": "digits"}, train={"max_epochs": 2, "batch_size": 64,
                                                    "diagnostics": {"every_steps": 10}})  # fmt: skip
    cfg = config_from_dict(raw | {"model": {"name": "cnn", "channels": [8, 16]}, "optim": {"lr": 3e-3}})
    result = train(TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store)), store, "cnn")
    assert result.findings == []
    measured = json.loads(store.local_path(result.diagnosis_uri).read_text())["measurements"]
    assert [m["step"] for m in measured] == [1, 10, 20, 30, 40]
    assert {"stem.0", "stem.1", "blocks.0.conv1", "blocks.1.shortcut.0", "head.3"} <= set(measured[-1]["layers"])
