"""Fine-tuning: transfer against training from scratch, LoRA against full fine-tuning, the LR range test on a
fine-tune against a grid, and a new head on digits (frozen-then-unfrozen, full, scratch); side by side, 3 seeds.

The GPT is configs/text_gpt.yaml's (4 layers x 128, RMSNorm, SwiGLU, AdamW lr 2e-3, weight decay 0.1, betas
0.9/0.95, 50 warmup steps, cosine to 0) with two changes that make it fit 2 CPU cores: 64-byte windows in batches
of 16 (the yaml: 128 x 32) and fp32 (the yaml's bf16 autocast is ~18x slower than fp32 on a CPU without AVX-512
BF16, such as this one). Every run has early stopping off and `restore_best` off: the weights after the last step.
A seed is the config's `seed` of every run of that seed (pretraining included): init, shuffle, LoRA's init and,
for digits, the split and the subsample; text splits are contiguous by design, so there it moves init and shuffle.

1. Transfer. Per seed, the GPT is pretrained on the bundled pydoc text (`data.path: null`) with `core.train.train`,
   then trained on a second corpus, the Python standard library's own top-level .py sources (every k-th file in
   sorted order, the smallest k giving at most ~1.2 MB, in one file; val 1%, test 3%: the contiguous split makes
   the tail the test set): from scratch and fine-tuned (`model.init_from` = the pretrained model.pt), same steps,
   same optimizer settings.
   A callback evaluates the test split every `eval_every_steps` (and before the first step); each curve point is the
   test perplexity of the weights at that step. Figures: scratch's final test perplexity, and the first step at
   which the fine-tune's test perplexity is at or below it, both on the curves averaged over seeds (each seed's
   step beside them). Goal: that step <= 1/3 of the steps.
2. LoRA (`model.lora: {r: 4, target_modules: [qkv]}`, alpha 16, at lr 1e-2: adapters take a higher LR than full
   fine-tuning; chosen before this benchmark by 150-step runs on seed 0 at 2e-3, 1e-2 and 3e-2, val perplexity
   6.79, 6.60 and 6.74 against 5.97 for full fine-tuning at 2e-3; not tuned further) against the full fine-tune of
   part 1: same pretrained model, steps and schedule. Figures: trainable parameters (% of the total, which for
   LoRA includes the adapters; goal <= 2%); final test perplexity (goal: LoRA's <= 1.03 x full's, means over
   seeds); step time: median ms per step over `timing_rounds` rounds of 10 steps per variant, the two trainers
   alternated round by round in one process so that load from other work hits both alike (the median step between
   evaluations of the runs themselves beside it); peak memory: resident set size (psutil, sampled every 2 ms in a
   thread) above its value just before the trainer is built, in a fresh spawned process per variant running
   `memory_steps` steps (torch's CPU allocations are not seen by tracemalloc, and a process that trained before
   re-uses freed pages, so each variant gets its own process; peft and torch._dynamo are imported before the
   baseline in both); that process's peak RSS (ru_maxrss) beside it.
3. LR range test on a fine-tune's first phase: `train.finetune.freeze: [blocks.0, blocks.1]` (the lower half of the
   transformer, frozen throughout these runs) from the pretrained model, on the stdlib corpus. The stage
   (`core.lr_range_test.lr_range_test`, default `tune.lr_range_test`, which sweeps what the first phase trains) as
   benchmarks/lr_range_test.py calls it, one run at each rule's suggestion (valley, steepest, min_div_10: the
   stage's `suggestions`, one curve) and one at every LR of a quarter-decade grid (3.2e-4 .. 1e-1), each
   `grid_steps` steps with warmup and cosine. Figure: the val loss after the last step; ratio = a rule's mean over
   seeds / the grid's best mean. Goal: the default rule's ratio <= 1.10. Beside it, the val loss of the starting
   weights (no step at all): how much of the margin a fine-tune's head start already covers. Cost: the range
   test's seconds over the grid's seconds (build and fit).
4. Digits (sklearn `load_digits`, 8x8, `model.name: cnn`, channels [32, 64], AdamW lr 3e-3, batch 64). Per seed the
   stage's own split (prepare_data, stratified, standard-scaled: 70/15/15) is cut into new prepared .npz files
   (`core.data.prepared.splits_to_npz`, a `PrepareDataResult` with its `DataSpec`): pretraining = the train and val
   samples of classes 0-4 only (5 classes); fine-tuning = all the old classes' (0-4) train samples plus 10% of each
   new class's (5-9) train samples (seeded, at least 1 per class), val likewise; test = the whole ten-class test
   split. The CNN is trained on 0-4 (`core.train.train`), then on the fine-tuning data with `model.reinit: [head]`:
   (a) `train.finetune: {freeze: [stem, blocks], unfreeze_at_epoch: K, layer_lr_decay: 0.5}` (K = a third of the
   epochs), (b) full fine-tuning, (c) from scratch; same epochs. Figure: test accuracy on all ten classes (old and
   new classes apart beside it); the best mean wins.

On a loaded machine timings mean little: the load average is printed at the start and the end. Beside other
work on 2 cores, `--threads 1` is much faster than torch's 2 threads, which then wait on each other (one GPT step:
~0.3 s against ~1.8 s, measured here beside a test run; idle: 0.11 s against 0.07 s).

    cd benchmarks
    ../.venv/bin/python finetune.py             # 3 seeds, all parts
    ../.venv/bin/python finetune.py --threads 1 # the same beside other work: ~25 min measured on a loaded machine
    ../.venv/bin/python finetune.py --quick     # smoke test only (1 seed, a few dozen steps): ~1.2 min
    ../.venv/bin/python finetune.py --part digits --seeds 0 1
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from finetune_common import (
    BATCH,
    FULL,
    LORA,
    LORA_LR,
    LR,
    PARTS,
    QUICK,
    SEEDS,
    SEQ_LEN,
    TIMED_STEPS,
    Budget,
    TextRun,
    Verdict,
    first_reaching,
    interpolated,
    mean_curve,
    pretrain,
    spread,
    stdlib_corpus,
    text_config,
    text_run,
)
from finetune_cost import alternated_step_ms, memory_probe
from finetune_digits import digits
from finetune_lr import lr_range
from machine import cpu_model, load_average  # benchmarks/machine.py (scripts run from here)

from trainflow.core.config import Config
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, a few dozen steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="config seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 beside other work")
    args = parser.parse_args()
    if args.seeds is not None and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        parser.error("--seeds must be distinct and >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    seeds = tuple(args.seeds) if args.seeds else (SEEDS[:1] if args.quick else SEEDS)
    parts = PARTS if args.part == "all" else (args.part,)
    import matplotlib  # the range test plots its curve: imported here, outside any timed call

    matplotlib.use("Agg")
    import matplotlib.pyplot

    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    load_start = load_average()
    print(f"machine: {machine}; load average {load_start}")
    if args.quick:
        print("QUICK MODE (smoke test only; its figures decide nothing)")
    print(f"seeds {list(seeds)}; budget {budget}")
    started = time.perf_counter()
    verdicts: list[Verdict] = []
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        store = LocalStore(Path(tmp) / "artifacts")
        if {"transfer", "lora", "lr"} & set(parts):
            corpus = stdlib_corpus(Path(tmp) / "stdlib.py.txt", budget.corpus_bytes)
            pretrained = {seed: pretrain(seed, budget, store) for seed in seeds}
            if "transfer" in parts or "lora" in parts:
                verdicts += _transfer_and_lora(parts, seeds, budget, store, corpus, pretrained)
            if "lr" in parts:
                verdicts += lr_range(seeds, budget, store, corpus, pretrained)
        if "digits" in parts:
            verdicts += digits(seeds, budget, store)
    total_s = time.perf_counter() - started
    load_end = load_average()
    print(f"\nload average at the end: {load_end}; {total_s / 60:.1f} min in all")
    note = (
        f"{len(seeds)} seed(s); load average {load_start} at the start, {load_end} at the end; {total_s / 60:.0f} min"
    )
    print(f"\nsummary ({'QUICK MODE, decides nothing' if args.quick else note}); {machine}\n")
    print("| comparison | figure | goal | verdict |\n| --- | --- | --- | --- |")
    for v in verdicts:
        print(f"| {v.name} | {v.figure} | {v.goal} | {'met' if v.met else '**MISSED**'} |")


def _transfer_and_lora(
    parts: Sequence[str],
    seeds: Sequence[int],
    budget: Budget,
    store: LocalStore,
    corpus: str,
    pretrained: dict[int, str],
) -> list[Verdict]:
    steps, every = budget.steps, budget.eval_every
    corpus_data = prepare_data(text_config(seeds[0], corpus, steps, LR, every).data, seeds[0], store)
    print(f"\n== 1/2. transfer and LoRA on the stdlib corpus: {corpus_data.n_train} train / {corpus_data.n_val} val / "
          f"{corpus_data.n_test} test windows of {SEQ_LEN} bytes; {steps} steps of batch {BATCH} per run "
          f"({steps * BATCH / corpus_data.n_train:.2f} epochs); test perplexity every {every} steps")  # fmt: skip
    variants: dict[str, Callable[[int], Config]] = {
        "scratch": lambda seed: text_config(seed, corpus, steps, LR, every),
        "full fine-tune": lambda seed: text_config(seed, corpus, steps, LR, every, init_from=pretrained[seed]),
    }
    if "lora" in parts:
        variants["LoRA r=4 qkv"] = lambda seed: text_config(seed, corpus, steps, LORA_LR, every,
                                                             init_from=pretrained[seed], lora=LORA)  # fmt: skip
    if "transfer" not in parts:
        del variants["scratch"]
    runs: dict[str, dict[int, TextRun]] = {name: {} for name in variants}
    for seed in seeds:
        for name, make in variants.items():  # the variants alternate within each seed: load hits them alike
            run = text_run(make(seed), corpus_data, store, f"text/{name.split()[0]}/seed-{seed}", every)
            runs[name][seed] = run
            print(f"  seed {seed}, {name}: test perplexity {run.curve[0][1]:.2f} at step 0 -> {run.final:.3f} at "
                  f"step {run.curve[-1][0]}; {run.ms_per_step:.0f} ms/step; {run.seconds:.0f} s")  # fmt: skip
    verdicts: list[Verdict] = []
    means = {name: mean_curve(list(r.values())) for name, r in runs.items()}
    print("\ntest perplexity against steps (means over seeds):\n")
    names = list(runs)
    print("| step | " + " | ".join(names) + " |\n| ---: |" + " ---: |" * len(names))
    for i, (step, _) in enumerate(means[names[0]]):
        print(f"| {step} | " + " | ".join(f"{means[n][i][1]:.3f}" for n in names) + " |")

    if "scratch" in runs:
        scratch = [runs["scratch"][s].final for s in seeds]
        target = statistics.fmean(scratch)
        reached = first_reaching(means["full fine-tune"], target)
        per_seed = [first_reaching(runs["full fine-tune"][s].curve, runs["scratch"][s].final) for s in seeds]
        shown = ", ".join(
            f"seed {s}: {'not reached' if r is None else r}" for s, r in zip(seeds, per_seed, strict=True)
        )
        fraction = None if reached is None else reached / steps
        between = interpolated(means["full fine-tune"], target)
        linear = "" if between is None else f"; linear between evaluations ~{between:.0f} ({between / steps:.2f})"
        tuned = runs["full fine-tune"]
        start = spread([tuned[s].curve[0][1] for s in seeds])
        print(f"\n1. transfer: scratch's final test perplexity {spread(scratch)} (mean, range over seeds) after "
              f"{steps} steps; the full fine-tune first at or below it at step {reached} of {steps} "
              f"({'never' if fraction is None else f'{fraction:.2f} of the steps'}{linear}; per seed against its own "
              f"scratch run: {shown}); the fine-tune's final {spread([tuned[s].final for s in seeds])}, its "
              f"step 0 (pretrained, not trained on the corpus) {start}")  # fmt: skip
        figure = (f"scratch's final test ppl {target:.3f} after {steps} steps; fine-tune reaches it at step "
                  f"{reached if reached is not None else 'never'} ({'-' if fraction is None else f'{fraction:.2f}'} "
                  f"of the steps{linear}; per seed {', '.join(str(r) for r in per_seed)}; evaluated every {every} "
                  "steps)")  # fmt: skip
        verdicts.append(Verdict("1. transfer (stdlib .py, GPT 4x128)", figure, "<= 1/3 of the steps",
                                fraction is not None and fraction <= 1 / 3))  # fmt: skip
    if "LoRA r=4 qkv" in runs:
        verdicts += _lora_report(runs, seeds, budget, store, corpus, pretrained)
    return verdicts


def _lora_report(
    runs: dict[str, dict[int, TextRun]],
    seeds: Sequence[int],
    budget: Budget,
    store: LocalStore,
    corpus: str,
    pretrained: dict[int, str],
) -> list[Verdict]:
    full, lora = runs["full fine-tune"], runs["LoRA r=4 qkv"]
    names = {"full fine-tune": ({}, LR), "LoRA r=4 qkv": ({"lora": LORA}, LORA_LR)}
    memory, cfgs = {}, {}
    for name, (extra, lr) in names.items():
        cfg = text_config(seeds[0], corpus, budget.memory_steps, lr, None, init_from=pretrained[seeds[0]], **extra)
        memory[name], cfgs[name] = memory_probe(cfg, store.root, torch.get_num_threads()), cfg
    alternated = alternated_step_ms(cfgs, store, budget.timing_rounds)
    print(f"\n2. LoRA against full fine-tuning ({budget.steps} steps each). Step time (a machine that may be running "
          f"other work): median ms of {budget.timing_rounds} rounds of {TIMED_STEPS} steps per variant, the variants "
          "alternated round by round in one process (the figure used), and the median step between evaluations of "
          "the runs above, mean over seeds, in brackets. Memory: RSS above its value just before the trainer is built "
          f"(peft and torch._dynamo already imported), sampled every 2 ms, in a fresh process per variant running "
          f"{budget.memory_steps} steps; that process's ru_maxrss beside it:\n")  # fmt: skip
    print(
        "| variant | trainable params | % of total | test ppl | ms/step | peak RSS above start (MB) "
        "| process peak RSS (MB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, by_seed in (("full fine-tune", full), ("LoRA r=4 qkv", lora)):
        run, mem = by_seed[seeds[0]], memory[name]
        ppl = spread([by_seed[s].final for s in seeds])
        in_runs = statistics.fmean(by_seed[s].ms_per_step for s in seeds)
        print(f"| {name} | {run.trainable:,} | {100 * run.trainable / run.total:.2f}% | {ppl} | {alternated[name]:.0f} "
              f"({in_runs:.0f}) | {mem['delta_mb']:.0f} | {mem['maxrss_mb']:.0f} |")  # fmt: skip
    share = lora[seeds[0]].trainable / lora[seeds[0]].total
    lora_ppl, full_ppl = (statistics.fmean(r[s].final for s in seeds) for r in (lora, full))
    ratio = lora_ppl / full_ppl
    ms_ratio = alternated["LoRA r=4 qkv"] / alternated["full fine-tune"]
    mem_ratio = memory["LoRA r=4 qkv"]["delta_mb"] / max(memory["full fine-tune"]["delta_mb"], 1e-9)
    print(f"\nLoRA: {100 * share:.2f}% of the parameters train; test perplexity {ratio:.4f} x full's; step time "
          f"{ms_ratio:.2f} x; training memory (RSS above start) {mem_ratio:.2f} x")  # fmt: skip
    trainable = f"{lora[seeds[0]].trainable:,} of {lora[seeds[0]].total:,} = {100 * share:.2f}%"
    figure = (f"{lora_ppl:.3f} vs {full_ppl:.3f} = {ratio:.4f} x (step time {alternated['LoRA r=4 qkv']:.0f} vs "
              f"{alternated['full fine-tune']:.0f} ms; RSS above start {memory['LoRA r=4 qkv']['delta_mb']:.0f} vs "
              f"{memory['full fine-tune']['delta_mb']:.0f} MB)")  # fmt: skip
    return [
        Verdict("2. LoRA trainable share", trainable, "<= 2%", share <= 0.02),
        Verdict("2. LoRA test perplexity vs full fine-tune", figure, "<= 1.03 x", ratio <= 1.03),
    ]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
