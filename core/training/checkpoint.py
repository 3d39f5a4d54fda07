"""Checkpoints for crash-safe resume: written to a temp file and renamed, the last k kept.

A periodic checkpoint holds everything `Trainer.fit` needs to continue as if never stopped:
model, optimizer, scheduler, scaler, RNG states, progress (epoch, step, data position) and the
callbacks' states (the best weights so far among them), plus the resolved config and tracking
run id. `best.pt` holds the weights of the best evaluation, `model.pt` those the stage hands on.

With a remote store (`uploads` given), each file is written locally first, then uploaded in the
background under the same key folder; after each periodic checkpoint's upload the index
`checkpoints.json` (its name, step, sha256) is written, then older checkpoints are pruned locally and in
the store (`keep_last`, counted among those uploaded). The index therefore never names a missing object,
and a machine without the local folder resumes from it (`fetch_latest_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainflow.core.config import CheckpointConfig, EarlyStoppingConfig
from trainflow.core.errors import TrainingError
from trainflow.core.models import build_model
from trainflow.core.models.lora import is_lora, load_weights, merged
from trainflow.core.storage.files import sha256_file
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.storage.uploads import BackgroundUploads, ListingStore
from trainflow.core.training.callbacks import Callback, is_improvement, monitored_value
from trainflow.core.training.initial import initial_model
from trainflow.core.training.sharded import SHARDS_SUFFIX
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import FitResult

if TYPE_CHECKING:
    from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^step-(\d+)\.pt$")
BEST, FINAL, INDEX = "best.pt", "model.pt", "checkpoints.json"
EXCEPTION_WAIT_S = 30.0  # when fit fails, pending uploads get this long to finish (a resume needs them)


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Atomic save: a crash mid-write leaves the previous checkpoint intact, never a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint we wrote (tensors and plain containers only: `weights_only=True`).

    Raises:
        TrainingError: the file cannot be loaded; a run never silently starts over.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"{path}: checkpoint cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "delete it to start this run over, or set train.resume=false"
        ) from None


def trained_model(spec: TrainingSpec, store: ArtifactStore, weights_uri: str, merge: bool = True) -> nn.Module:
    """`spec`'s model holding the weights a fit handed on (a `TrainResult.checkpoint_uri`), on CPU, in eval mode.
    A LoRA training's adapters are merged into the weights unless `merge` is false (evaluate runs them unmerged)."""
    model = initial_model(spec, store) if spec.model.lora is not None else build_model(spec.model, spec.data.spec)
    load_weights(model, load_checkpoint(store.local_path(weights_uri))["model"])
    return (merged(model) if merge else model).eval()


def remove_checkpoint(path: Path) -> None:
    """A periodic checkpoint, and its shards folder if it has one."""
    path.unlink(missing_ok=True)
    shutil.rmtree(path.with_suffix(SHARDS_SUFFIX), ignore_errors=True)


def periodic_checkpoints(folder: Path) -> list[Path]:
    """Periodic checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PERIODIC.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = periodic_checkpoints(folder)
    return found[-1] if found else None


def fetch_latest_checkpoint(store: ArtifactStore, store_key: str) -> Path | None:
    """Download the checkpoint the store's index names into the local folder (the store's cache), or None
    when the store has no index for `store_key`.

    Raises:
        StoreError: the index or the checkpoint cannot be read.
        TrainingError: the downloaded checkpoint is not the one the index names.
    """
    index_uri = store.uri_for(f"{store_key}/{INDEX}")
    if not store.exists(index_uri):
        return None
    index = json.loads(store.local_path(index_uri).read_text())
    uri = store.uri_for(f"{store_key}/{index['latest']}")
    path = store.local_path(uri)
    if sha256_file(path) != index["sha256"]:
        raise TrainingError(f"{uri}: content differs from the sha256 in {index_uri}; set train.resume=false")
    log.info("no local checkpoint: downloaded %s (step %d) to resume from", uri, index["step"])
    return path


def _older(paths: list[Path], step: int, keep_last: int) -> list[Path]:
    """Those of `paths` (periodic checkpoints, oldest first) at or before `step`, but the last `keep_last`."""
    upto = [p for p in paths if int(_PERIODIC.match(p.name).group(1)) <= step]  # type: ignore[union-attr]
    return upto[:-keep_last]


class ModelCheckpoint(Callback):
    """Periodic checkpoints for resume, and the weights of the best evaluation.

    Periodic checkpoints are written every `every_steps` optimizer steps when set; otherwise at an
    evaluation once `min_interval_s` seconds have passed since the last one, so short epochs do not
    pay a save each. The best weights are kept in host memory and travel inside every periodic
    checkpoint. At fit end: a last checkpoint, `best.pt`, then (with `restore_best`) the best
    weights are loaded and the weights the stage hands on are written to `model.pt`.
    """

    def __init__(
        self,
        folder: Path,
        cfg: CheckpointConfig,
        monitor: EarlyStoppingConfig,
        extra: dict[str, Any],
        uploads: BackgroundUploads | None = None,
        store_key: str = "",
        writer: bool = True,
    ):
        """`uploads`: background uploads to a remote store, under `store_key` (None: the folder is final).
        `writer`: whether this rank writes files. Under FSDP every rank runs this callback (saving and
        gathering weights are collectives) and only the main rank writes."""
        self.folder, self.cfg, self.monitor, self.extra = folder, cfg, monitor, extra
        self.writer = writer
        self.uploads, self.store_key = uploads, store_key
        self.best: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._saved_step: int | None = None
        self._saved_at = time.monotonic()

    def on_step_end(self, trainer: Trainer) -> None:
        if self.cfg.every_steps and trainer.state.step % self.cfg.every_steps == 0:
            self.save(trainer)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        current = monitored_value(metrics, self.monitor.monitor, "train.early_stopping.monitor")
        if is_improvement(current, self.best, self.monitor.mode, 0.0):
            self.best, self.best_metrics, self.best_step = current, dict(metrics), trainer.state.step
            self.best_weights = trainer.full_state_dict()
        due = self.cfg.every_steps is None and time.monotonic() - self._saved_at >= self.cfg.min_interval_s
        if trainer.main_decides(due) if trainer.sharded else due:  # under FSDP every rank saves: one decision
            self.save(trainer)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        if self._saved_step != trainer.state.step:
            self.save(trainer)
        restore = self.monitor.restore_best and self.best_step is not None
        if self.writer and self.best_weights is not None:
            best = {"model": self.best_weights, "step": self.best_step, "metrics": self.best_metrics}
            save_checkpoint(best, self.folder / BEST)
            self._upload(BEST)
        if restore and not trainer.sharded:
            load_weights(trainer.module, self.best_weights)  # type: ignore[arg-type]
        if restore:
            log.info("restored the weights of step %s (%s=%.5g)", self.best_step, self.monitor.monitor, self.best)
        final = self.best_weights if restore and trainer.sharded else trainer.full_state_dict()  # full, even FSDP
        if self.writer:
            base = {"adapters_of": self.extra.get("config", {}).get("warm_start") or "seeded init"} if is_lora(
                trainer.module) else {}  # fmt: skip
            save_checkpoint({"model": final, "step": trainer.state.step, **base}, self.folder / FINAL)
            self._upload(FINAL)
        if self.uploads is not None:
            self.uploads.close()  # the stage returns only once everything is in the store; a failure raises

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        if self.uploads is None:
            return
        try:
            if not self.uploads.close(EXCEPTION_WAIT_S):
                log.warning("checkpoint uploads still running %.0f s after the failure: abandoned", EXCEPTION_WAIT_S)
        except TrainingError as failure:  # the exception leaving fit is the one to report
            log.warning("%s", failure)

    def save(self, trainer: Trainer) -> Path:
        """Write a periodic checkpoint; with a store to upload to, queue its upload (blocks while the queue is full)."""
        step = trainer.state.step
        path = self.folder / f"step-{step:09d}.pt"
        state = trainer.checkpoint_state(path.with_suffix(SHARDS_SUFFIX))  # FSDP: every rank writes its shards
        self._saved_step, self._saved_at = step, time.monotonic()
        if not self.writer:
            return path
        save_checkpoint(state | self.extra, path)
        if self.uploads is None:
            for old in periodic_checkpoints(self.folder)[: -self.cfg.keep_last]:
                remove_checkpoint(old)
        else:
            self.uploads.submit(lambda: self._publish(path, step), self.uploads.store.uri_for(self._key(path.name)))
        return path

    def _upload(self, name: str) -> None:
        if self.uploads is not None:
            self.uploads.put_file(self.folder / name, self._key(name))

    def _publish(self, path: Path, step: int) -> None:
        """Upload job of a periodic checkpoint (worker thread): the file, then the index naming it, then
        prune older ones, locally and in the store; pruning in the store is best effort."""
        assert self.uploads is not None
        store = self.uploads.store
        store.put_file(path, self._key(path.name))
        index = {"latest": path.name, "step": step, "sha256": sha256_file(path)}
        store.put_bytes(json.dumps(index).encode(), self._key(INDEX))
        for old in _older(periodic_checkpoints(self.folder), step, self.cfg.keep_last):
            old.unlink(missing_ok=True)
        if isinstance(store, ListingStore):
            names = [k.rsplit("/", 1)[-1] for k in store.list_keys(self.store_key)]
            stored = [Path(n) for n in names if _PERIODIC.match(n)]
            for old in _older(sorted(stored), step, self.cfg.keep_last):
                try:
                    store.delete(self._key(old.name))
                except Exception as exc:  # a leftover old checkpoint costs storage, not correctness
                    log.warning("%s: not pruned (%s)", self._key(old.name), exc)

    def _key(self, name: str) -> str:
        return f"{self.store_key}/{name}"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_metrics": self.best_metrics, "best_step": self.best_step,
                "best_weights": self.best_weights}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_metrics, self.best_step = state["best"], state["best_metrics"], state["best_step"]
        self.best_weights = state["best_weights"]
