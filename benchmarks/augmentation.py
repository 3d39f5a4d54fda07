"""Augmentation on the training device (`train.augment`): its throughput against per-sample augmentation in
DataLoader workers, and its effect on test accuracy; side by side in one run, on the same torch threads.

Data: sklearn's digits (1,797 images of 8 x 8) written out by this script as an image folder of 32 x 32 PNGs
(bicubic upscaling, one sub-folder per class; `augmentation_data.py`), then read by trainflow's prepare_data stage
as `data.source: image_folder`: decoded with Pillow, split 70/15/15 stratified by the seed, normalised per channel
(the spec's pixel_mean/pixel_std, fitted on the training split).

1. Throughput. The folder prepared in RGB (3 x 32 x 32; the grey digits in three equal channels, so colour
   jitter does all its work) and seed 0's training split (1,257 images). The ops: random_resized_crop, hflip,
   rotate, color_jitter, cutout at their defaults. The model: `core.models` CNN, channels `--channels`, AdamW,
   batch `--batch`; a bare loop (fetch, augment, forward, backward, step) so that only where augmentation
   runs differs. Sides:
   - on the training device in batches: `build_augment` on each batch after the DataLoader (here the device is
     the CPU itself; 0 workers; trainflow's `ArrayDataset` fetches a batch with one index);
   - per sample, the same ops: a Dataset whose `__getitem__` runs the same code on a batch of one, 0 and 2 workers;
   - per sample, Pillow: torchvision v1's PIL path (one resize of the crop box, transpose, rotate, ImageEnhance),
     the same ranges, 0 and 2 workers (torchvision itself does not import beside this torch build).
   Each side runs one warm-up epoch, then `--rounds` timed epochs, the sides rotated round by round; workers are
   persistent, so a timed epoch does not pay their start. Figures: median samples/s of an epoch with the model's
   step, and of the data path alone (the same epoch without the model). Ratio = on-device / per-sample. Goal:
   >= 3x against every per-sample side. GPU: not measured (no device lent to this run).
2. Effect. The folder prepared in grey (1 x 32 x 32) for each seed; 20% of each class's training images (seeded,
   `augmentation_data.train_share`: 251 of 1,257) in a new prepared .npz, validation and test (270) whole. The
   CNN, channels `--effect-channels`, AdamW lr 3e-3, cosine, batch 32, `--epochs` epochs, no early stopping,
   validation only at the end, built and fitted by `core.training.builder.build_trainer` (the train stage's own
   Trainer; `train.augment` on or off, nothing else differs), then scored on the test split. Ops for digits:
   random_resized_crop scale [0.8, 1] ratio [0.9, 1.1], rotate 10 degrees (no hflip: a mirrored digit is another
   symbol). Figure: test accuracy per seed, the mean on and off, and the difference. Goal: >= 1 point.
   `--effect-model mlp`: the same with an MLP (hidden [256, 128]), which has no convolution's shift invariance.

On a loaded machine timings mean little: the load average is printed at the start and the end.

    cd benchmarks
    ../.venv/bin/python augmentation.py               # both parts, 3 seeds (about 13 minutes here)
    ../.venv/bin/python augmentation.py --part effect --effect-model mlp   # the effect with an MLP (1 minute)
    ../.venv/bin/python augmentation.py --quick       # smoke test: 1 round, 1 seed, 3 epochs
    ../.venv/bin/python augmentation.py --part effect --seeds 0 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from augmentation_data import prepared_folder, train_share, write_digits_folder
from augmentation_throughput import OPS, median, throughput
from machine import cpu_model, load_average

from trainflow.core.config import config_from_dict
from trainflow.core.data.prepared import load_splits
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.metrics import eval_pass
from trainflow.core.training.spec import TrainingSpec

SIZE = 32
THROUGHPUT_GOAL, EFFECT_GOAL = 3.0, 0.01
DIGIT_OPS = [{"op": "random_resized_crop", "scale": [0.8, 1.0], "ratio": [0.9, 1.1]}, {"op": "rotate", "degrees": 10}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "throughput", "effect"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 1 seed, 3 epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (every side alike)")
    parser.add_argument("--channels", default="8,16", help="throughput: the CNN's channels per stage")
    parser.add_argument("--batch", type=int, default=128, help="throughput: batch size")
    parser.add_argument("--rounds", type=int, default=5, help="throughput: timed epochs per side")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="effect: seeds")
    parser.add_argument("--epochs", type=int, default=200, help="effect: epochs per run")
    parser.add_argument("--effect-channels", default="16,32", help="effect: the CNN's channels per stage")
    parser.add_argument(
        "--effect-model",
        choices=["cnn", "mlp"],
        default="cnn",
        help="effect: the CNN, or an MLP (hidden [256, 128]: no convolution's shift invariance)",
    )
    parser.add_argument("--share", type=float, default=0.2, help="effect: share of the training split used")
    parser.add_argument("--work", type=Path, default=None, help="folder for the PNGs and the store (default: temp)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds, args.epochs = 1, args.seeds[:1], 3
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="trainflow-augmentation-"))
    store = LocalStore(work / "store")
    folder = write_digits_folder(work, SIZE)
    print(f"machine: {cpu_model()}, {platform.machine()}, torch {torch.__version__}, {args.threads} torch thread(s); "
          f"load average {load_average()}; data: {folder}")  # fmt: skip
    verdicts = []
    if args.part in ("all", "throughput"):
        verdicts.append(throughput_part(folder, store, args))
    if args.part in ("all", "effect"):
        verdicts.append(effect_part(folder, store, args))
    print(f"\nload average at the end {load_average()}")
    for line in verdicts:
        print(line)


def throughput_part(folder: Path, store: LocalStore, args: argparse.Namespace) -> str:
    data = prepared_folder(folder, SIZE, "rgb", 0, store)
    arrays = load_splits(store, data)
    x, y = torch.from_numpy(arrays.x["train"]), torch.from_numpy(arrays.y["train"])
    channels = [int(c) for c in args.channels.split(",")]
    print(f"\n== 1. throughput: {len(y)} images of {tuple(x.shape[1:])}, ops {', '.join(o['op'] for o in OPS)} "
          f"(defaults); CNN {channels}, AdamW, batch {args.batch}; {args.rounds} timed epochs per side")  # fmt: skip
    sides = throughput(x, y, data.spec, channels, args.batch, args.rounds)
    device = median(sides[0].train_rates)
    print("\n| side | samples/s, training epoch | on-device speed-up | samples/s, data path alone |")
    print("| --- | ---: | ---: | ---: |")
    ratios = []
    for side in sides:
        ratio = device / median(side.train_rates)
        ratios.append(ratio) if side is not sides[0] else None
        print(f"| {side.name} | {median(side.train_rates):.0f} ({min(side.train_rates):.0f}-"
              f"{max(side.train_rates):.0f}) | {ratio:.2f}x | {median(side.aug_rates):.0f} |")  # fmt: skip
    print("| on a GPU | not measured (no device lent to this run) | | |")
    worst = min(ratios)
    met = "met" if worst >= THROUGHPUT_GOAL else "missed"
    return (
        f"1. throughput: on-device / per-sample {worst:.2f}x at worst ({', '.join(f'{r:.2f}x' for r in ratios)}); "
        f"goal >= {THROUGHPUT_GOAL:g}x {met}"
    )


def effect_part(folder: Path, store: LocalStore, args: argparse.Namespace) -> str:
    cnn = {"name": "cnn", "channels": [int(c) for c in args.effect_channels.split(",")]}
    model = cnn if args.effect_model == "cnn" else {"name": "mlp", "hidden_sizes": [256, 128]}
    print(f"\n== 2. effect: digits {SIZE}x{SIZE} grey, {args.share:.0%} of the training split, {model}, "
          f"{args.epochs} epochs, batch 32, AdamW lr 3e-3 cosine; augment: "
          f"{', '.join(str(o) for o in DIGIT_OPS)}")  # fmt: skip
    accuracy: dict[str, dict[int, float]] = {"off": {}, "on": {}}
    for seed in args.seeds:
        data = train_share(prepared_folder(folder, SIZE, "gray", seed, store), args.share, seed, store)
        for arm, ops in (("off", []), ("on", DIGIT_OPS)):
            started = time.perf_counter()
            accuracy[arm][seed] = _fit_and_test(folder, data, seed, model, args.epochs, ops, store)
            print(
                f"  seed {seed}, augmentation {arm}: test accuracy {accuracy[arm][seed]:.4f} "
                f"({data.n_train} training images, {data.n_test} test; {time.perf_counter() - started:.0f} s)"
            )
    means = {arm: statistics.fmean(by_seed.values()) for arm, by_seed in accuracy.items()}
    print("\n| augmentation | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("| --- | " + " | ".join("---:" for _ in args.seeds) + " | ---: |")
    for arm, by_seed in accuracy.items():
        print(f"| {arm} | " + " | ".join(f"{by_seed[s]:.4f}" for s in args.seeds) + f" | {means[arm]:.4f} |")
    gain = means["on"] - means["off"]
    met = "met" if gain >= EFFECT_GOAL else "missed"
    return (
        f"2. effect: test accuracy on {means['on']:.4f} vs off {means['off']:.4f}: {100 * gain:+.2f} points; "
        f"goal >= +{100 * EFFECT_GOAL:g} {met}"
    )


def _fit_and_test(folder: Path, data: object, seed: int, model: dict, epochs: int, ops: list,
                  store: LocalStore) -> float:  # fmt: skip
    """Test accuracy after `epochs` of the train stage's Trainer on `data` (a PrepareDataResult)."""
    raw = {"seed": seed, "data": {"source": "image_folder", "path": str(folder), "image_size": SIZE, "color": "gray"},
           "model": model, "optim": {"lr": 3e-3},
           "train": {"max_epochs": epochs, "batch_size": 32, "device": "cpu", "progress_bar": False,
                     "eval_every_steps": 10**9, "early_stopping": {"enabled": False, "restore_best": False},
                     "augment": {"ops": ops}}}  # fmt: skip
    trainer = build_trainer(TrainingSpec.of(config_from_dict(raw), data), store)  # type: ignore[arg-type]
    trainer.fit()
    result = eval_pass(trainer.model, trainer.loaders.test, trainer.device, trainer.autocast)
    return result.correct / result.n_targets


if __name__ == "__main__":
    main()
