"""`train.batch_size: auto`: the largest micro-batch that fits the device, found once and recorded.

As Lightning's `scale_batch_size` (mode binsearch): double from 2 until a step runs out of memory (or
the training split is used up), then binary-search between the last size that fit and the first that
did not. Each trial is a real training step (forward, backward, optimizer step: the optimizer's state
counts too) on a copy of the state, restored afterwards with the RNG, so the run that follows is the
one an explicit batch size would give. The answer is recorded in the store under a fingerprint of
what decides memory (model, data shape, precision, optimizer, device, strategy, processes); any stage
that builds a Trainer with the same fingerprint reads it instead of searching again.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from trainflow.core.data.loaders import Batch
from trainflow.core.errors import TrainingError
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.metrics import loss_fn
from trainflow.core.training.optim import build_optimizer
from trainflow.core.training.precision import autocast_context
from trainflow.core.training.seed import isolate_rng
from trainflow.core.training.spec import TrainingSpec

log = logging.getLogger(__name__)
RECORDS = "batch_size"  # store folder of the search records


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = 2) -> int:
    """The largest size in [1, limit] for which `fits` holds, assuming it holds up to some size and fails
    above: doubling from `start`, then bisection between the last success and the first failure.

    Raises:
        TrainingError: not even a size of 1 fits.
    """
    size, good, bad = min(start, limit), 0, limit + 1
    while size < bad:  # doubling phase
        if not fits(size):
            bad = size
            break
        good = size
        if size == limit:
            return size
        size = min(size * 2, limit)
    if good == 0:
        good, bad = (1, bad) if bad > 1 and fits(1) else (0, bad)
        if good == 0:
            raise TrainingError("train.batch_size: auto: not even a micro-batch of 1 fits this device")
    while bad - good > 1:  # bisection phase
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def fingerprint(spec: TrainingSpec, device: torch.device) -> str:
    """What decides a step's memory; the record's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    train = spec.train
    key = {"model": spec.model.model_dump(mode="json"), "model_code": spec.model_code, "optim": spec.optim.name,
           "precision": train.precision, "compile": train.compile, "strategy": train.distributed.strategy,
           "world": train.distributed.world_size, "input": list(spec.data.spec.input_shape),
           "device": name}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def search_batch_size(
    module: nn.Module, spec: TrainingSpec, train: Dataset[Batch], device: torch.device, store: ArtifactStore, key: str
) -> int:
    """The recorded size for `key`, else the largest micro-batch a training step of `module` fits (recorded)."""
    record = f"{RECORDS}/{key}.json"
    uri = store.uri_for(record)
    if store.exists(uri):
        found = int(json.loads(store.local_path(uri).read_text())["batch_size"])
        log.info("train.batch_size: auto -> %d (recorded in %s)", found, uri)
        return found
    limit = len(train)  # type: ignore[arg-type]
    saved = copy.deepcopy(module.state_dict())
    trials: dict[int, bool] = {}

    def fits(size: int) -> bool:
        trials[size] = _step_fits(module, spec, train, size, device)
        module.load_state_dict(saved)
        return trials[size]

    with isolate_rng():
        found = largest_fitting(fits, limit)
    store.put_bytes(json.dumps({"batch_size": found, "trials": trials}).encode(), record)
    log.info("train.batch_size: auto -> %d (tried %s; recorded in %s)", found, sorted(trials), uri)
    return found


def _step_fits(module: nn.Module, spec: TrainingSpec, train: Dataset[Batch], size: int, device: torch.device) -> bool:
    """One real training step at `size`: True unless the device runs out of memory."""
    optimizer = build_optimizer(module, spec.optim)
    x, y = train.__getitems__(list(range(size)))  # type: ignore[attr-defined]
    try:
        with autocast_context(device, spec.train.precision):
            loss = loss_fn(module(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
