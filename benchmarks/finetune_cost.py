"""Part 2's costs in `finetune.py`: step time with the trainers alternated round by round, and peak resident
memory of a fresh process per variant."""

from __future__ import annotations

import gc
import importlib
import resource
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import psutil
import torch
from finetune_common import TIMED_STEPS

from trainflow.core.config import Config, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.spec import TrainingSpec


def alternated_step_ms(cfgs: dict[str, Config], store: LocalStore, rounds: int) -> dict[str, float]:
    """Median ms per optimizer step of each config's trainer, `rounds` rounds of `TIMED_STEPS` steps each, the
    trainers alternated round by round (after 3 untimed steps each), so load from other work hits them alike."""
    trainers, batches = {}, {}
    for name, cfg in cfgs.items():
        data = prepare_data(cfg.data, cfg.seed, store)
        trainer = build_trainer(TrainingSpec.of(cfg, data), store)
        trainer.model.train()
        trainer.loaders.sampler.set_epoch(0, start=0)
        trainers[name], batches[name] = trainer, iter(trainer.loaders.train)
        for _ in range(3):
            trainer.train_step([next(batches[name])])
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            steps = [[next(batches[name])] for _ in range(TIMED_STEPS)]
            started = time.perf_counter()
            for micro_batches in steps:
                trainer.train_step(micro_batches).loss.item()
            times[name].append((time.perf_counter() - started) / TIMED_STEPS)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------- memory probe
def memory_probe(cfg: Config, store_root: Path, threads: int) -> dict[str, float]:
    """Peak RSS of training `cfg` in a fresh spawned process (see the module docstring)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(memory_child, cfg.model_dump(mode="json"), str(store_root), threads).result()


def memory_child(raw: dict[str, Any], store_root: str, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    store = LocalStore(Path(store_root))
    cfg = config_from_dict(raw)
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    for module in ("peft", "torch._dynamo"):  # a LoRA model's build, the first optimizer: modules, not training
        importlib.import_module(module)

    gc.collect()
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        build_trainer(spec, store).fit()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"start_mb": start / 2**20, "delta_mb": (peak[0] - start) / 2**20, "maxrss_mb": maxrss}
