"""Serving: the raw-input MLflow model (`trainflow_serving`, standalone) and its logging (`mlflow_model`)."""
