"""Part 4 of `finetune.py`: digits 0-4, then all ten classes from 10% of the new classes' samples with a new
head: frozen-then-unfrozen with layer_lr_decay, full fine-tuning, and from scratch."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from finetune_common import DIGITS, DIGITS_BATCH, DIGITS_LR, NEW_SHARE, Budget, Verdict, spread

from trainflow.core.config import Config, config_from_dict
from trainflow.core.data.prepared import ArraySplits, load_splits, splits_to_npz
from trainflow.core.data.spec import DataSpec
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.metrics import eval_pass
from trainflow.core.training.spec import TrainingSpec


# ------------------------------------------------------------------------------------------------------- digits
@dataclass
class DigitsRun:
    accuracy: float
    old: float  # classes 0-4
    new: float  # classes 5-9
    seconds: float
    trainable_start: int = 0


def digits_config(seed: int, epochs: int, model: dict[str, Any] | None = None, **train_extra: Any) -> Config:
    train_cfg = {"max_epochs": epochs, "batch_size": DIGITS_BATCH, "device": "cpu", "progress_bar": False,
                 "early_stopping": {"enabled": False, "restore_best": False}, "resume": False}  # fmt: skip
    raw = {"seed": seed, "data": {"source": "sklearn", "name": "digits"}, "model": {**DIGITS, **(model or {})},
           "optim": {"lr": DIGITS_LR}, "train": train_cfg | train_extra}  # fmt: skip
    return config_from_dict(raw)


def prepared(store: LocalStore, name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], spec: DataSpec,
              source: str) -> PrepareDataResult:  # fmt: skip
    """A prepared .npz of `splits` and its record, as prepare_data writes them."""
    arrays = ArraySplits({s: x for s, (x, _) in splits.items()}, {s: y for s, (_, y) in splits.items()},
                         spec.class_names, int(np.prod(spec.input_shape)))  # fmt: skip
    payload = splits_to_npz(arrays)
    fingerprint = hashlib.sha256(payload + spec.model_dump_json().encode()).hexdigest()
    uri = store.put_bytes(payload, f"data/{name}-{fingerprint[:16]}/splits.npz")
    counts = [len(splits[s][1]) for s in ("train", "val", "test")]
    return PrepareDataResult(fingerprint=fingerprint, uri=uri, source=source, n_train=counts[0], n_val=counts[1],
                             n_test=counts[2], spec=spec)  # fmt: skip


def digits_data(seed: int, store: LocalStore) -> tuple[PrepareDataResult, PrepareDataResult, str]:
    """(classes 0-4, the fine-tuning set, a description) from the stage's ten-class split of `seed`."""
    full = prepare_data(digits_config(seed, 1).data, seed, store)
    arrays = load_splits(store, full)
    rng = np.random.default_rng(seed)
    old_data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    new_data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "val", "test"):
        x, y = arrays.x[split], arrays.y[split]
        old = y < 5
        old_data[split] = (x[old], y[old])
        if split == "test":
            new_data[split] = (x, y)  # every class, all of it
            continue
        keep = list(np.flatnonzero(old))
        for c in range(5, 10):
            members = np.flatnonzero(y == c)
            keep += list(rng.choice(members, max(1, round(NEW_SHARE * len(members))), replace=False))
        keep_idx = np.sort(np.array(keep))
        new_data[split] = (x[keep_idx], y[keep_idx])
    spec5 = full.spec.model_copy(update={"n_classes": 5, "class_names": full.spec.class_names[:5]})
    pre = prepared(store, f"digits-0to4-seed{seed}", old_data, spec5, "sklearn:digits classes 0-4")
    ft = prepared(store, f"digits-ft-seed{seed}", new_data, full.spec, "sklearn:digits 0-4 + 10% of 5-9")
    n_new = {s: int((new_data[s][1] >= 5).sum()) for s in ("train", "val")}
    text = (f"pretraining {pre.n_train} train / {pre.n_val} val (classes 0-4); fine-tuning {ft.n_train} train "
            f"({ft.n_train - n_new['train']} old + {n_new['train']} new) / {ft.n_val} val ({n_new['val']} new); test "
            f"{ft.n_test} (ten classes)")  # fmt: skip
    return pre, ft, text


def digits_fit(cfg: Config, data: PrepareDataResult, store: LocalStore) -> DigitsRun:
    started = time.perf_counter()
    trainer = build_trainer(TrainingSpec.of(cfg, data), store)
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    trainer.fit()
    result = eval_pass(trainer.model, trainer.loaders.test, trainer.device, trainer.autocast, collect=True)
    assert result.predictions is not None and result.targets is not None
    right, y = result.predictions == result.targets, result.targets
    return DigitsRun(float(right.mean()), float(right[y < 5].mean()), float(right[y >= 5].mean()),
                     time.perf_counter() - started, trainable)  # fmt: skip


def digits(seeds: Sequence[int], budget: Budget, store: LocalStore) -> list[Verdict]:
    epochs = budget.digits_epochs
    unfreeze = max(1, epochs // 3)
    print(f"\n== 4. digits: CNN {DIGITS['channels']} pretrained on classes 0-4 ({budget.digits_pretrain_epochs} "
          f"epochs), then on all old-class samples + {NEW_SHARE:.0%} of each new class's for {epochs} epochs, head "
          f"re-initialised; AdamW lr {DIGITS_LR:g}, batch {DIGITS_BATCH}, cosine; (a) freeze [stem, blocks] until "
          f"epoch {unfreeze}, layer_lr_decay 0.5; (b) full fine-tune; (c) scratch")  # fmt: skip
    variants = {
        f"(a) frozen, unfrozen at epoch {unfreeze}, layer_lr_decay 0.5": (
            True, {"finetune": {"freeze": ["stem", "blocks"], "unfreeze_at_epoch": unfreeze, "layer_lr_decay": 0.5}}),
        "(b) full fine-tune": (True, {}),
        "(c) from scratch": (False, {}),
    }  # fmt: skip
    runs: dict[str, dict[int, DigitsRun]] = {name: {} for name in variants}
    for seed in seeds:
        pre, ft, text = digits_data(seed, store)
        cfg = digits_config(seed, budget.digits_pretrain_epochs)
        parent = train(TrainingSpec.of(cfg, pre), store, f"digits/pretrain-seed-{seed}")
        path = str(store.local_path(parent.checkpoint_uri))
        print(f"  seed {seed}: {text}; pretrained val accuracy (0-4) {parent.best_metrics.get('val/accuracy', 0):.3f}")
        for name, (warm, extra) in variants.items():
            model = {"init_from": path, "reinit": ["head"]} if warm else {}
            run = digits_fit(digits_config(seed, epochs, model, **extra), ft, store)
            runs[name][seed] = run
            print(f"    {name}: test accuracy {run.accuracy:.4f} (old {run.old:.3f}, new {run.new:.3f}); "
                  f"{run.trainable_start:,} parameters train at the start; {run.seconds:.1f} s")  # fmt: skip
    print("\n| variant | test accuracy, 10 classes | old classes 0-4 | new classes 5-9 |\n| --- | ---: | ---: | ---: |")
    means = {}
    for name, by_seed in runs.items():
        values = [by_seed[s] for s in seeds]
        means[name] = statistics.fmean(r.accuracy for r in values)
        print(f"| {name} | {spread([r.accuracy for r in values], '.4f')} | {spread([r.old for r in values])} | "
              f"{spread([r.new for r in values])} |")  # fmt: skip
    winner = max(means, key=means.__getitem__)
    ranked = " > ".join(f"{n.split()[0]} {means[n]:.4f}" for n in sorted(means, key=means.__getitem__, reverse=True))
    print(f"\n4. digits: {ranked} (mean test accuracy over {len(seeds)} seeds): {winner} wins")
    return [Verdict("4. digits 0-4 -> 0-9 (10% of new-class samples)", f"{ranked}; winner {winner.split()[0]}",
                    "report the winner", True)]  # fmt: skip
