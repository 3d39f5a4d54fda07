"""`trainflow run`'s start-up (flows/startup.py): what it pays while Prefect's temporary server boots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WARM_UP_TWICE = """
import json, sys
from trainflow.core.config import config_from_dict
from trainflow.flows.startup import warm_up

config = config_from_dict({"data": {"source": "sklearn", "name": "wine"}, "tracking": {"uri": sys.argv[1]}})
loaded = []
for booting in (False, True):
    warm_up(config, "wine", lambda: booting)
    loaded.append("torch._dynamo" in sys.modules)
print(json.dumps(loaded))
"""


def test_warm_up_imports_torch_dynamo_only_while_the_server_still_boots(tmp_path: Path) -> None:
    """Where the import overlaps nothing (the server answers, or there is none to boot) it is left to the first
    stage that trains, so a fully cached run never pays it; the tracking database is opened either way."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", WARM_UP_TWICE, uri], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, True]
    assert (tmp_path / "mlflow.db").is_file()
