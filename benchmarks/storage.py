"""Storage figures: S3 upload throughput, and what checkpoint uploads cost the training loop.

(1) upload: a checkpoint-sized file (256 MB by default) through `S3Store.put_file` (sha256, managed
    multipart upload, HEAD check) to moto's S3 server on loopback, in MB/s; then the same put again
    (unchanged content: one HEAD, skipped).
(2) loop: the same fit (synthetic data, a wide MLP, a periodic checkpoint every N steps) three ways,
    rounds alternating the order: `none` (a local store: checkpoints written, nothing uploaded), `async`
    (an S3 store: uploads in the background, the last ones awaited at fit end), `blocking` (the same
    uploads run inline at each save). `loop s` runs from the first step to the end of the last one
    (what the trainer waits for), `total s` is the whole `train` call, end-of-fit uploads included.
    Goal: async loop <= 2% slower than none.

moto's server runs in its own process, so it does not compete with the trainer for the GIL.

    .venv/bin/python benchmarks/storage.py                 # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/storage.py --upload-mb 64 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainflow.core.config import StoreConfig, config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage import uploads as uploads_module
from trainflow.core.storage.store import ArtifactStore, LocalStore, open_store
from trainflow.core.train import train
from trainflow.core.training import run as run_module
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.trainer import Trainer

MB = 1_000_000
RAW = {
    "seed": 0,
    "data": {"source": "synthetic", "n_samples": 20000, "n_features": 64, "n_classes": 10},
    "model": {"name": "mlp", "hidden_sizes": [1024, 1024], "dropout": 0.0},
    "optim": {"lr": 0.001},
    "train": {"max_epochs": 1, "batch_size": 64, "progress_bar": False, "early_stopping": {"enabled": False}},
}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a child process on a free loopback port, with fake credentials set here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env | {"AWS_EC2_METADATA_DISABLED": "true"})
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def s3_store(endpoint: str, cache: Path, bucket: str) -> ArtifactStore:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return open_store(StoreConfig(uri=f"s3://{bucket}/bench", endpoint_url=endpoint, cache_dir=str(cache)))


def upload_figures(endpoint: str, root: Path, size_mb: int) -> None:
    store = s3_store(endpoint, root / "upload-cache", "bench-upload")
    src = root / "big.pt"
    with open(src, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MB))
    started = time.perf_counter()
    store.put_file(src, "ckpt/big.pt")
    first = time.perf_counter() - started
    started = time.perf_counter()
    store.put_file(src, "ckpt/big.pt")
    again = time.perf_counter() - started
    part = store.settings.multipart_threshold_mb  # type: ignore[attr-defined]
    print(f"(1) upload of {size_mb} MB via S3Store.put_file (multipart, {part} MiB parts, sha256 + HEAD check)")
    print(f"    {first:6.2f} s  = {size_mb / first:6.1f} MB/s;  unchanged re-put: {again * 1000:.0f} ms (skipped)")
    src.unlink()


class _LoopClock(Callback):
    """Time from the first step's start to the last step's end (after the checkpoint callback's work)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, trainer: Trainer) -> None:
        self.ended = time.perf_counter()


class _Blocking(uploads_module.BackgroundUploads):
    """The same jobs run inline at submit: the trainer waits for each upload."""

    def submit(self, job: Callable[[], None], what: str) -> None:
        job()


def loop_figures(endpoint: str, root: Path, rounds: int, every: int) -> None:
    cfg = config_from_dict(RAW | {"train": RAW["train"] | {"checkpoint": {"every_steps": every, "keep_last": 2}}})
    stores: dict[str, ArtifactStore] = {"none": LocalStore(root / "local")}
    stores["async"] = stores["blocking"] = s3_store(endpoint, root / "loop-cache", "bench-loop")
    data = {name: prepare_data(cfg.data, cfg.seed, store) for name, store in stores.items()}
    modes = ["none", "async", "blocking"]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}

    def one(mode: str, key: str) -> tuple[float, float]:
        run_module.BackgroundUploads = _Blocking if mode == "blocking" else uploads_module.BackgroundUploads  # type: ignore[misc]
        clock = _LoopClock()
        started = time.perf_counter()
        result = train(TrainingSpec.of(cfg, data[mode]), stores[mode], key,
                       callbacks=[clock])  # fmt: skip
        assert result.resumed_from_step is None
        return clock.ended - clock.started, time.perf_counter() - started

    one("async", "warmup")  # imports, first optimizer, client and connection pool
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            times[mode].append(one(mode, f"{mode}/{r}"))
    run_module.BackgroundUploads = uploads_module.BackgroundUploads  # type: ignore[misc]
    size = max(p.stat().st_size for p in (root / "local" / "none" / "0").glob("step-*.pt")) / MB
    steps = 14000 // 64 + 1
    print(f"(2) fit: MLP 64-1024-1024-10, {steps} steps, checkpoint ({size:.1f} MB) every {every} steps; "
          f"median of {rounds} rounds, orders alternated")  # fmt: skip
    base_loop = statistics.median(t[0] for t in times["none"])
    base_total = statistics.median(t[1] for t in times["none"])
    print(f"    {'mode':9} {'loop s':>7} {'vs none':>8} {'total s':>8} {'vs none':>8}")
    for mode in modes:
        loop, total = statistics.median(t[0] for t in times[mode]), statistics.median(t[1] for t in times[mode])
        print(f"    {mode:9} {loop:7.2f} {loop / base_loop - 1:+8.1%} {total:8.2f} {total / base_total - 1:+8.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upload-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every-steps", type=int, default=40)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default (one per core)")
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs (shared: figures are indicative), "
          f"{torch.get_num_threads()} torch threads; the S3 server shares these CPUs")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        root = Path(tmp)
        os.chdir(root)
        if args.upload_mb:
            upload_figures(endpoint, root, args.upload_mb)
        loop_figures(endpoint, root, args.rounds, args.every_steps)


if __name__ == "__main__":
    main()
