"""What a model needs to know about the data (`DataSpec`) and the metrics its task is evaluated by.
(What a data config will produce, before any data is read: `core.config.data.planned_task`.)

Free of torch and scikit-learn: `trainflow run` checks a config with it before anything heavy loads."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from trainflow.core.errors import ConfigError

Task = Literal["classification", "language_modeling"]
IMAGE_SHAPES = {"digits": (1, 8, 8)}  # bundled image sets, as (C, H, W)
EVAL_METRICS: dict[Task, tuple[str, ...]] = {  # what core.training.metrics.pass_metrics reports per task
    "classification": ("loss", "accuracy"),
    "language_modeling": ("loss", "perplexity"),
}
TEST_METRICS: dict[Task, dict[str, bool]] = {  # what the evaluate stage reports per task; True: higher is better
    "classification": {
        "accuracy": True,
        "precision_macro": True,
        "recall_macro": True,
        "f1_macro": True,
        "loss": False,
    },
    "language_modeling": {"loss": False, "perplexity": False, "bits_per_byte": False},
}


class DataSpec(BaseModel):
    """The task and the shape of one sample."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task: Task
    input_shape: tuple[int, ...]  # one sample: (features,), (C, H, W) or (seq_len,)
    n_classes: int  # classes, or the vocabulary size for language modelling
    class_names: list[str] = []
    # images: per-channel mean and std of the [0, 1] pixels the inputs were normalised with ((p - mean) / std);
    # empty when images are scaled otherwise (digits: per pixel). Colour augmentation works in pixel space.
    pixel_mean: list[float] = []
    pixel_std: list[float] = []
    numeric_features: int = 0  # tables: leading columns that are scaled numbers (one-hot columns follow)

    @property
    def seq_len(self) -> int | None:
        """Context length of language-modelling windows; None for classification."""
        return self.input_shape[0] if self.task == "language_modeling" else None


def metric_names(task: Task, prefix: str = "val") -> list[str]:
    """The metrics an evaluation pass reports for `task` (`val/loss`, `val/accuracy`, ...)."""
    return [f"{prefix}/{name}" for name in EVAL_METRICS[task]]


def check_metric(metric: str, task: Task, field: str) -> None:
    """A ConfigError naming `field` unless `metric` is one the validation pass produces for `task`."""
    available = metric_names(task)
    if metric not in available:
        raise ConfigError(
            f"{field}: '{metric}' is not an evaluation metric of {task}; available: {', '.join(available)}"
        )


def check_test_metric(metric: str, task: Task, field: str) -> bool:
    """Whether higher is better for `metric`; a ConfigError naming `field` unless the evaluate stage reports it
    for `task`."""
    available = TEST_METRICS[task]
    if metric not in available:
        raise ConfigError(f"{field}: '{metric}' is not a test metric of {task}; available: {', '.join(available)}")
    return available[metric]
