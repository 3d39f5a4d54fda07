"""How trainflow's flows run without anyone typing `trainflow run`: Prefect deployments on a schedule or
on the dataset event (`definitions.py`), served from one process (`serve.py`, `trainflow serve`) or
deployed to a work pool (`prefect.yaml`, `prefect deploy`); the event itself (`events.py`); and the
local Prefect and MLflow servers behind `trainflow ui` (`servers.py`)."""
