"""Where the pipeline keeps and records things: the artifact store (`store.py`), MLflow tracking by run
id (`tracking.py`) and the code version that keys the stage cache (`version.py`)."""
