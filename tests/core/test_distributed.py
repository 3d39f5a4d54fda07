"""Data-parallel training through torch's elastic launcher on gloo (CPU): 2 ranks end with the weights of
1 process on the same global batch, with and without accumulation, across an epoch boundary, and after a
kill and resume mid-epoch; 2 "machines" of 1 process meeting by c10d rendezvous on loopback train the
same as 1 machine of 2; a failing or killed rank fails the stage with its own error, quickly."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_raw
from trainflow.core.config import config_from_dict
from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.checkpoint import FINAL, load_checkpoint, periodic_checkpoints, trained_model
from trainflow.core.training.fit import fit_in_folder
from trainflow.core.training.spec import TrainingSpec

pytestmark = pytest.mark.slow  # ranks in several processes: left out of `pytest -m 'not slow'`

TOL = {"atol": 2e-6, "rtol": 1e-5}  # fp32: the sums run in another order across ranks


def _cfg(world: int, batch: int, accum: int = 1, **train: Any) -> Any:
    ranks = {
        "nproc_per_node": world,
        "rdzv_endpoint": "localhost:0",
        "collective_timeout_s": 60,
    }  # a hang fails in 1 min
    settings = {
        "batch_size": batch, "grad_accum_steps": accum, "max_epochs": 3, "max_steps": 12, "log_every_steps": 4,
        "early_stopping": {"enabled": False, "restore_best": False},
        "distributed": ranks | train.pop("distributed", {}),
    } | train  # fmt: skip
    return config_from_dict(tiny_raw(train=settings))


def _fit(cfg: Any, store: LocalStore, key: str) -> Any:
    data = prepare_data(cfg.data, cfg.seed, store)
    return fit_in_folder(TrainingSpec.of(cfg, data), store, key)


def _weights(store: LocalStore, key: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(store.workdir(key) / FINAL)["model"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("accum", [1, 2])
def test_two_gloo_ranks_end_with_the_weights_of_one_process(store: LocalStore, accum: int) -> None:
    one = _fit(_cfg(1, 16, accum), store, f"one-{accum}")
    two = _fit(_cfg(2, 8, accum), store, f"two-{accum}")
    assert two.world_size == 2 and two.effective_batch_size == 16 * accum
    assert one.steps == two.steps == 12
    assert one.epochs_run >= 2, "the run crosses an epoch boundary (a new shuffle, a short last batch)"
    assert two.checkpoint_uri == (store.workdir(f"two-{accum}") / FINAL).as_uri(), "the main rank's record"
    _assert_same(_weights(store, f"one-{accum}"), _weights(store, f"two-{accum}"))
    assert two.best_metrics["val/loss"] == pytest.approx(one.best_metrics["val/loss"], rel=1e-5), "sharded val reduced"


class KillAtStep(Callback):
    """A callback (it travels to the main rank) that SIGKILLs its process when a step ends."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Any) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FailOnRank:
    """A loss hook (it travels to every rank) that fails on one rank at its n-th micro-batch: `raise` a
    ValueError, or `kill` the process."""

    def __init__(self, rank: int, at_call: int, how: str):
        self.rank, self.at_call, self.how, self.calls = rank, at_call, how, 0

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(os.environ.get("RANK", "0")) == self.rank and self.calls == self.at_call:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"planted failure at micro-batch {self.calls}")
        return torch.nn.functional.cross_entropy(model(x), y)


def _kill_main_rank_at(step: int, cfg: Any, store: LocalStore, key: str) -> None:
    """Fit `cfg` on its ranks with the main rank SIGKILLed when `step` ends: the stage fails with that rank's signal."""
    data = prepare_data(cfg.data, cfg.seed, store)
    with pytest.raises(TrainingError, match=r"rank 0 failed: Signal 9 \(SIGKILL\)"):
        fit_in_folder(TrainingSpec.of(cfg, data), store, key,
                      callbacks=[KillAtStep(step)])  # fmt: skip


def test_ddp_unfreezing_mid_run_ends_with_the_weights_of_one_process(store: LocalStore) -> None:
    """DDP registers the trainable parameters when it wraps: the unfreeze at epoch 1 (step 8) wraps again, and the
    newly trainable layer is averaged over the ranks like the rest."""
    finetune = {"finetune": {"freeze": ["net.1"], "unfreeze_at_epoch": 1, "layer_lr_decay": 0.5}}
    one = _fit(_cfg(1, 16, **finetune), store, "ft-one")
    two = _fit(_cfg(2, 8, **finetune), store, "ft-two")
    assert one.steps == two.steps == 12 and two.world_size == 2
    weights = _weights(store, "ft-two")
    _assert_same(_weights(store, "ft-one"), weights)
    assert two.trainable_parameters == two.total_parameters  # unfrozen by the end


def test_a_killed_main_rank_fails_the_stage_and_a_rerun_resumes_mid_epoch_to_the_same_weights(
    store: LocalStore,
) -> None:
    checkpoints = {"checkpoint": {"every_steps": 3, "keep_last": 5}}
    _fit(_cfg(2, 8, **checkpoints), store, "whole")
    cfg = _cfg(2, 8, **checkpoints)
    _kill_main_rank_at(11, cfg, store, "killed")
    saved = [int(p.stem.split("-")[1]) for p in periodic_checkpoints(store.workdir("killed"))]
    assert saved == [3, 6, 9]
    state = load_checkpoint(store.workdir("killed") / "step-000000009.pt")["state"]
    assert 0 < state["batch_in_epoch"] < 8, "the checkpoint resumed from is mid-epoch"
    resumed = _fit(cfg, store, "killed")
    assert resumed.resumed_from_step == 9 and resumed.steps == 12
    _assert_same(_weights(store, "whole"), _weights(store, "killed"))


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_brings_the_stage_down_with_its_error_without_hanging(store: LocalStore, how: str) -> None:
    cfg = _cfg(2, 8, max_steps=200, max_epochs=50)
    data = prepare_data(cfg.data, cfg.seed, store)
    expected = r"rank 1 failed: ValueError: planted failure at micro-batch 5" if how == "raise" else (
        r"rank 1 failed: Signal 9 \(SIGKILL\)")  # fmt: skip
    started = time.monotonic()
    with pytest.raises(TrainingError, match=expected):
        fit_in_folder(TrainingSpec.of(cfg, data), store, f"fail-{how}",
                      loss=FailOnRank(1, 5, how))  # fmt: skip
    assert time.monotonic() - started < 60, "rank 0 must not wait out the collective timeout"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_of_one_process_train_as_one_machine_of_two(store: LocalStore, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    _fit(_cfg(2, 8), store, "one-machine")
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": endpoint, "rdzv_timeout_s": 120}
    cfg = _cfg(1, 8, distributed=nodes)
    config_file = tmp_path / "two-nodes.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    other = subprocess.Popen(
        [sys.executable, "-m", "trainflow", "train", str(config_file), "--node-rank", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        two = _fit(cfg, store, "two-machines")
    finally:
        out, _ = other.communicate(timeout=120)
    assert other.returncode == 0, out
    assert "node 1: training done" in out
    assert two.world_size == 2
    _assert_same(_weights(store, "one-machine"), _weights(store, "two-machines"))


@pytest.mark.parametrize(
    ("distributed", "message"),
    [
        ({"backend": "nccl"}, r"train.distributed.backend: 'nccl' needs CUDA devices"),
        (
            {"rdzv_endpoint": "no-such-host.invalid:29400"},
            r"train.distributed.rdzv_endpoint: host 'no-such-host.invalid'",
        ),
    ],
)
def test_a_launch_that_cannot_run_here_is_a_one_line_config_error(
    store: LocalStore, distributed: dict[str, Any], message: str
) -> None:
    cfg = _cfg(2, 8, distributed=distributed)
    data = prepare_data(cfg.data, cfg.seed, store)
    with pytest.raises(ConfigError, match=message):
        fit_in_folder(TrainingSpec.of(cfg, data), store, "bad")
    assert not periodic_checkpoints(store.workdir("bad"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on CPU any number of gloo processes runs")
def test_more_processes_than_gpus_is_a_config_error(store: LocalStore) -> None:
    cfg = _cfg(torch.cuda.device_count() + 1, 8, device="cuda")
    with pytest.raises(ConfigError, match=r"train.distributed.nproc_per_node: \d+ processes but this machine has"):
        from trainflow.core.training.distributed import check_distributed

        check_distributed(cfg.train)


def test_fsdp_on_two_ranks_trains_as_one_process_and_publishes_a_full_state_dict(store: LocalStore) -> None:
    fsdp = {"strategy": "fsdp"}
    one = _fit(_cfg(1, 16, 2), store, "fsdp-one")
    two = _fit(_cfg(2, 8, 2, distributed=fsdp), store, "fsdp-two")
    assert (one.world_size, two.world_size) == (1, 2)
    weights = _weights(store, "fsdp-two")
    assert all(type(t) is torch.Tensor for t in weights.values()), "plain tensors, not DTensor shards"
    _assert_same(_weights(store, "fsdp-one"), weights)


def test_fsdp_checkpoints_are_sharded_and_resume_after_a_kill(store: LocalStore) -> None:
    settings = {"checkpoint": {"every_steps": 3, "keep_last": 2}, "distributed": {"strategy": "fsdp"}}
    _fit(_cfg(2, 8, **settings), store, "fsdp-whole")
    cfg = _cfg(2, 8, **settings)
    _kill_main_rank_at(8, cfg, store, "fsdp-killed")
    folder = store.workdir("fsdp-killed")
    assert [p.name for p in periodic_checkpoints(folder)] == ["step-000000003.pt", "step-000000006.pt"]
    shards = folder / "step-000000006.shards"
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2, "one shard file per rank"
    assert load_checkpoint(folder / "step-000000006.pt")["model"] is None, "the weights live in the shards"
    resumed = _fit(cfg, store, "fsdp-killed")
    assert resumed.resumed_from_step == 6
    _assert_same(_weights(store, "fsdp-whole"), _weights(store, "fsdp-killed"))


def test_fsdp_with_an_s3_store_is_a_one_line_config_error() -> None:
    from trainflow.core.training.distributed import check_distributed

    cfg = _cfg(2, 8, distributed={"strategy": "fsdp"})
    with pytest.raises(ConfigError, match=r"^train.distributed.strategy: fsdp writes sharded checkpoints .* not s3://"):
        check_distributed(cfg.train, "s3://bucket/prefix")


def test_a_distillation_student_trains_on_two_ranks_as_on_one_process(store: LocalStore) -> None:
    from trainflow.core.compression.distillation import DistillationLoss, student_config
    from trainflow.core.models import build_model
    from trainflow.core.training.seed import seed_everything

    cfg = _cfg(1, 16)
    data = prepare_data(cfg.data, cfg.seed, store)
    spec = TrainingSpec.of(cfg, data)
    teacher = trained_model(spec, store, fit_in_folder(spec, store, "teacher").checkpoint_uri)
    student_cfg = student_config(cfg.model, 0.5)
    for world, batch in ((1, 16), (2, 8)):
        seed_everything(cfg.seed)
        student = build_model(student_cfg, data.spec)
        done = fit_in_folder(TrainingSpec.of(_cfg(world, batch), data).with_model(student_cfg), store,
                             f"student-{world}", model=student, loss=DistillationLoss(teacher, 0.5, 4.0))  # fmt: skip
        assert done.world_size == world
        _assert_same(student.state_dict(), _weights(store, f"student-{world}"))  # the model given ends trained
    _assert_same(_weights(store, "student-1"), _weights(store, "student-2"))


def test_a_machine_that_finds_no_peers_fails_with_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    nodes = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}", "rdzv_timeout_s": 3}
    config_file = tmp_path / "alone.yaml"
    config_file.write_text(yaml.safe_dump(_cfg(1, 8, distributed=nodes).model_dump(mode="json")))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "trainflow", "train", str(config_file), "--node-rank", "1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: train.distributed.rdzv_endpoint: not all 2 machines met at "
        f"{nodes['rdzv_endpoint']} within rdzv_timeout_s=3 s; is node 0 running and is the endpoint reachable "
        "from here?"
    ]
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def test_the_rank_that_failed_first_is_reported_not_the_peer_that_lost_it() -> None:
    from types import SimpleNamespace

    from trainflow.core.training.distributed import root_failure

    failures = {
        0: SimpleNamespace(
            message={"message": "RuntimeError: [gloo/pair.cc:553] Connection closed by peer"}, timestamp=1
        ),
        1: SimpleNamespace(message={"message": "ValueError: planted"}, timestamp=2),
    }
    assert root_failure(failures)[0] == 1
    failures[1].message = {"message": "ValueError: planted"}
    failures[0].message = {"message": "TrainingError: diverged"}
    assert root_failure(failures)[0] == 0, "otherwise the earliest"


def test_a_failing_rank_notes_its_error_before_its_peers_lose_it(tmp_path, monkeypatch) -> None:
    """The launcher may see only the peer that lost the connection (the failing rank still exiting): the failing
    rank's own note, written before its process group closed, names it. A rank being stopped notes nothing."""
    from trainflow.core.training.distributed import FAILURES_ENV, first_noted_failure, note_rank_failure

    monkeypatch.setenv(FAILURES_ENV, str(tmp_path))
    assert first_noted_failure(tmp_path) is None
    note_rank_failure(1, ValueError("planted"))
    note_rank_failure(0, RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:23967"))
    note_rank_failure(2, KeyboardInterrupt())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.json", "rank-1.json"]
    assert first_noted_failure(tmp_path) == (1, "ValueError: planted")
    (tmp_path / "rank-1.json").unlink()
    assert first_noted_failure(tmp_path) is None  # then the launcher's own record decides (root_failure)
