"""The Prefect tasks, one per stage: thin wrappers that open the stage's MLflow child run and call core.

A task imports its stage's algorithm inside its body, not at the top: a cached stage then never loads the
libraries only its work needs (ONNX and ONNX Runtime, scikit-learn, Optuna; about 3 s of a fully cached
run's start-up on 2 cores), and `tests/test_layout.py` keeps it so.
"""
