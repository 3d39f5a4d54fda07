"""Run one fit of a config in this process and SIGKILL it when a given step ends (the fine-tuning kill tests):
`python -m tests.core.finetune_support CONFIG_JSON STORE KEY KILL_STEP`."""

from __future__ import annotations

import json
import os
import signal
import sys

from trainflow.core.config import config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.trainer import Trainer


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(raw_json: str, store_root: str, key: str, kill_step: int) -> None:
    cfg = config_from_dict(json.loads(raw_json))
    store = LocalStore(store_root)
    data = prepare_data(cfg.data, cfg.seed, store)
    train(TrainingSpec.of(cfg, data), store, key, callbacks=[KillAt(kill_step)] if kill_step else [])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
