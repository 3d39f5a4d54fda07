"""Processes for the `trainflow ui` tests: the environment a CLI subprocess gets, and which processes live."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trainflow.deployments.servers import group_members

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(Path(sys.executable))


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Prefect API or MLflow server it may point at (the session's
    test server), with a PREFECT_HOME of its own under `tmp` and the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env |= {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env | extra


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), by psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        return _descendants_from_proc(pid)
    return {child.pid for child in psutil.Process(pid).children(recursive=True)}


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies, which hold no resources, do not count)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.add(pid)
    return running


def groups_alive(groups: set[int]) -> dict[int, list[int]]:
    """The live members of each process group that still has any."""
    return {group: members for group in groups if (members := group_members(group))}


def _descendants_from_proc(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found
