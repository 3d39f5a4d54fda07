"""The errors a user can cause and fix: each message is one line naming the field or file.

The CLI prints these without a traceback and exits with code 2; any other exception is a bug
and keeps its traceback.
"""


class TrainflowError(Exception):
    """Base of every user-facing error."""


class ConfigError(TrainflowError):
    """The config (file or `--set` override) is invalid; one line per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(TrainflowError):
    """A data source is missing, unreadable or unusable."""


class StoreError(TrainflowError):
    """The artifact store cannot be written or an artifact in it is missing."""


class TrackingError(TrainflowError):
    """The MLflow tracking backend cannot be reached."""


class TrainingError(TrainflowError):
    """Training cannot go on: diverged, or a checkpoint that must be resumed cannot be loaded."""


class StageNotCachedError(TrainflowError):
    """A flow that only re-uses a stage's cached result (compress-publish) found none for its inputs."""


class StageTimeoutError(TrainflowError):
    """A stage ran longer than its `timeouts.<stage>` limit."""
