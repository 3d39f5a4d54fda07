"""Fine-tuning on tiny real problems: a warm start from a parent's weights (`model.init_from`, `model.reinit`),
frozen and unfrozen modules, discriminative learning rates (`train.finetune`), a SIGKILL in each phase resumed
to the weights of an uninterrupted run, and the preflight's one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.datasets import load_wine

from tests.conftest import REPO, tiny_raw
from trainflow.core.config import config_from_dict
from trainflow.core.errors import ConfigError
from trainflow.core.models import build_model
from trainflow.core.preflight import preflight
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import TrainResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.initial import initial_model
from trainflow.core.training.seed import seed_everything
from trainflow.core.training.spec import TrainingSpec

SYNTHETIC = {"source": "synthetic", "n_samples": 240, "n_features": 16, "n_classes": 4}


def _raw(data: dict[str, Any] | None = None, model: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """`tiny_raw` with its data and model sections replaced (not merged) by `data` and `model`."""
    raw = tiny_raw(**sections)
    return raw | ({"data": data} if data is not None else {}) | ({"model": model} if model is not None else {})


def _fit(store: LocalStore, key: str, **sections: Any) -> tuple[TrainingSpec, TrainResult]:
    cfg = config_from_dict(_raw(**sections))
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    return spec, train(spec, store, key)


def _weights(store: LocalStore, result: TrainResult) -> dict[str, torch.Tensor]:
    return load_checkpoint(store.local_path(result.checkpoint_uri))["model"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Path]:
    """A 4-class MLP trained on synthetic data: the model the tests warm-start from."""
    store = LocalStore(tmp_path_factory.mktemp("parent"))
    model = {"name": "mlp", "hidden_sizes": [16, 16], "norm": "batchnorm"}
    _, result = _fit(store, "parent", data=SYNTHETIC, model=model, train={"max_epochs": 2})
    return store, store.local_path(result.checkpoint_uri)


def _child(parent_file: Path | str, classes: int = 4, **model: Any) -> dict[str, Any]:
    return _raw(
        data={**SYNTHETIC, "n_classes": classes},
        model={"name": "mlp", "hidden_sizes": [16, 16], "norm": "batchnorm", "init_from": str(parent_file), **model},
    )


# ------------------------------------------------------------------------------- warm start
def test_matching_tensors_load_and_a_new_head_needs_reinit(parent: tuple[LocalStore, Path], store) -> None:
    _, parent_file = parent
    parent_weights = load_checkpoint(parent_file)["model"]
    same = config_from_dict(_child(parent_file))
    spec = TrainingSpec.of(same, prepare_data(same.data, same.seed, store))
    assert spec.warm_start is not None and spec.warm_start.source == str(parent_file)
    seed_everything(0)
    for name, tensor in initial_model(spec).state_dict().items():
        torch.testing.assert_close(tensor, parent_weights[name], rtol=0, atol=0)

    six = config_from_dict(_child(parent_file, classes=6))
    data = prepare_data(six.data, six.seed, store)
    with pytest.raises(
        ConfigError,
        match=r"model.init_from: .*2 tensor\(s\) do not fit model.MLP: net.head.weight "
        r"\(4, 16\) in the source, \(6, 16\) here; net.head.bias .*model.reinit",
    ):
        initial_model(TrainingSpec.of(six, data))
    with pytest.raises(ConfigError, match="tensor"):  # the preflight says it before any stage runs
        preflight(six)
    reinit = config_from_dict(_child(parent_file, classes=6, reinit=["head"]))
    seed_everything(0)
    loaded = initial_model(TrainingSpec.of(reinit, data)).state_dict()
    seed_everything(0)
    fresh = build_model(reinit.model, data.spec).state_dict()
    for name, tensor in loaded.items():
        expected = fresh[name] if name.startswith("net.head.") else parent_weights[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)


def test_a_safetensors_file_loads_and_an_edited_source_changes_the_spec(parent, tmp_path: Path, store) -> None:
    from safetensors.torch import save_file

    _, parent_file = parent
    weights = {k: v.contiguous() for k, v in load_checkpoint(parent_file)["model"].items()}
    file = tmp_path / "parent.safetensors"
    save_file(weights, file)
    cfg = config_from_dict(_child(file))
    data = prepare_data(cfg.data, cfg.seed, store)
    first = TrainingSpec.of(cfg, data)
    seed_everything(0)
    torch.testing.assert_close(initial_model(first).state_dict()["net.1.weight"], weights["net.1.weight"])
    save_file({**weights, "net.1.weight": weights["net.1.weight"] + 1}, file)  # same path, new content
    second = TrainingSpec.of(cfg, data)
    assert second.warm_start.sha256 != first.warm_start.sha256 and second != first  # training's cache key moves
    with pytest.raises(ConfigError, match="changed since this run resolved it"):
        initial_model(first)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"init_from": "nowhere/model.pt"}, r"model.init_from: nowhere/model.pt: file not found"),
        ({"init_from": "models:/nope/3"}, r"model.init_from: models:/nope/3: "),
        ({"lora": {"target_modules": ["attention"]}}, r"model.lora.target_modules: 'attention' names no Linear"),
    ],
)
def test_bad_sources_and_patterns_are_one_line_preflight_errors(model: dict, message: str, in_tmp: Path) -> None:
    cfg = config_from_dict(tiny_raw(model=model, tracking={"uri": f"sqlite:///{in_tmp / 'mlflow.db'}"}))
    with pytest.raises(ConfigError, match=message) as caught:
        preflight(cfg)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"finetune": {"freeze": ["stem", "trunk"]}}, r"train.finetune: 'trunk' names no module"),
        (
            {
                "finetune": {"freeze": ["net.1"]},
                "distributed": {"strategy": "fsdp", "nproc_per_node": 2},
            },
            r"fsdp does not shard frozen parameters",
        ),
    ],
)
def test_finetune_settings_are_checked_before_any_stage(train: dict, message: str, in_tmp: Path) -> None:
    raw = tiny_raw(train=train)
    if "trunk" in json.dumps(train):
        raw = _raw(data={"source": "sklearn", "name": "digits"}, model={"name": "cnn", "channels": [4]}, train=train)
    with pytest.raises(ConfigError, match=message):
        preflight(config_from_dict(raw))


def test_unfreeze_without_freeze_and_two_lr_rules_are_schema_errors() -> None:
    with pytest.raises(ConfigError, match="unfreeze_at_epoch needs freeze"):
        config_from_dict(tiny_raw(train={"finetune": {"unfreeze_at_epoch": 2}}))
    with pytest.raises(ConfigError, match="layer_lr_decay or lr_multipliers, not both"):
        config_from_dict(tiny_raw(train={"finetune": {"layer_lr_decay": 0.5, "lr_multipliers": {"head": 2}}}))


# ---------------------------------------------------------------------- learning rates
def test_layer_lr_decay_steps_down_from_the_head_in_decay_and_no_decay_groups(store) -> None:
    cfg = config_from_dict(_raw(data={"source": "sklearn", "name": "digits"},
                                    model={"name": "cnn", "channels": [4, 8], "blocks_per_stage": 1},
                                    train={"finetune": {"layer_lr_decay": 0.5}}, optim={"lr": 0.08}))  # fmt: skip
    trainer = build_trainer(TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store)), store)
    module, groups = trainer.module, trainer.optimizer.param_groups
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    # blocks: stem, blocks.0, blocks.1, head -> 0.08 x 0.5^3, 0.5^2, 0.5, 1
    assert lr_of[id(module.head[3].weight)] == (0.08, cfg.optim.weight_decay)
    assert lr_of[id(module.head[3].bias)] == (0.08, 0.0)
    assert lr_of[id(module.blocks[1].conv1.weight)] == (0.04, cfg.optim.weight_decay)
    assert lr_of[id(module.blocks[0].bn1.weight)] == (0.02, 0.0)
    assert lr_of[id(module.stem[0].weight)] == (0.01, cfg.optim.weight_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    assert trainer.peak_lr == pytest.approx(0.08 * trainer.scheduler.lr_lambdas[0](0))


def test_the_gpt_ties_its_embedding_to_the_head_block_and_lr_multipliers_match_by_pattern(store) -> None:
    raw = _raw(data={"source": "text", "seq_len": 16}, model={"name": "gpt", "n_layer": 2, "n_embd": 16,
                   "n_head": 2}, train={"finetune": {"layer_lr_decay": 0.1}}, optim={"lr": 0.01})  # fmt: skip
    cfg = config_from_dict(raw)
    data = prepare_data(cfg.data, cfg.seed, store)
    trainer = build_trainer(TrainingSpec.of(cfg, data), store)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    gpt = trainer.module
    assert lr_of[id(gpt.tok_emb.weight)] == lr_of[id(gpt.norm.weight)] == 0.01  # tied to lm_head: the head block
    assert lr_of[id(gpt.blocks[1].attn.qkv.weight)] == pytest.approx(0.001)
    assert lr_of[id(gpt.pos_emb.weight)] == pytest.approx(0.01 * 0.1**3)
    multipliers = cfg.with_values({"train.finetune": {"lr_multipliers": {"blocks.0": 0.5, "blocks.*": 0.25}}})
    trainer = build_trainer(TrainingSpec.of(multipliers, data), store)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    gpt = trainer.module
    assert lr_of[id(gpt.blocks[0].ff.up.weight)] == 0.005 and lr_of[id(gpt.blocks[1].ff.up.weight)] == 0.0025
    assert lr_of[id(gpt.tok_emb.weight)] == 0.01
    by_head = cfg.with_values({"train.finetune": {"lr_multipliers": {"lm_head": 0.1}, "freeze": ["lm_head"]}})
    trainer = build_trainer(TrainingSpec.of(by_head, data), store)  # the tied weight answers to lm_head too
    assert (
        not trainer.module.lm_head.weight.requires_grad
        and trainer.module.tok_emb.weight is trainer.module.lm_head.weight
    )
    assert {
        g["lr"] for g in trainer.optimizer.param_groups for p in g["params"] if p is trainer.module.lm_head.weight
    } == {0.001}


def test_a_gpt_head_named_in_reinit_starts_fresh_with_its_tied_embedding(store) -> None:
    raw = _raw(data={"source": "text", "seq_len": 16}, model={"name": "gpt", "n_layer": 1, "n_embd": 16, "n_head": 2})
    cfg = config_from_dict(raw)
    data = prepare_data(cfg.data, cfg.seed, store)
    torch.manual_seed(1)
    parent = build_model(cfg.model, data.spec).state_dict()
    torch.save(parent, store.root / "gpt.pt")
    child = cfg.with_values({"model.init_from": str(store.root / "gpt.pt"), "model.reinit": ["lm_head"]})
    seed_everything(0)
    model = initial_model(TrainingSpec.of(child, data))
    seed_everything(0)
    fresh = build_model(cfg.model, data.spec).state_dict()
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    torch.testing.assert_close(model.tok_emb.weight, fresh["tok_emb.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.pos_emb.weight, parent["pos_emb.weight"], rtol=0, atol=0)


def test_the_lr_range_test_sweeps_the_first_phase_with_each_block_at_its_factor(parent, store) -> None:
    from trainflow.core.tuning.lr_finder import lr_sweep

    finetune = {"freeze": ["net.1", "net.2"], "unfreeze_at_epoch": 1, "layer_lr_decay": 0.5}
    cfg = config_from_dict(_child(parent[1]) | {"train": {**tiny_raw()["train"], "finetune": finetune}})
    trainer = build_trainer(TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store)), store)
    frozen = [trainer.module.net[1].weight, trainer.module.net[1].bias]
    assert not any(p.requires_grad for p in frozen)  # the first phase, before any fit: what the sweep trains
    assert trainer.module.net[2].weight.requires_grad  # BatchNorm in a frozen module trains (batchnorm: train)
    seen: list[tuple[float, ...]] = []
    step = trainer.train_step

    def recording(micro_batches):  # the LRs of every group at each step of the sweep
        seen.append(tuple(g["lr"] / g["lr_scale"] for g in trainer.optimizer.param_groups))
        out = step(micro_batches)
        assert all(p.grad is None for p in frozen)
        return out

    trainer.train_step = recording
    curve = lr_sweep(trainer, 1e-4, 1.0, 12, 0.0, 1e9)
    assert [round(lrs[0], 12) for lrs in seen] == [round(lr, 12) for lr in curve.lrs]
    assert all(len(set(round(x, 12) for x in lrs)) == 1 for lrs in seen)  # one peak LR, scaled per block


def test_a_parents_preprocessing_is_reused_unless_refit(parent, store, tmp_path: Path) -> None:
    """The child's arrays are scaled as the parent's weights learned, so a warm start sees the inputs it knows;
    `data.refit_preprocessing` fits a new scaler on the new data; the fingerprint tells the two apart."""
    import pickle

    from trainflow.core.records import ReusedPreprocessing

    wine = load_wine(as_frame=True).frame
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    wine.head(120).to_csv(old, index=False)
    (wine.assign(proline=wine["proline"] * 3)).to_csv(new, index=False)  # the new data's scale moved
    source = {"source": "csv", "target": "target"}
    first = config_from_dict(_raw(data=source | {"path": str(old)}))
    parent_data = prepare_data(first.data, 0, store)
    file = store.local_path(parent_data.preprocessor_uri)
    reuse = ReusedPreprocessing(uri=str(file), sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    second = config_from_dict(_raw(data=source | {"path": str(new)}))
    reused = prepare_data(second.data, 0, store, preprocessing=reuse)
    refit = prepare_data(second.data, 0, store)
    assert len({reused.fingerprint, refit.fingerprint, parent_data.fingerprint}) == 3
    scaler = lambda data: pickle.loads(store.local_path(data.preprocessor_uri).read_bytes())["transformer"]  # noqa: E731
    parent_scaler, reused_scaler = scaler(parent_data), scaler(reused)
    assert str(parent_scaler.transform(wine.drop(columns="target").head(3))) == str(
        reused_scaler.transform(wine.drop(columns="target").head(3)))  # fmt: skip
    assert str(scaler(refit).transform(wine.drop(columns="target").head(3))) != str(
        parent_scaler.transform(wine.drop(columns="target").head(3)))  # fmt: skip


def test_the_search_can_search_layer_lr_decay(store) -> None:
    cfg = config_from_dict(tiny_raw(tune={"hpo": {"enabled": True, "n_trials": 2, "space": {
        "train.finetune.layer_lr_decay": {"type": "float", "low": 0.3, "high": 1.0}}}}))  # fmt: skip
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    assert spec.with_values({"train.finetune.layer_lr_decay": 0.4}).train.finetune.layer_lr_decay == 0.4


# ---------------------------------------------------------------------------- freezing
def _frozen_run(store: LocalStore, key: str, parent_file: Path, batchnorm: str) -> tuple[dict, dict, dict]:
    """Weights at the start, after the frozen epochs (0-1) and at the end of a fit that unfreezes at epoch 2."""

    class Snap(Callback):
        def __init__(self) -> None:
            self.at: dict[int, dict[str, torch.Tensor]] = {}

        def on_fit_start(self, trainer) -> None:
            self.at[0] = {k: v.clone() for k, v in trainer.module.state_dict().items()}

        def on_epoch_start(self, trainer) -> None:
            self.at[trainer.state.epoch] = {k: v.clone() for k, v in trainer.module.state_dict().items()}

    finetune = {"freeze": ["net.1", "net.2"], "unfreeze_at_epoch": 2, "batchnorm": batchnorm}
    cfg = config_from_dict({**_child(parent_file), "train": {**tiny_raw()["train"], "max_epochs": 3,
                            "early_stopping": {"enabled": False}, "finetune": finetune}})  # fmt: skip
    snap = Snap()
    train(TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store)), store, key, callbacks=[snap])
    return snap.at[0], snap.at[2], load_checkpoint(store.root / key / "model.pt")["model"]


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_frozen_modules_hold_until_their_epoch_and_batchnorm_follows_its_setting(parent, store, batchnorm) -> None:
    start, unfrozen_at, end = _frozen_run(store, batchnorm, parent[1], batchnorm)
    for name in ("net.1.weight", "net.1.bias"):  # frozen for epochs 0 and 1, then trained
        torch.testing.assert_close(unfrozen_at[name], start[name], rtol=0, atol=0)
        assert not torch.equal(end[name], start[name])
    assert not torch.equal(unfrozen_at["net.5.weight"], start["net.5.weight"])  # never frozen
    bn_held = torch.equal(unfrozen_at["net.2.running_mean"], start["net.2.running_mean"])
    affine_held = torch.equal(unfrozen_at["net.2.weight"], start["net.2.weight"])
    assert (bn_held, affine_held) == ((True, True) if batchnorm == "frozen" else (False, False))


def test_a_sigkill_in_the_frozen_phase_and_after_unfreezing_resumes_to_the_uninterrupted_weights(parent, store):
    finetune = {"freeze": ["net.1", "net.2", "net.5"], "unfreeze_at_epoch": [{"epoch": 1, "patterns": ["net.5"]},
                {"epoch": 2, "patterns": ["net.1", "net.2"]}], "layer_lr_decay": 0.5}  # fmt: skip
    raw = {**_child(parent[1], dropout=0.2), "train": {**tiny_raw()["train"], "max_epochs": 4, "finetune": finetune,
           "checkpoint": {"every_steps": 3}, "early_stopping": {"patience": 100}}}  # fmt: skip
    cfg = config_from_dict(raw)
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    full = train(spec, store, "full")
    steps_per_epoch = full.steps // 4
    for kill in (steps_per_epoch - 1, 2 * steps_per_epoch + 2):  # epoch 0 (frozen), then epoch 2 (all unfrozen)
        run = subprocess.run([sys.executable, "-m", "tests.core.finetune_support", json.dumps(raw), str(store.root),
                              "killed", str(kill)], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == -9, run.stderr[-2000:]
    resumed = train(spec, store, "killed")
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step > steps_per_epoch
    assert resumed.steps == full.steps
    for name, tensor in _weights(store, full).items():
        torch.testing.assert_close(_weights(store, resumed)[name], tensor, rtol=0, atol=0)
