"""Data larger than memory: an image folder whose decoded size is well above a cap on the process's *anonymous*
resident memory (`RssAnon`: memory-mapped file pages count in plain RSS and say nothing here), prepared and trained
for an epoch under that cap, against the same kind of data small enough to train in memory.

Each row is a fresh child process (`prepare_data` into a fresh store, then `train` for one epoch, nothing else
running); the parent samples the child's RssAnon every 20 ms and kills it the moment it passes the cap, so "under
the cap" is a hard limit, not a reading. Rows, all with the same model, batch, loader (0 workers) and threads:

  small, memory   the small folder with the arrays in memory (the default below data.in_memory_max_mb); no cap
  small, shards   the same folder forced into shards (data.in_memory_max_mb: 0), capped
  large, shards   the large folder (decoded size >> cap), capped

Goal (issue 25): peak anonymous memory under the cap at any size; samples/s of training >= 0.8x in memory.

    python benchmarks/out_of_core.py                 # 64 px RGB: 160,000 images large, 12,000 small, cap 1 GB
    python benchmarks/out_of_core.py --large 20000 --small 4000 --cap-mb 448   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, load_average

CLASSES = 10


def write_folder(root: Path, count: int, size: int) -> Path:
    """`count` size x size RGB PNGs in CLASSES sub-folders: each class a colour and stripe frequency, under noise
    (learnable, and incompressible enough that decoding is real work). Written once per (count, size)."""
    from PIL import Image

    folder = root / f"images-{count}-{size}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True)
    grid = np.arange(size, dtype=np.float32)

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        label = i % CLASSES
        stripes = np.sin(grid[None, :] * (0.15 + 0.08 * label) + rng.uniform(0, 6.28))  # (1, W)
        colour = np.array([np.cos(label), np.sin(label), np.cos(2 * label)], np.float32)[:, None, None]
        image = 128 + 50 * stripes[None] * colour + rng.normal(0, 30, (3, size, size))
        pixels = np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"class{label}" / f"{i:06d}.png", compress_level=1)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, range(count)))
    (folder / ".complete").touch()
    return folder


def child(settings: dict[str, Any]) -> None:
    """One row: prepare the folder into a fresh store and train one epoch; print the figures as JSON."""
    from trainflow.core.config import config_from_dict
    from trainflow.core.prepare_data import prepare_data
    from trainflow.core.storage.store import LocalStore
    from trainflow.core.train import train
    from trainflow.core.training.spec import TrainingSpec

    data = {"source": "image_folder", "path": settings["folder"], "image_size": settings["size"],
            "in_memory_max_mb": settings["in_memory_max_mb"]}  # fmt: skip
    train_cfg = {"max_epochs": 1, "batch_size": 64, "early_stopping": {"enabled": False}, "resume": False,
                 "device": "cpu"}  # fmt: skip
    cfg = config_from_dict({"seed": 0, "data": data, "model": {"name": "cnn", "channels": [8, 16]},
                            "optim": {"lr": 0.003}, "train": train_cfg})  # fmt: skip
    store = LocalStore(settings["store"])
    started = time.perf_counter()
    prepared = prepare_data(cfg.data, cfg.seed, store)
    prepare_s = time.perf_counter() - started
    print("PHASE train", flush=True)
    started = time.perf_counter()
    result = train(TrainingSpec.of(cfg, prepared), store, "train")
    figures = {"layout": prepared.layout, "nbytes": prepared.nbytes, "n_train": prepared.n_train,
               "prepare_s": prepare_s, "train_s": time.perf_counter() - started,
               "samples_per_s": result.samples_per_s,
               "val_accuracy": result.best_metrics.get("val/accuracy")}  # fmt: skip
    print(json.dumps(figures))


def _rss_anon_kb(pid: int) -> int:
    """RssAnon of `pid` and every process below it (DataLoader workers), in kB; 0 once it is gone."""
    total, pids = 0, [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def run_row(name: str, folder: Path, size: int, in_memory_max_mb: float, cap_mb: float | None) -> dict[str, Any]:
    """The row in a child process, its RssAnon sampled every 20 ms (the peak of each phase: prepare, train);
    killed at the cap."""
    store = Path(tempfile.mkdtemp(prefix="ooc-store-"))
    settings = {"folder": str(folder), "size": size, "in_memory_max_mb": in_memory_max_mb, "store": str(store)}
    process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(settings)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    peaks, killed = {"prepare": 0, "train": 0}, False
    while process.poll() is None:
        phase = "train" if any(line.startswith("PHASE train") for line in lines) else "prepare"
        peaks[phase] = max(peaks[phase], _rss_anon_kb(process.pid))
        if cap_mb is not None and peaks[phase] > cap_mb * 1024:
            process.kill()
            killed = True
            break
        time.sleep(0.02)
    err = process.stderr.read() if process.stderr else ""
    process.wait()
    reader.join()
    shutil.rmtree(store, ignore_errors=True)
    row: dict[str, Any] = {"row": name, "cap_mb": cap_mb, "peak_prepare_mb": peaks["prepare"] / 1024,
                           "peak_train_mb": peaks["train"] / 1024, "killed_at_cap": killed}  # fmt: skip
    row["peak_rss_anon_mb"] = max(row["peak_prepare_mb"], row["peak_train_mb"])
    if process.returncode == 0:
        row |= json.loads(lines[-1])
    else:
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {process.returncode}"
    print(json.dumps(row), flush=True)
    return row


def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of several rounds: the median samples/s (and its range), the highest peaks, any failure."""
    row = dict(runs[0])
    for key in ("peak_prepare_mb", "peak_train_mb", "peak_rss_anon_mb"):
        row[key] = max(r[key] for r in runs)
    row["killed_at_cap"] = any(r["killed_at_cap"] for r in runs)
    speeds = [r["samples_per_s"] for r in runs if "samples_per_s" in r]
    if len(speeds) == len(runs):
        row |= {"samples_per_s": float(np.median(speeds)), "speed_min": min(speeds), "speed_max": max(speeds),
                "prepare_s": float(np.median([r["prepare_s"] for r in runs]))}  # fmt: skip
    else:
        row.pop("samples_per_s", None)
        row["error"] = next(r.get("error", "") for r in runs if "samples_per_s" not in r)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=160_000, help="images in the large folder")
    parser.add_argument("--small", type=int, default=12_000, help="images in the small folder (trained in memory)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (RGB)")
    parser.add_argument("--cap-mb", type=float, default=1024, help="the cap on anonymous resident memory")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "trainflow-out-of-core"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the two small rows, alternated")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    root = Path(args.root)
    started = time.perf_counter()
    large, small = write_folder(root, args.large, args.size), write_folder(root, args.small, args.size)
    print(f"folders ready in {time.perf_counter() - started:.0f} s under {root}", flush=True)
    decoded = 3 * args.size * args.size  # bytes per image, uint8
    runs: dict[str, list[dict[str, Any]]] = {"small, memory": [], "small, shards": []}
    for r in range(args.rounds):  # alternated, the order swapped each round: a drifting machine moves both alike
        order = [("small, memory", 1 << 20, None), ("small, shards", 0, args.cap_mb)]
        for name, threshold, cap in order if r % 2 == 0 else order[::-1]:
            runs[name].append(run_row(name, small, args.size, threshold, cap))
    rows = [_merged(runs["small, memory"]), _merged(runs["small, shards"]),
            run_row("large, shards", large, args.size, 0, args.cap_mb)]  # fmt: skip
    base = rows[0].get("samples_per_s")
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()} at the end")
    print(f"cap on RssAnon: {args.cap_mb:.0f} MB; images {args.size}x{args.size} RGB\n")
    print("| row | images | decoded uint8 | model-ready float32 | peak RssAnon prepare / train | under cap | "
          "prepare s | train samples/s (min-max) | x in memory | val acc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, count in zip(rows, (args.small, args.small, args.large), strict=True):
        speed = row.get("samples_per_s")
        ratio = f"{speed / base:.2f}x" if speed and base else "-"
        under = "-" if row["cap_mb"] is None else ("no (killed)" if row["killed_at_cap"] else "yes")
        acc = row.get("val_accuracy")
        spread = f" ({row['speed_min']:,.0f}-{row['speed_max']:,.0f})" if "speed_min" in row else ""
        print(f"| {row['row']} | {count:,} | {count * decoded / 2**20:,.0f} MB | {count * decoded * 4 / 2**20:,.0f} MB "
              f"| {row['peak_prepare_mb']:,.0f} / {row['peak_train_mb']:,.0f} MB | {under} | "
              f"{row.get('prepare_s', float('nan')):.1f} | {speed or float('nan'):,.0f}{spread} | {ratio} | "
              f"{acc if acc is None else round(acc, 3)} |")  # fmt: skip
        if "error" in row:
            print(f"  {row['row']}: {row['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
