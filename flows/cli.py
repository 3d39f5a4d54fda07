"""The `trainflow` command.

    trainflow validate CONFIG [--set section.key=value ...]
    trainflow run CONFIG [--set section.key=value ...] [--out DIR] [--flow pipeline|tune|train|compress-publish]
    trainflow verify MANIFEST [--config CONFIG]
    trainflow train CONFIG --node-rank N [--set section.key=value ...]
    trainflow serve | emit-dataset-updated | ui | compare ...   (flows/operate.py)

User errors (bad config, data, store) print one line and exit 2; nothing is written before the
config has passed validation. Prefect and MLflow are imported only once it has.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from trainflow.core.config.secrets import hide_passwords
from trainflow.core.errors import TrainflowError
from trainflow.core.tracking.backend import quiet_mlflow
from trainflow.flows.operate import add_commands as add_operating_commands

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_mlflow()  # before MLflow is imported: serve's flow runs and ui's servers inherit it
    try:
        return args.command(args)
    except TrainflowError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _validate(args: argparse.Namespace) -> int:
    from trainflow.core.config import load_config

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: valid (config sha256 {config.sha256()[:12]})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from trainflow.core.preflight import check_and_hand_over

    # parsed and preflighted once, before anything is imported or written; the flow takes this config
    config = check_and_hand_over(args.config, args.overrides)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "trainflow")
    # Prefect's temporary server gets 20 s to boot by default: too little on 2 busy cores (a search worker
    # importing torch beside it made it time out in the tests)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from trainflow.flows.startup import prefect_api_booting, warm_up  # imports prefect, which configures logging

    with prefect_api_booting() as booting:
        from trainflow.flows.pipeline import FLOWS

        warm_up(config, Path(args.config).stem, booting)
    _quiet_user_errors()

    summary = FLOWS[args.flow](str(args.config), list(args.overrides), str(args.out))
    _print_summary(summary, Path(args.out))
    return 0


def _join_train(args: argparse.Namespace) -> int:
    """Another machine of a multi-node run: its ranks join node 0's train stage (`trainflow run` there)."""
    from trainflow.core.config import load_config
    from trainflow.core.errors import ConfigError

    config = load_config(args.config, [*args.overrides, f"train.distributed.node_rank={args.node_rank}"])
    if args.node_rank == 0 or config.train.distributed.nnodes < 2:
        raise ConfigError(
            "--node-rank: node 0 runs the pipeline (trainflow run CONFIG); other machines join with "
            f"--node-rank 1..nnodes-1 (train.distributed.nnodes is {config.train.distributed.nnodes})"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from trainflow.core.training.launch import join_training

    join_training(config.train)
    print(f"node {args.node_rank}: training done (node 0 records the results)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from trainflow.core.publish import verify_manifest
    from trainflow.core.storage.store import open_store

    if str(args.manifest).startswith("s3://"):  # the bucket's settings (endpoint, region) from a config's store
        from trainflow.core.config import StoreConfig, load_config

        settings = load_config(args.config).store if args.config else StoreConfig(uri="s3://placeholder")
        bucket = str(args.manifest)[len("s3://") :].split("/", 1)[0]
        store = open_store(settings.model_copy(update={"uri": f"s3://{bucket}"}))
        if not store.exists(args.manifest):
            print(f"error: {args.manifest}: manifest not found", file=sys.stderr)
            return EXIT_USER_ERROR
        problems = verify_manifest(args.manifest, store)
    else:
        path = Path(args.manifest).resolve()
        if not path.is_file():
            print(f"error: {args.manifest}: manifest not found", file=sys.stderr)
            return EXIT_USER_ERROR
        problems = verify_manifest(path.as_uri(), open_store(path.parent))
    for problem in problems:
        print(f"{args.manifest}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.manifest}: every file matches its sha256 and size")
    return 1 if problems else 0


def _quiet_user_errors() -> None:
    """Prefect logs a failing run's traceback; for our user errors the one-line message says it all."""

    class OneLineUserErrors(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], TrainflowError):
                record.msg, record.args, record.exc_info, record.exc_text = str(record.exc_info[1]), (), None, None
            return True

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            handler.addFilter(OneLineUserErrors())
    for name in ("trainflow",):
        logging.getLogger(name).setLevel(logging.INFO)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    """The run's summary (core/report/summary.py), then where its files, runs and UIs are."""
    from trainflow.core.config.secrets import mask_secrets
    from trainflow.core.report.summary import summarize

    tracking, tool = summary["mlflow_tracking_uri"], _tool("trainflow")
    where = [f"summary:  {out / 'summary.json'}"]
    if (out / "report.html").is_file():
        where.append(f"report:   {out / 'report.html'} (and report.md)")
    where += [f"mlflow:   run {summary['mlflow_run_id']} in {tracking}",
              f"prefect:  flow run {summary['prefect_flow_run_id']}"]  # fmt: skip
    if tracking.startswith("sqlite:"):
        where.append(f"UIs:      {tool} ui --tracking-uri {tracking}   (Prefect and MLflow, Ctrl-C stops both)")
    where.append(f"compare:  {tool} compare --experiment {summary['mlflow_experiment_name']}")
    print(f"\n{summarize(summary).text()}\n\n" + mask_secrets("\n".join(where)))


def _tool(name: str) -> str:
    """The command beside this Python (e.g. .venv/bin/mlflow), as a user can type it from here."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainflow", description="Tune, train, evaluate and publish a PyTorch model from one YAML config."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    # A URL password in a --set is hidden as it is parsed (`core.config.secrets`): the flow run's `overrides`
    # parameter, the run's name and every log carry its reference only.
    overrides = {"dest": "overrides", "action": "append", "default": [], "metavar": "SECTION.KEY=VALUE",
                 "type": hide_passwords,
                 "help": "override one config value (repeatable), e.g. --set train.batch_size=32"}  # fmt: skip

    validate = commands.add_parser("validate", help="check a config file and exit")
    validate.add_argument("config", type=Path)
    validate.add_argument("--set", **overrides)
    validate.set_defaults(command=_validate)

    run = commands.add_parser("run", help="run the pipeline; re-running re-uses every unchanged stage")
    run.add_argument("config", type=Path)
    run.add_argument("--set", **overrides)
    run.add_argument("--out", type=Path, default=Path("out"), help="folder for summary.json (default: out)")
    run.add_argument("--flow", choices=["pipeline", "tune", "train", "compress-publish"], default="pipeline",
                     help="the whole pipeline (default), or a part of it on the same cache")  # fmt: skip
    run.set_defaults(command=_run)

    train = commands.add_parser("train", help="on machine N > 0 of a multi-node run: join node 0's train stage")
    train.add_argument("config", type=Path)
    train.add_argument("--node-rank", type=int, required=True, help="this machine's index, 1 .. nnodes-1")
    train.add_argument("--set", **overrides)
    train.set_defaults(command=_join_train)

    verify = commands.add_parser("verify", help="re-hash a published model folder against its manifest.json")
    verify.add_argument("manifest", help="a manifest.json path, or its s3:// URI")
    verify.add_argument("--config", help="for an s3:// manifest: the config whose store section reaches the bucket")
    verify.set_defaults(command=_verify)
    add_operating_commands(commands, overrides)
    return parser


def _entry() -> None:
    code = main()
    # Tearing down an interpreter that holds torch, scikit-learn, MLflow and Prefect takes about 1.4 s on
    # 2 cores and serves nobody. Do what Python's shutdown does before that teardown: join the threads and
    # run their exit hooks (Prefect drains its log and event workers there), run the atexit handlers
    # (Prefect stops its temporary server), flush; then leave.
    shutdown_threads = getattr(threading, "_shutdown", None)  # CPython's own step; elsewhere exit the usual way
    if shutdown_threads is None:
        sys.exit(code)
    shutdown_threads()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _entry()
