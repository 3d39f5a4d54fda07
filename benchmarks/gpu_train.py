"""GPU training throughput: our Trainer against a bare nanoGPT-style loop on a GPT-2-small, with MFU.

One process, one model and one optimizer shared by both sides (so the same compiled graph, the same memory and
the same work): a GPT of GPT-2-small shape (12 layers x 768, 12 heads, vocab 50304, 1024-token windows, ~124M
parameters) on random tokens, bf16 autocast, `torch.compile` of the model as `train.compile` does it (with
--compile-loss: of the model and its cross-entropy as one function, as nanoGPT's forward computes its loss, given
to the Trainer as its loss hook), attention through `F.scaled_dot_product_attention` restricted to the flash and
memory-efficient kernels, TF32 matmuls, fused AdamW, gradient clipping at 1.0, constant LR.

Sides, in alternating order per round (T-B, B-T, ...) after untimed warm-up steps (the compile among them):
  trainer: `core.training.trainer.Trainer.fit` for --steps optimizer steps, built as core/training/builder.py
           builds it (loaders over the windows, `build_optimizer`, `build_scheduler`), no tracking or checkpoint
           callbacks; timed from the call of `fit` to the end of its last step (its closing validation excluded).
  bare:    nanoGPT's loop: random windows pinned and copied non-blocking, autocast forward and loss, backward,
           clip, step, zero_grad(set_to_none=True), the loss read at the Trainer's logging cadence.
Both start and stop on a device synchronisation. tokens/s = steps x micro-batch x seq_len / seconds; MFU from
core/training/flops.py (6N + 12 L H Q T FLOPs per token, dense bf16 peak of the GPU), beside the Trainer's own
logged train/mfu (which times from one log to the next: data waits and host work included).

Goals: the Trainer's MFU >= 45% on H100/H200; Trainer/bare tokens/s >= 0.98 (ratio of the medians over rounds).

    .venv/bin/python benchmarks/gpu_train.py                      # on a CUDA GPU: ~2 min, most of it compiling
    .venv/bin/python benchmarks/gpu_train.py --small --steps 20   # smoke test of the script itself, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)
from torch import nn

from trainflow.core.config import GPTConfig, LoaderConfig, OptimConfig, TrainConfig
from trainflow.core.data.loaders import Loaders, build_loaders
from trainflow.core.data.prepared import ArraySplits
from trainflow.core.data.spec import DataSpec
from trainflow.core.models import build_model
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.flops import mfu, model_flops_per_token, peak_flops
from trainflow.core.training.optim import build_optimizer, build_scheduler
from trainflow.core.training.trainer import LossFn, Trainer, task_loss

MFU_GOAL, RATIO_GOAL, MFU_GOAL_GPUS = 0.45, 0.98, ("H100", "H200")
OPTIM = OptimConfig(lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), schedule="constant")  # nanoGPT's GPT-2 values
DEFAULT_OUT = Path(__file__).parent / "results" / "gpu_train.json"


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    seq_len: int


GPT2_SMALL = Shape(n_layer=12, n_head=12, n_embd=768, vocab=50304, seq_len=1024)
SMALL = Shape(n_layer=2, n_head=4, n_embd=128, vocab=256, seq_len=128)  # --small: seconds on 2 CPU cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side, order alternating")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side first (compile included)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on CUDA only")
    parser.add_argument("--compile-loss", action="store_true",
                        help="compile the cross-entropy with the model (nanoGPT's scope; the Trainer gets it as its "
                             "loss hook); default: the model alone, as train.compile does")  # fmt: skip
    parser.add_argument("--small", action="store_true", help=f"tiny shape {SMALL} (a smoke test, CPU-sized)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the figures as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        print("a CUDA GPU is needed for the GPT-2-small figures; running the --small shape on CPU instead")
        args.small = True
    compiled = device.type == "cuda" if args.compile is None else args.compile
    shape = SMALL if args.small else GPT2_SMALL
    _print_machine(device)
    if args.small:
        print("SMALL SHAPE: a smoke test of the benchmark itself; its figures say nothing about the goals")
    report = run(shape, device, args.micro_batch, args.steps, args.rounds, args.warmup, compiled, args.compile_loss,
                 args.seed)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {args.out}")


def run(shape: Shape, device: torch.device, micro_batch: int, steps: int, rounds: int, warmup: int,
        compiled: bool, compile_loss: bool, seed: int) -> dict[str, Any]:  # fmt: skip
    """Warm both sides up, time `rounds` alternating rounds of `steps` steps each, print and return the figures."""
    _fast_math(device)
    torch.manual_seed(seed)
    spec = DataSpec(task="language_modeling", input_shape=(shape.seq_len,), n_classes=shape.vocab)
    module = build_model(GPTConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd), spec).to(device)
    scope = ("model and loss" if compile_loss else "model") if compiled else "off"
    setup = Setup(
        model=torch.compile(module) if compiled and not compile_loss else module,  # as train.compile wraps it
        module=module,
        optimizer=_fused_adamw(module, device),
        loss=torch.compile(task_loss) if compiled and compile_loss else task_loss,
        device=device,
        micro_batch=micro_batch,
        log_every=min(TrainConfig().log_every_steps, steps),  # the loss is read (a sync) at the same cadence
        flops_per_token=model_flops_per_token(module, shape.seq_len),
    )
    tokens = np.random.default_rng(seed).integers(0, shape.vocab, max(steps, warmup) * micro_batch * shape.seq_len + 1)
    loaders = _loaders(tokens, shape.seq_len, micro_batch, seed, device)
    bare_batches = _NanoBatches(tokens, shape.seq_len, micro_batch, seed, device)
    peak, n_params = peak_flops(device), sum(p.numel() for p in module.parameters())
    print(f"model: GPT {shape}, {n_params / 1e6:.1f}M parameters, {setup.flops_per_token / 1e9:.3f} GFLOP/token; "  # type: ignore[operator]
          f"micro-batch {micro_batch} x {shape.seq_len} tokens; bf16 autocast, compile: {scope}, fused AdamW "
          f"{bool(setup.optimizer.defaults.get('fused'))}; {rounds} rounds x {steps} steps per side after {warmup} "
          f"warm-up steps")  # fmt: skip
    sides = {
        "trainer": lambda n: trainer_fit(setup, loaders, n),
        "bare": lambda n: bare_fit(setup, bare_batches, n),
    }
    timings: dict[str, list[Timing]] = {"trainer": [], "bare": []}
    with _attention_kernels(device):
        for name, fit in sides.items():
            started = time.perf_counter()
            fit(warmup)
            print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s")
        for i in range(rounds):
            for name in list(sides) if i % 2 == 0 else list(sides)[::-1]:
                timing = sides[name](steps)
                timings[name].append(timing)
                print(f"  round {i + 1} {name:>7}: {steps * micro_batch * shape.seq_len / timing.seconds:10.0f} "
                      f"tokens/s ({timing.seconds:.3f} s), train/loss {timing.loss:.3f}", flush=True)  # fmt: skip
    return _report(shape, device, micro_batch, steps, rounds, scope, n_params, setup.flops_per_token, peak, timings)


@dataclass(frozen=True)
class Setup:
    """What both sides share: one model, one optimizer, one loss function, so the same compiled graphs."""

    model: nn.Module  # what the step calls: `module`, or torch.compile(module)
    module: nn.Module  # the plain GPT
    optimizer: torch.optim.Optimizer
    loss: LossFn  # task_loss (model forward + cross-entropy), or torch.compile(task_loss)
    device: torch.device
    micro_batch: int
    log_every: int
    flops_per_token: float | None


@dataclass(frozen=True)
class Timing:
    seconds: float  # first step's start to last step's end, device synchronised at both
    loss: float  # the last logged training loss
    peak_memory_mb: float | None  # torch.cuda.max_memory_allocated over the round; None off CUDA
    logged_mfu: float | None = None  # the Trainer's own train/mfu metric, last logged (CUDA, known peak)


# ------------------------------------------------------------------------------------------ the sides
def trainer_fit(setup: Setup, loaders: Loaders, steps: int) -> Timing:
    """`steps` steps of our Trainer, constructed as core/training/builder.py does (the one place to adjust when
    the Trainer's API changes)."""
    device = setup.device
    cfg = TrainConfig(max_epochs=1, max_steps=steps, batch_size=setup.micro_batch, precision="bf16",
                      grad_clip_norm=1.0, device=device.type, log_every_steps=setup.log_every, progress_bar=False,
                      resume=False)  # fmt: skip
    scheduler = build_scheduler(setup.optimizer, OPTIM, steps)  # constant: its length does not matter
    clock = _StepClock(steps, device)
    trainer = Trainer(setup.model, setup.optimizer, scheduler, loaders, cfg, device, "language_modeling", [clock],
                      loss=setup.loss, module=setup.module, flops_per_token=setup.flops_per_token)  # fmt: skip
    _reset_peak_memory(device)
    _sync(device)
    started = time.perf_counter()
    trainer.fit()  # ends with a validation pass, after the clock stopped
    return Timing(clock.ended - started, clock.loss, clock.peak_memory_mb, clock.mfu)


class _StepClock(Callback):
    """Stops the Trainer side's clock at the end of its last step, before fit's closing validation."""

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device = steps, device
        self.ended, self.loss, self.peak_memory_mb, self.mfu = 0.0, float("nan"), None, None

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.loss, self.mfu = metrics["train/loss"], metrics.get("train/mfu")

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.steps:
            _sync(self.device)
            self.ended = time.perf_counter()
            self.peak_memory_mb = _peak_memory_mb(self.device)


def bare_fit(setup: Setup, batches: _NanoBatches, steps: int) -> Timing:
    """nanoGPT's training loop, without gradient accumulation, evaluation or checkpoints."""
    model, optimizer, device = setup.model, setup.optimizer, setup.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    model.train()
    last = float("nan")
    _reset_peak_memory(device)
    _sync(device)
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:  # nanoGPT sets each step's LR by hand
            group["lr"] = OPTIM.lr
        x, y = batches.next()
        with autocast:
            loss = setup.loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % setup.log_every == 0:
            last = loss.item()
    _sync(device)
    return Timing(time.perf_counter() - started, last, _peak_memory_mb(device))


class _NanoBatches:
    """nanoGPT's get_batch: `batch` random windows of the token array, pinned and copied without blocking."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int, device: torch.device):
        self.data, self.seq_len, self.batch, self.device = torch.from_numpy(tokens), seq_len, batch, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.seq_len - 1, (self.batch,), generator=self.generator).tolist()
        x = torch.stack([self.data[i : i + self.seq_len] for i in starts])
        y = torch.stack([self.data[i + 1 : i + 1 + self.seq_len] for i in starts])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


# -------------------------------------------------------------------------------------------- set-up
def _loaders(tokens: np.ndarray, seq_len: int, micro_batch: int, seed: int, device: torch.device) -> Loaders:
    """The train stage's loaders (core/training/builder.py: `prepared_loaders`) over the random tokens; validation
    and test get one micro-batch of windows each (validation runs only after the Trainer side's clock)."""
    held_out = tokens[: micro_batch * seq_len + 1]
    splits = ArraySplits(x={"train": tokens, "val": held_out, "test": held_out}, y={}, class_names=[],
                         n_features=seq_len)  # fmt: skip
    cfg = LoaderConfig()
    return build_loaders(splits, seq_len, micro_batch, cfg, seed, device.type == "cuda" and cfg.pin_memory)


def _fused_adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """`build_optimizer`'s AdamW (its decay groups), fused on CUDA even where build_optimizer does not fuse."""
    optimizer = build_optimizer(model, OPTIM)
    if device.type != "cuda" or optimizer.defaults.get("fused"):
        return optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps, fused=True)  # type: ignore[arg-type]


def _fast_math(device: torch.device) -> None:
    """TF32 for the fp32 matmuls and convolutions autocast leaves (new API where torch has it)."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _attention_kernels(device: torch.device) -> AbstractContextManager[object]:
    """On CUDA, SDPA may use only the flash and memory-efficient kernels: a shape they reject fails loudly
    instead of falling back to the math kernel."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# -------------------------------------------------------------------------------------------- report
def _print_machine(device: torch.device) -> None:
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()}; python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}."
              f"{props.minor}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible")  # fmt: skip


def _report(shape: Shape, device: torch.device, micro_batch: int, steps: int, rounds: int, compile_scope: str,
            n_params: int, flops_per_token: float | None, peak: float | None,
            timings: dict[str, list[Timing]]) -> dict[str, Any]:  # fmt: skip
    tokens = steps * micro_batch * shape.seq_len
    sides: dict[str, dict[str, Any]] = {}
    for name, runs in timings.items():
        rates = [tokens / t.seconds for t in runs]
        median = statistics.median(rates)
        memory = [t.peak_memory_mb for t in runs if t.peak_memory_mb is not None]
        sides[name] = {
            "tokens_per_s": rates,
            "tokens_per_s_median": median,
            "mfu": mfu(median, flops_per_token, peak) if flops_per_token and peak else None,
            "peak_memory_mb": max(memory) if memory else None,
            "last_train_loss": runs[-1].loss,
        }
    logged = [t.logged_mfu for t in timings["trainer"] if t.logged_mfu is not None]
    sides["trainer"]["logged_mfu_median"] = statistics.median(logged) if logged else None
    trainer, bare = sides["trainer"], sides["bare"]
    ratio = trainer["tokens_per_s_median"] / bare["tokens_per_s_median"]
    per_round = [t / b for t, b in zip(trainer["tokens_per_s"], bare["tokens_per_s"], strict=True)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    mfu_goal_applies = gpu is not None and any(key in gpu for key in MFU_GOAL_GPUS)
    print(f"\nload average at the end: {load_average()}")
    print(f"device: {gpu or device.type}; peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} dense bf16")
    for name, side in sides.items():
        memory = "n/a" if side["peak_memory_mb"] is None else f"{side['peak_memory_mb']:.0f} MiB"
        print(f"{name:>7}: {side['tokens_per_s_median']:10.0f} tokens/s (median of {_list(side['tokens_per_s'])}), "
              f"MFU {_percent(side['mfu'])}, peak memory {memory}")  # fmt: skip
    mfu_verdict = (("met" if trainer["mfu"] >= MFU_GOAL else "missed") if mfu_goal_applies and trainer["mfu"]
                   else f"n/a (goal set for {'/'.join(MFU_GOAL_GPUS)})")  # fmt: skip
    ratio_verdict = "met" if ratio >= RATIO_GOAL else "missed"
    if shape != GPT2_SMALL:  # the goals are for GPT-2-small: a smoke test's figures neither meet nor miss them
        mfu_verdict = ratio_verdict = "n/a (not the GPT-2-small shape)"
    print(f"MFU (Trainer): {_percent(trainer['mfu'])} (its own train/mfu metric: "
          f"{_percent(trainer['logged_mfu_median'])}); goal >= {MFU_GOAL:.0%}: {mfu_verdict}")  # fmt: skip
    print(f"Trainer / bare tokens/s: {ratio:.3f} (per round {_list(per_round, 3)}); goal >= {RATIO_GOAL}: "
          f"{ratio_verdict}")  # fmt: skip
    return {
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "shape": asdict(shape),
        "n_params": n_params,
        "micro_batch": micro_batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "compile": compile_scope,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "trainer": trainer,
        "bare": bare,
        "trainer_over_bare": ratio,
        "trainer_over_bare_per_round": per_round,
        "goals": {
            "mfu": {"goal": MFU_GOAL, "value": trainer["mfu"], "verdict": mfu_verdict},
            "trainer_over_bare": {"goal": RATIO_GOAL, "value": ratio, "verdict": ratio_verdict},
        },
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _list(values: list[float], digits: int = 0) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


if __name__ == "__main__":
    main()
