"""Compression: every variant of the compress stage against fp32 eager PyTorch, on three workloads, 3 seeds.

Workloads: digits/cnn (the demo's CNN, channels [32, 64]), table/mlp (a 20,000-row synthetic table, 32 features,
4 classes, MLP [256, 256]) and text/gpt (the bundled pydoc text, 4 layers x 128 wide, 128-byte windows).
Per workload and seed, in one process: prepare_data, train (fixed LR, no tuning stages), then the compress stage
(`core.compress.compress`) with its defaults plus three extra combinations (pruned_structured+onnx,
distilled+onnx, pruned_structured+onnx_int8) and a distillation student at width 0.4 (at most a quarter of the
teacher's parameters). Inside the stage every variant is measured the same way: test metrics, batch-1 latency
(1 intra-op thread for torch and ONNX Runtime alike, 600 timed calls in 10 rounds, variants alternated in each
round), throughput at batch 256, file size.

Goals (issue 12), both classifiers: the recommended variant >= 3.5x smaller and >= 2x faster at batch 1 than fp32
eager PyTorch with <= 1 point accuracy drop (its speed-up over ONNX Runtime fp32 shown beside it); 50%
unstructured sparsity with <= 1 point drop; structured pruning of half the channels >= 1.5x faster at batch 1
after fine-tuning with <= 1 point drop; a distilled student with <= 1/4 of the teacher's parameters keeping >= 98%
of its accuracy. GPT: int8 perplexity within 2%. "Smaller than fp32" compares with the smaller fp32 file: the
torch.export program (.pt2) or the ONNX fp32 file, so no format overhead flatters the ratio. Figures are means
over seeds, with the per-seed range.

    cd benchmarks
    ../.venv/bin/python compression.py                          # 3 workloads x 3 seeds: ~20 min on 2 idle cores
    ../.venv/bin/python compression.py --workload digits --seeds 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

from trainflow.core.compress import compress
from trainflow.core.config import config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import CompressResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.spec import TrainingSpec

COMPRESS = {
    "distillation": {"width": 0.4},
    "combinations": ["distilled+onnx_int8", "pruned_structured+onnx_int8", "pruned_structured+onnx", "distilled+onnx"],
    "measure": {"latency_calls": 600, "rounds": 10, "warmup": 50, "serving_batch": 256, "throughput_calls": 10},
}
TRAIN = {"progress_bar": False, "early_stopping": {"patience": 10}}
WORKLOADS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"source": "sklearn", "name": "digits"},
        "model": {"name": "cnn", "channels": [32, 64]},
        "optim": {"lr": 0.003},
        "train": TRAIN | {"max_epochs": 30, "batch_size": 64},
        "compress": COMPRESS,
    },
    "table": {
        "data": {"source": "synthetic", "n_samples": 20000, "n_features": 32, "n_classes": 4, "class_sep": 1.5},
        "model": {"name": "mlp", "hidden_sizes": [256, 256], "dropout": 0.1},
        "optim": {"lr": 0.001},
        "train": TRAIN | {"max_epochs": 20, "batch_size": 128},
        "compress": COMPRESS,
    },
    "text": {
        "data": {"source": "text", "seq_len": 128},
        "model": {"name": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "mlp": "gelu"},
        "optim": {"lr": 0.002, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 30},
        "train": TRAIN | {"max_epochs": 2, "batch_size": 32, "early_stopping": {"patience": 2}},
        "compress": COMPRESS
        | {"structured_pruning": {"finetune_epochs": 1}, "distillation": {"width": 0.5, "max_epochs": 2}},
    },
}


def run(workload: str, seed: int, root: Path) -> CompressResult:
    config = config_from_dict(WORKLOADS[workload] | {"seed": seed})
    store = LocalStore(root / f"{workload}-{seed}")
    data = prepare_data(config.data, seed, store)
    spec = TrainingSpec.of(config, data)
    return compress(config.compress, spec, train(spec, store, "train"), store, "compress")


def goals(result: CompressResult) -> dict[str, float | None]:
    """The figures the goals are judged by, for one seed."""
    by = {v.name: v for v in result.variants if v.status == "ok"}
    fp32, rec = by["fp32"], by[result.recommended]
    smallest_fp32 = min(by[n].size_bytes for n in ("fp32", "fp32+onnx") if n in by)
    out: dict[str, float | None] = {}
    if result.task == "classification":
        acc = fp32.metrics["accuracy"]

        def drop(name: str) -> float | None:
            return (acc - by[name].metrics["accuracy"]) * 100 if name in by else None

        def speedup(name: str, over: str = "fp32") -> float | None:
            return by[over].latency_ms_p50 / by[name].latency_ms_p50 if name in by and over in by else None

        out |= {
            "fp32_accuracy": acc,
            "rec_smaller": smallest_fp32 / rec.size_bytes,
            "rec_faster": speedup(result.recommended),
            "rec_faster_than_onnx_fp32": speedup(result.recommended, "fp32+onnx"),
            "rec_drop_pts": drop(result.recommended),
            "pruned_drop_pts": drop("pruned"),
            "structured_faster": speedup("pruned_structured"),
            "structured_onnx_faster_than_onnx_fp32": speedup("pruned_structured+onnx", "fp32+onnx"),
            "structured_drop_pts": drop("pruned_structured"),
            "student_params_share": by["distilled"].params / fp32.params if "distilled" in by else None,
            "student_keeps": by["distilled"].metrics["accuracy"] / acc if "distilled" in by else None,
        }
    else:
        ppl = fp32.metrics["perplexity"]
        for name in ("fp32+onnx_int8", "fp32+torch_int8"):
            out[f"{name}_ppl_rise"] = by[name].metrics["perplexity"] / ppl - 1 if name in by else None
        out["fp32_perplexity"] = ppl
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="write every table and figure here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average {load_average()} at start")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workload or list(WORKLOADS):
            for seed in args.seeds:
                started = time.perf_counter()
                result = run(workload, seed, Path(tmp))
                table = LocalStore(Path(tmp)).local_path(result.table_uri).read_text()
                figures = goals(result)
                report[f"{workload}/{seed}"] = {"figures": figures, "recommended": result.recommended,
                                                "reason": result.reason, "table": table}  # fmt: skip
                print(f"\n## {workload}, seed {seed} ({time.perf_counter() - started:.0f} s)\n\n{table}")
                print(f"recommended {result.recommended}: {result.reason}")
                print("figures: " + ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items()))
    print(f"\nload average {load_average()} at the end\n\n## summary: mean over seeds [min, max]\n")
    for workload in args.workload or list(WORKLOADS):
        runs = [report[f"{workload}/{s}"]["figures"] for s in args.seeds]
        print(f"{workload}: recommended " + ", ".join(report[f"{workload}/{s}"]["recommended"] for s in args.seeds))
        for key in runs[0]:
            values = [r[key] for r in runs if r[key] is not None]
            if values:
                mean = sum(values) / len(values)
                print(f"  {key:<40} {mean:8.3f}  [{min(values):.3f}, {max(values):.3f}]")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
