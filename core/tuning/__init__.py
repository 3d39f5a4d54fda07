"""Tuning before training: the LR finder (`lr_finder.py`), the HPO worker and its Optuna parts
(`hpo_worker.py`, `study.py`), and how their results reach the training config (`apply.py`)."""
