"""What a benchmark ran on, printed beside its figures: this machine is shared and noisy."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1-minute load average: on a shared machine, how much else was running."""
    return f"{os.getloadavg()[0]:.2f}"
