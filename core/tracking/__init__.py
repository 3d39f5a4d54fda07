"""MLflow tracking, one path to it: where MLflow is (`backend.py`), the runs every stage, trial and training opens
and ends the same way (`runs.py`), and how a pipeline run presents itself in MLflow's UI (`run_meta.py`)."""
