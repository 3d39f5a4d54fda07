"""Checks run before the first stage, so a bad setup fails in a second and writes nothing, instead of
failing after a tracking database, a parent run and store folders exist (or after training).

`trainflow run` calls this before Prefect's server boots and before torch or scikit-learn load, so each
check imports what it needs where it runs: a digits config is checked without either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from trainflow.core.config import (
    Config,
    ImageFolderDataConfig,
    SklearnDataConfig,
    SyntheticDataConfig,
    TableDataConfig,
    TextDataConfig,
    TextFolderDataConfig,
    load_config,
)
from trainflow.core.config.augment import augment_problem
from trainflow.core.config.data import planned_rank, planned_task
from trainflow.core.config.secrets import carries_password, reference_problems
from trainflow.core.data.spec import DataSpec, check_metric
from trainflow.core.errors import ConfigError, DataError
from trainflow.core.models import check_model_fits_data
from trainflow.core.storage.databases import check_database, is_database
from trainflow.core.storage.store import open_store
from trainflow.core.tracking.backend import check_reachable, tracking_uri

_HANDED: dict[tuple[str, str, tuple[str, ...]], Config] = {}  # checked by `trainflow run`, for the flow it starts


def check_and_hand_over(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Parse and preflight the config at `path` for a run this process starts next (`trainflow run`, before
    Prefect boots): `checked_config` takes it from here instead of checking it again."""
    config = _checked(path, overrides)
    _HANDED[_key(path, overrides)] = config
    return config


def checked_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run uses, parsed and preflighted once per run: the one `check_and_hand_over` checked in this
    process if the file is unchanged since, else checked now (a served deployment's run)."""
    return _HANDED.pop(_key(path, overrides), None) or _checked(path, overrides)


def _checked(path: str | Path, overrides: Sequence[str]) -> Config:
    config = load_config(path, list(overrides))
    if config.model.init_from is not None:  # models:/<name>@<alias> -> the version it names now, once per run
        from trainflow.core.models.warm_start import resolve_alias

        config = resolve_alias(config)
    preflight(config)
    return config


def _key(path: str | Path, overrides: Sequence[str]) -> tuple[str, str, tuple[str, ...]]:
    file = Path(path).resolve()
    content = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else ""
    return str(file), content, tuple(overrides)


def preflight(config: Config) -> None:
    """Model, device, precision and monitored metrics fit the data and this machine; data readable and
    usable; store writable; tracking reachable.

    Table files are read in full and checked for every content problem the prepare_data stage would
    meet (`core.data.preprocess.check_table`); the read is cached, so the stage does not pay it twice.

    Raises:
        TrainflowError: the first problem found, naming the field or file.
    """
    problems = reference_problems(config.model_dump(mode="json")) + _credential_problems(config)
    if problems:
        raise ConfigError(problems)
    task = planned_task(config.data)
    check_model_fits_data(config.model, task, planned_rank(config.data))
    augment = augment_problem(config.train.augment, task, planned_rank(config.data))
    if augment:
        raise ConfigError(augment)
    check_metric(config.train.early_stopping.monitor, task, "train.early_stopping.monitor")
    if config.tune.hpo.enabled:
        check_metric(config.tune.hpo.metric, task, "tune.hpo.metric")
    if config.train.device != "auto" or config.train.precision == "fp16":  # asks torch what this machine has
        from trainflow.core.training.precision import check_precision, resolve_device

        check_precision(resolve_device(config.train.device), config.train.precision)
    if config.train.distributed.enabled:  # devices, backend, rendezvous host, strategy: before any stage
        from trainflow.core.training.distributed import check_distributed

        check_distributed(config.train, config.store.uri)
    if config.compress.enabled and _compress_needs_model(config):
        from trainflow.core.compression.plan import check_compress

        check_compress(config.compress, config.model, _nominal_spec(config))
    if config.tune.hpo.enabled and config.tune.hpo.storage is not None and is_database(config.tune.hpo.storage):
        check_database(config.tune.hpo.storage, "tune.hpo.storage")
    check_reachable(tracking_uri(config.tracking.uri))
    _check_finetune(config)
    _check_data(config)
    open_store(config.store).check_writable()


def _credential_problems(config: Config) -> list[str]:
    """A credential in tracking.artifact_location would be stored in MLflow's database (it keeps every
    experiment's location verbatim), so it is refused: the artifact store's own environment supplies it."""
    location = config.tracking.artifact_location
    if location is not None and carries_password(location):
        return ["tracking.artifact_location: carries a password, which MLflow would store with the experiment; "
                "give the artifact store's credentials through its environment (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY for s3://, MLFLOW_TRACKING_USERNAME/PASSWORD for a server)"]  # fmt: skip
    return []


def _check_finetune(config: Config) -> None:
    """model.init_from exists and fits the model the config builds, LoRA's extra is installed and its patterns name
    modules, train.finetune's patterns name modules, and FSDP is not asked to shard frozen parameters."""
    model, finetune = config.model, config.train.finetune
    if model.init_from is None and model.lora is None and not finetune.active:
        return
    fsdp = config.train.distributed.enabled and config.train.distributed.strategy == "fsdp"
    if fsdp and (model.lora is not None or finetune.freeze):
        raise ConfigError("train.distributed.strategy: fsdp does not shard frozen parameters here (model.lora, "
                          "train.finetune.freeze); use strategy: ddp")  # fmt: skip
    if model.lora is not None:
        from trainflow.core.models.lora import check_peft

        check_peft()
    from trainflow.core.models import build_model
    from trainflow.core.models.warm_start import check_fits, warm_start_of

    warm = warm_start_of(config)
    built = build_model(model, _nominal_spec(config))
    if warm is not None and not isinstance(config.data, TableDataConfig):  # a table's width is known once prepared
        check_fits(model, built, warm, config.store)
    if finetune.active:
        from trainflow.core.training.finetune import Finetuning, lr_scales

        Finetuning(finetune, built)
        lr_scales(built, finetune)
    if model.lora is not None:
        from trainflow.core.models.lora import apply_lora

        apply_lora(built, model.lora)


def _compress_needs_model(config: Config) -> bool:
    """An explicit student or static quantization is checked on built models (torch loads); the defaults are not."""
    return config.compress.distillation.student is not None or config.compress.quantization.onnx_int8 == "static"


def _nominal_spec(config: Config) -> DataSpec:
    """The prepared data's spec as far as the config tells before any data is read: exact for the bundled
    sets and text, a stand-in width for tables (the compress stage checks again on the real spec)."""
    data = config.data
    if isinstance(data, TextDataConfig):
        return DataSpec(task="language_modeling", input_shape=(data.seq_len,), n_classes=256)
    if isinstance(data, SklearnDataConfig):
        shape, classes = SKLEARN_SHAPES[data.name]
        return DataSpec(task="classification", input_shape=shape, n_classes=classes)
    if isinstance(data, SyntheticDataConfig):
        return DataSpec(task="classification", input_shape=(data.n_features,), n_classes=data.n_classes)
    if isinstance(data, TextFolderDataConfig):
        return DataSpec(task="language_modeling", input_shape=(data.seq_len,), n_classes=256)
    if isinstance(data, ImageFolderDataConfig):
        from trainflow.core.data.folders import listing_of

        shape = (3 if data.color == "rgb" else 1, data.image_size, data.image_size)
        return DataSpec(task="classification", input_shape=shape, n_classes=len(listing_of(data).classes))
    return DataSpec(task="classification", input_shape=(16,), n_classes=2)


SKLEARN_SHAPES = {"digits": ((1, 8, 8), 10), "wine": ((13,), 3), "breast_cancer": ((30,), 2), "iris": ((4,), 3)}


def _check_data(config: Config) -> None:
    data = config.data
    if isinstance(data, TableDataConfig):
        from trainflow.core.data.preprocess import check_table
        from trainflow.core.data.sources import RawTable, load_source

        raw = load_source(data, config.seed, config.store)
        assert isinstance(raw, RawTable)
        check_table(raw, data.val_fraction, data.test_fraction, config.seed)
    elif isinstance(data, TextDataConfig):
        from trainflow.core.data.sources import data_file, load_text

        if data.path is not None:  # an s3:// object is fetched (once) here: it exists and is readable
            size = data_file(data.path, config.store).stat().st_size
        else:
            size = len(load_text(None).data)
        smallest = int(size * min(data.val_fraction, data.test_fraction))
        if smallest < data.seq_len + 1:
            raise DataError(
                f"{data.path or 'pydoc_data.topics'}: data.seq_len={data.seq_len} is longer than the smallest split "
                f"({smallest} of {size} bytes); lower data.seq_len or use a larger text"
            )
    elif isinstance(data, SyntheticDataConfig):
        from trainflow.core.data.sources import check_synthetic

        check_synthetic(data)
    elif isinstance(data, ImageFolderDataConfig):  # every file decoded (once, cached in the store): bad ones now
        from trainflow.core.data.images import decoded_images
        from trainflow.core.data.preprocess import split_rows

        raw = decoded_images(data, open_store(config.store))
        split_rows(raw.target, raw.name, data.val_fraction, data.test_fraction, config.seed, raw.classes)
    elif isinstance(data, TextFolderDataConfig):
        from trainflow.core.data.text_files import load_text_files, split_text_files

        split_text_files(load_text_files(data), data.val_fraction, data.test_fraction, data.seq_len, config.seed)
