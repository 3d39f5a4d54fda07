"""LoRA through peft on the zoo's models and a factory model: only adapters (and modules_to_save) train, checkpoints
hold the adapters and name their base, the merged model predicts as the unmerged one (fp32, 1e-5), publishes as a
plain model whose served MLflow model loads without peft, and plain runs never import peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, tiny_raw
from tests.core.serving_support import open_run
from trainflow.core.compress import compress
from trainflow.core.config import config_from_dict
from trainflow.core.errors import ConfigError
from trainflow.core.evaluate import evaluate
from trainflow.core.models import build_model
from trainflow.core.models.lora import apply_lora, is_lora, merged
from trainflow.core.preflight import preflight
from trainflow.core.prepare_data import prepare_data
from trainflow.core.publish import publish
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.runs import Tracker
from trainflow.core.train import train
from trainflow.core.training.checkpoint import load_checkpoint, trained_model
from trainflow.core.training.initial import initial_model
from trainflow.core.training.spec import TrainingSpec

pytestmark = pytest.mark.slow  # peft loads (about 6 s) and models train: left out of `pytest -m 'not slow'`

GPT = {"name": "gpt", "n_layer": 2, "n_embd": 32, "n_head": 2}
TEXT = {"source": "text", "seq_len": 32}


def _config(data: dict[str, Any], model: dict[str, Any], **sections: Any) -> Any:
    raw = tiny_raw(**sections) | {"data": data, "model": model}
    return config_from_dict(raw)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """peft starts B at zero (the adapter adds nothing); give every adapter weight a value so merging matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize(
    ("data", "model", "lora", "x"),
    [
        (TEXT, GPT, {"r": 4, "target_modules": ["qkv"]}, torch.randint(0, 256, (3, 32))),
        (
            {"source": "sklearn", "name": "digits"},
            {"name": "cnn", "channels": [4, 8]},
            {"r": 2, "target_modules": ["conv1", "conv2"], "modules_to_save": ["head"]},
            torch.randn(3, 1, 8, 8),
        ),
        (
            {"source": "sklearn", "name": "wine"},
            {"name": "factory", "factory": "tests.core.factories:tiny_net"},
            {"r": 2, "target_modules": ["net.1", "net.3"]},
            torch.randn(3, 13),
        ),
    ],
    ids=["gpt-qkv", "cnn-convs", "factory"],
)
def test_merged_and_unmerged_outputs_agree_and_only_adapters_train(data, model, lora, x, store) -> None:
    cfg = _config(data, {**model, "lora": lora})
    spec = prepare_data(cfg.data, cfg.seed, store).spec
    torch.manual_seed(0)
    plain = build_model(cfg.model, spec)
    adapted = _randomised(apply_lora(plain, cfg.model.lora)).eval()
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    folded = merged(adapted)
    assert is_lora(adapted) and not is_lora(folded) and type(folded) is type(plain)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), adapted(x), rtol=0, atol=1e-5)
    build_model(cfg.model, spec).load_state_dict(folded.state_dict())  # the plain model's own keys, strict


def test_a_lora_fit_trains_one_percent_checkpoints_adapters_and_publishes_a_plain_model(in_tmp: Path) -> None:
    store = LocalStore(in_tmp / "artifacts")
    from pydoc_data.topics import topics

    corpus = in_tmp / "small.txt"  # 24 KB: compress's fine-tune and student run whole epochs over it
    corpus.write_text("".join(topics.values())[:24_000], encoding="utf-8")
    base = _config(TEXT | {"path": str(corpus)}, GPT, train={"max_epochs": 1, "max_steps": 6}, optim={"lr": 3e-3},
                   compress={"distillation": {"max_epochs": 1}})  # fmt: skip
    data = prepare_data(base.data, base.seed, store)
    parent = train(TrainingSpec.of(base, data), store, "parent")
    parent_file = store.local_path(parent.checkpoint_uri)
    lora = {"r": 4, "target_modules": ["qkv"]}
    cfg = base.with_values({"model.init_from": str(parent_file), "model.lora": lora})
    spec = TrainingSpec.of(cfg, data)
    trained = train(spec, store, "lora")
    assert trained.parent is not None and trained.parent.sha256 == spec.warm_start.sha256
    assert trained.trainable_parameters == 2 * 4 * (32 + 96)  # rank 4 on qkv (32 -> 96) of 2 blocks: A and B
    assert trained.total_parameters == trained.trainable_parameters + sum(
        p.numel() for p in build_model(base.model, data.spec).parameters()
    )
    saved = load_checkpoint(store.local_path(trained.checkpoint_uri))
    assert saved["model"] and all("lora_" in k for k in saved["model"])
    assert saved["adapters_of"]["sha256"] == spec.warm_start.sha256  # names its base
    parent_weights = load_checkpoint(parent_file)["model"]
    adapters = trained_model(spec, store, trained.checkpoint_uri, merge=False)
    base_qkv = adapters.base_model.model.blocks[0].attn.qkv.base_layer.weight
    torch.testing.assert_close(base_qkv, parent_weights["blocks.0.attn.qkv.weight"], rtol=0, atol=0)  # frozen base

    evaluated = evaluate(spec, cfg.compress.measure, trained, store, "evaluate")
    only_training = {"pruning": {"enabled": False}, "combinations": [], "quantization": {
        "onnx": False, "onnx_int8": "off", "torch_int8": False, "half": "off"}}  # fmt: skip
    small = cfg.with_values({f"compress.{k}": v for k, v in only_training.items()}).compress
    compressed = compress(small, spec, trained, store, "compress")  # fine-tunes and distils the merged model
    failed = {v.name: v.reason for v in compressed.variants if v.status != "ok"}
    assert {"pruned_structured", "distilled"} <= {v.base for v in compressed.variants if v.status == "ok"}, failed
    tracker = Tracker.for_experiment(f"sqlite:///{in_tmp / 'mlflow.db'}", "lora")
    run = open_run(tracker, "publish")
    published = publish(cfg, spec, trained, evaluated, store, "published", run)
    manifest = json.loads(store.local_path(published.manifest_uri).read_text())
    assert manifest["parent"]["sha256"] == spec.warm_start.sha256
    plain = build_model(base.model, data.spec)
    plain.load_state_dict(load_checkpoint(store.local_path(published.manifest_uri).parent / "model.pt")["model"])
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), adapters.eval()(ids), rtol=0, atol=1e-5)
    # the published folder is a warm start of its own: its manifest names the merged fp32 weights
    again = TrainingSpec.of(base.with_values({"model.init_from": str(store.local_path(published.manifest_uri))}), data)
    assert again.warm_start.manifest_uri and again.warm_start.weights_uri.endswith("published/model.pt")
    torch.testing.assert_close(initial_model(again).state_dict()["blocks.0.attn.qkv.weight"],
                               plain.state_dict()["blocks.0.attn.qkv.weight"], rtol=0, atol=0)  # fmt: skip
    # the served model loads and predicts where peft cannot be imported
    import mlflow.artifacts

    served = in_tmp / "served"
    folder = Path(mlflow.artifacts.download_artifacts(published.mlflow_model_uri, dst_path=str(served),
                                                      tracking_uri=tracker.uri))  # fmt: skip
    assert "peft" not in (folder / "requirements.txt").read_text()
    script = ("import sys; sys.modules['peft'] = None; import mlflow.pyfunc; "
              f"print(mlflow.pyfunc.load_model({str(folder)!r}).predict(['def main():'])['top1_byte'][0])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=in_tmp)
    assert done.returncode == 0, done.stderr[-2000:]


def test_plain_runs_do_not_import_peft_and_a_missing_peft_names_the_extra(store, monkeypatch) -> None:
    script = ("import sys; from tests.conftest import tiny_raw; from trainflow.core.config import config_from_dict; "
              "from trainflow.core.prepare_data import prepare_data; from trainflow.core.storage.store import "
              "LocalStore; from trainflow.core.training.builder import build_trainer; from trainflow.core.training."
              f"spec import TrainingSpec; s = LocalStore({str(store.root)!r}); c = config_from_dict(tiny_raw()); "
              "build_trainer(TrainingSpec.of(c, prepare_data(c.data, c.seed, s)), s).fit(); "
              "assert 'peft' not in sys.modules and 'transformers' not in sys.modules, 'peft imported'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "peft", None)  # as if the extra were not installed
    cfg = config_from_dict(tiny_raw(model={"lora": {"target_modules": ["head"]}}))
    with pytest.raises(ConfigError, match=r"model.lora: needs peft \(pip install 'trainflow\[finetune\]'\)"):
        preflight(cfg)
