"""The operating commands of `trainflow`: serve deployments, send the dataset event, start the UIs,
compare runs. Each parses its arguments here and hands over to the module that does the work.

    trainflow serve CONFIG [CONFIG ...] [--cron CRON] [--timezone TZ] [--flow FLOW] [--set ...]
    trainflow tune-worker CONFIG [--set ...] [--wait S]
    trainflow emit-dataset-updated URI
    trainflow ui [--tracking-uri URI] [--artifacts DIR] [--prefect-database URL] [--prefect-port N] [--mlflow-port N]
    trainflow compare [--experiment NAME] [--metric M] [--last N] [--plot FILE] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_commands(commands: Any, overrides: dict[str, Any]) -> None:
    """Register the operating commands on the `trainflow` parser's subcommands."""
    serve = commands.add_parser(
        "serve", help="serve deployments of CONFIGs from this process: a schedule, the dataset event, one run at a time"
    )
    serve.add_argument("configs", type=Path, nargs="+", metavar="CONFIG")
    serve.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (nightly at 03:00); default: no schedule')
    serve.add_argument("--timezone", default="UTC", help="time zone of --cron (default: UTC)")
    serve.add_argument(
        "--flow",
        choices=["pipeline", "tune", "train", "compress-publish"],
        default="pipeline",
        help="which flow each deployment runs (default: the whole pipeline)",
    )
    serve.add_argument("--no-trigger", action="store_true", help="do not start runs on trainflow.dataset.updated")
    serve.add_argument("--out", type=Path, default=Path("out"), help="folder for each run's summary and report")
    serve.add_argument("--set", **overrides)
    serve.set_defaults(command=_serve)

    worker = commands.add_parser(
        "tune-worker", help="on another machine: join the hyperparameter search node 0's `trainflow run` started"
    )
    worker.add_argument("config", type=Path)
    worker.add_argument("--set", **overrides)
    worker.add_argument("--wait", type=float, default=600.0,
                        help="seconds to wait for node 0's search to start (default: 600)")  # fmt: skip
    worker.set_defaults(command=_tune_worker)

    emit = commands.add_parser(
        "emit-dataset-updated", help="tell served deployments that a dataset changed: each config using it re-runs"
    )
    emit.add_argument("uri", help="the dataset as configs name it: a file path, s3:// URI or sklearn:NAME")
    emit.set_defaults(command=_emit)

    ui = commands.add_parser("ui", help="start the Prefect and MLflow UIs on loopback; Ctrl-C stops both")
    ui.add_argument(
        "--tracking-uri",
        help="MLflow backend store: sqlite:///FILE or a database URL such as "
        "postgresql://user:${PG_PASSWORD}@host/mlflow (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    ui.add_argument(
        "--artifacts",
        help="where the MLflow server keeps the artifacts of experiments it creates: a "
        "folder or s3:// URI (default: mlruns/ beside an SQLite database, else ./mlartifacts)",
    )
    ui.add_argument(
        "--prefect-database",
        help="the Prefect server's database, e.g. postgresql://user:${PG_PASSWORD}"
        "@host/prefect (default: SQLite in PREFECT_HOME)",
    )
    ui.add_argument("--prefect-port", type=int, default=0, help="default: a free port")
    ui.add_argument("--mlflow-port", type=int, default=0, help="default: a free port")
    ui.set_defaults(command=_ui)

    compare = commands.add_parser("compare", help="compare recent pipeline runs recorded in MLflow")
    compare.add_argument("--experiment", help="MLflow experiment (default: the one with the latest pipeline run)")
    compare.add_argument(
        "--metric", help="the metric to rank by (default: test accuracy, or test perplexity for language models)"
    )
    compare.add_argument("--last", type=int, default=10, help="how many recent runs (default: 10)")
    compare.add_argument("--plot", type=Path, help="also write a PNG plot of the metric per run here")
    compare.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    compare.set_defaults(command=_compare)


def default_tracking_uri(given: str | None) -> str:
    """The flag, else MLFLOW_TRACKING_URI, else the default; a password in it hidden (`core.config.secrets`)."""
    from trainflow.core.config.secrets import hide_passwords

    return hide_passwords(given or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def _serve(args: argparse.Namespace) -> int:
    from trainflow.deployments.definitions import ServeOptions
    from trainflow.deployments.serve import serve_configs

    options = ServeOptions(flow=args.flow, overrides=list(args.overrides), cron=args.cron, timezone=args.timezone,
                           trigger=not args.no_trigger, out_dir=args.out)  # fmt: skip
    return serve_configs(args.configs, options)


def _tune_worker(args: argparse.Namespace) -> int:
    """Run trials of node 0's study until it holds its budget: the same config and --set values, the same study
    database (`tune.hpo.storage`) and MLflow; the data is prepared again here unless the store is shared."""
    import logging

    from trainflow.core.errors import ConfigError
    from trainflow.core.preflight import checked_config

    config = checked_config(args.config, args.overrides)  # model.init_from's alias resolved as node 0 resolved it
    hpo = config.tune.hpo
    if not hpo.enabled or hpo.storage is None:
        raise ConfigError("tune.hpo.storage: a tune-worker joins a search in a database every machine reaches; "
                          "enable tune.hpo and set tune.hpo.storage (postgresql://...) on every machine")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import optuna  # everything a trial needs is loaded before waiting: the first trial starts as the study does

    from trainflow.core.models.warm_start import reused_preprocessing
    from trainflow.core.prepare_data import prepare_data
    from trainflow.core.storage.store import open_store, resolved
    from trainflow.core.tracking.backend import tracking_uri
    from trainflow.core.tuning.hpo_worker import run_worker, worker_name
    from trainflow.core.tuning.join import join_key, wait_for_study, worker_job
    from trainflow.core.tuning.study import rdb_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = rdb_storage(hpo.storage, hpo)
    print(f"tune-worker: waiting for node 0's search (up to {args.wait:g} s)", flush=True)
    study = optuna.load_study(study_name=wait_for_study(storage, join_key(config), args.wait), storage=storage)
    store = open_store(resolved(config.store))
    job = worker_job(study, hpo.storage, store, tracking_uri(config.tracking.uri),
                     prepare=lambda: prepare_data(config.data, config.seed, store, config.store,
                                                  reused_preprocessing(config)))  # fmt: skip
    print(f"tune-worker: joined study {study.study_name}", flush=True)
    run_worker(job, storage)
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == worker_name()]
    print(f"tune-worker: study {study.study_name} holds its budget; {len(mine)} trial(s) ran here", flush=True)
    return 0


def _emit(args: argparse.Namespace) -> int:
    from trainflow.deployments.events import emit_dataset_updated

    event = emit_dataset_updated(args.uri)
    print(f"sent {event.event} for {args.uri} (event {event.id})")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from trainflow.core.config.secrets import hide_passwords
    from trainflow.deployments.servers import run_ui

    prefect_database = hide_passwords(args.prefect_database) if args.prefect_database else None
    return run_ui(default_tracking_uri(args.tracking_uri), args.prefect_port, args.mlflow_port,
                  artifacts=args.artifacts, prefect_database=prefect_database)  # fmt: skip


def _compare(args: argparse.Namespace) -> int:
    from trainflow.core.report.compare import compare_runs, plot_comparison

    comparison = compare_runs(default_tracking_uri(args.tracking_uri), args.experiment, args.metric, args.last)
    print(comparison.text())
    if args.plot:
        plot_comparison(comparison, args.plot)
        print(f"\nplot: {args.plot}")
    return 0
