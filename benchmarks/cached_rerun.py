"""A fully cached re-run of `make demo` against Prefect's own floor. Goal: <= 1.3x the floor.

After one untimed `trainflow run configs/digits.yaml` fills the stage cache, rounds alternate (ABBA) between
    cached   `trainflow run configs/digits.yaml` again: every stage `Cached`, each still a Prefect task run and
             an MLflow child run pointing at the cached record, a new MLflow parent run, summary.json;
    floor    `benchmarks/prefect_floor.py`: a trivial 7-task flow on the temporary API server;
    floor*   the same flow leaving through os._exit like `trainflow` (no interpreter teardown), shown beside.
Each is a fresh process timed from start to exit with the same environment (no PREFECT_API_URL, so each boots
Prefect's temporary server; a private PREFECT_HOME; analytics off). Every cached run is checked to have
reused all seven stages.

    .venv/bin/python benchmarks/cached_rerun.py                # 6 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loops import bootstrap_interval, speed_ratio
from machine import cpu_model, load_average

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="cached_rerun-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        env |= {"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PYTHONPATH": str(REPO)}  # fmt: skip
        trainflow = [sys.executable, "-m", "trainflow", "run", str(REPO / "configs" / "digits.yaml"), "--out", "out"]
        floor = [sys.executable, str(REPO / "benchmarks" / "prefect_floor.py")]
        started = time.perf_counter()
        _run(trainflow, root, env)
        print(f"first run (fills the cache, untimed): {time.perf_counter() - started:.1f} s")
        times: dict[str, list[float]] = {"cached": [], "floor": [], "floor*": []}
        commands = {"cached": trainflow, "floor": floor, "floor*": [*floor, "--fast-exit"]}
        for i in range(args.rounds):
            order = list(commands) if i % 2 == 0 else list(commands)[::-1]
            for name in order:
                times[name].append(_run(commands[name], root, env))
                if name == "cached":
                    stages = json.loads((root / "out" / "summary.json").read_text())["stages"]
                    assert all(s["cached"] for s in stages.values()) and len(stages) == 7, stages
            print(f"  round {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in commands), flush=True)
    print(f"load average at the end: {load_average()}")
    cached, plain, fast = times["cached"], times["floor"], times["floor*"]
    ratio = 1 / speed_ratio(cached, plain)  # median cached / median floor
    low, high = (1 / x for x in reversed(bootstrap_interval(cached, plain)))
    verdict = "met" if ratio <= GOAL else "**missed**"
    print("\n| command | median s | (min-max) |\n| --- | ---: | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")
    print(f"\ncached / floor: **{ratio:.2f}x** (95% interval {low:.2f}-{high:.2f}); goal <= {GOAL}x: {verdict}; "
          f"cached / floor*: {statistics.median(cached) / statistics.median(fast):.2f}x")  # fmt: skip


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


if __name__ == "__main__":
    main()
