"""The operating commands of `trainflow`: serve deployments, send the dataset event, start the UIs,
compare runs. Each parses its arguments here and hands over to the module that does the work.

    trainflow serve CONFIG [CONFIG ...] [--cron CRON] [--timezone TZ] [--flow FLOW] [--set ...]
    trainflow emit-dataset-updated URI
    trainflow ui [--tracking-uri URI] [--prefect-port N] [--mlflow-port N]
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

    emit = commands.add_parser(
        "emit-dataset-updated", help="tell served deployments that a dataset changed: each config using it re-runs"
    )
    emit.add_argument("uri", help="the dataset as configs name it: a file path, s3:// URI or sklearn:NAME")
    emit.set_defaults(command=_emit)

    ui = commands.add_parser("ui", help="start the Prefect and MLflow UIs on loopback; Ctrl-C stops both")
    ui.add_argument("--tracking-uri", help="MLflow backend store (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
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
    return given or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _serve(args: argparse.Namespace) -> int:
    from trainflow.deployments.definitions import ServeOptions
    from trainflow.deployments.serve import serve_configs

    options = ServeOptions(flow=args.flow, overrides=list(args.overrides), cron=args.cron, timezone=args.timezone,
                           trigger=not args.no_trigger, out_dir=args.out)  # fmt: skip
    return serve_configs(args.configs, options)


def _emit(args: argparse.Namespace) -> int:
    from trainflow.deployments.events import emit_dataset_updated

    event = emit_dataset_updated(args.uri)
    print(f"sent {event.event} for {args.uri} (event {event.id})")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from trainflow.deployments.servers import run_ui

    return run_ui(default_tracking_uri(args.tracking_uri), args.prefect_port, args.mlflow_port)


def _compare(args: argparse.Namespace) -> int:
    from trainflow.core.report.compare import compare_runs, plot_comparison

    comparison = compare_runs(default_tracking_uri(args.tracking_uri), args.experiment, args.metric, args.last)
    print(comparison.text())
    if args.plot:
        plot_comparison(comparison, args.plot)
        print(f"\nplot: {args.plot}")
    return 0
