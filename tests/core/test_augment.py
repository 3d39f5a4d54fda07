"""Augmentation on the training device (`train.augment`, core/training/augment): each sample its own draw,
identity at strength 0, the geometry and value ranges of each op, soft targets of mixup and cutmix, table ops
that keep to their columns; on only where it belongs (training, HPO trials; not validation, not the LR range
test by default, not a pre-built model's fine-tune); a SIGKILLed run resumed to the uninterrupted weights; the
search tunes its strength; the preflight's one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, tiny_raw
from trainflow.core.config import config_from_dict
from trainflow.core.config.augment import AugmentConfig
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import ConfigError
from trainflow.core.preflight import preflight
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.augment import build_augment
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.seed import rng_state, set_rng_state
from trainflow.core.training.spec import TrainingSpec

RGB = DataSpec(task="classification", input_shape=(3, 16, 16), n_classes=10, pixel_mean=[0.5, 0.45, 0.4],
               pixel_std=[0.25, 0.2, 0.3])  # fmt: skip
GRAY = DataSpec(task="classification", input_shape=(1, 8, 8), n_classes=10)  # digits: scaled per pixel
ROWS = DataSpec(task="classification", input_shape=(6,), n_classes=3, numeric_features=3)  # 3 numbers, 3 one-hot
DIGITS = {"source": "sklearn", "name": "digits"}
CNN = {"name": "cnn", "channels": [4, 8]}
IMAGE_OPS = [{"op": "random_resized_crop"}, {"op": "hflip"}, {"op": "rotate"}, {"op": "color_jitter"},
             {"op": "cutout"}, {"op": "mixup"}, {"op": "cutmix"}]  # fmt: skip


def _augment(spec: DataSpec, *ops: dict[str, Any], strength: float = 1.0) -> Any:
    augment = build_augment(AugmentConfig(ops=list(ops), strength=strength), spec)
    assert augment is not None
    return augment


def _images(n: int = 64, spec: DataSpec = RGB) -> torch.Tensor:
    """Random [0, 1] pixels normalised as the spec says (one image repeated n times)."""
    pixels = torch.rand(1, *spec.input_shape).expand(n, *spec.input_shape)
    if not spec.pixel_mean:
        return pixels.clone()
    mean, std = torch.tensor(spec.pixel_mean).view(1, -1, 1, 1), torch.tensor(spec.pixel_std).view(1, -1, 1, 1)
    return (pixels - mean) / std


# ------------------------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize(
    "op",
    [{"op": "random_resized_crop"}, {"op": "rotate"}, {"op": "color_jitter"}, {"op": "cutout", "p": 1.0}],
    ids=lambda op: op["op"],
)  # fmt: skip
def test_identical_images_in_a_batch_each_get_their_own_draw(op: dict[str, Any]) -> None:
    torch.manual_seed(0)
    out, _ = _augment(RGB, op)(_images(16), torch.arange(16) % 10)  # (mixup and cutmix: their own tests below)
    assert len({tuple(row.tolist()) for row in out.flatten(1)}) == 16


def test_hflip_mirrors_about_half_the_samples_exactly() -> None:
    torch.manual_seed(0)
    x = torch.rand(400, 3, 16, 16)
    out, _ = _augment(RGB, {"op": "hflip", "p": 0.5})(x, torch.zeros(400, dtype=torch.long))
    flipped = torch.tensor([torch.allclose(o, i.flip(-1), atol=1e-6) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.allclose(o, i, atol=1e-6) for o, i in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all())  # each sample either mirrored or untouched
    assert 160 <= int(flipped.sum()) <= 240


@pytest.mark.parametrize(
    ("ops", "strength"),
    [([{"op": "random_resized_crop", "scale": [1, 1], "ratio": [1, 1]}], 1.0), (IMAGE_OPS, 1e-9)],
    ids=["whole-image-crop", "strength-near-0"],
)
def test_a_crop_of_the_whole_image_and_a_vanishing_strength_are_the_identity(ops: list, strength: float) -> None:
    x = torch.rand(32, 3, 16, 16)
    y = torch.arange(32) % 10
    out, targets = _augment(RGB, *[op | ({"p": 0.0} if op["op"] == "cutout" else {}) for op in ops],
                            strength=strength)(x, y)  # fmt: skip
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert targets.argmax(dim=1).tolist() == y.tolist() if targets.is_floating_point() else torch.equal(targets, y)


def test_a_channels_last_batch_stays_channels_last() -> None:
    x = torch.rand(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)  # a channels-last CNN on CUDA
    out, _ = _augment(RGB, *IMAGE_OPS[:5])(x, torch.zeros(8).long())
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_strength_0_or_no_ops_is_no_augmentation() -> None:
    assert build_augment(AugmentConfig(ops=IMAGE_OPS, strength=0.0), RGB) is None
    assert build_augment(AugmentConfig(), RGB) is None


def test_rotation_keeps_a_pixel_at_its_distance_from_the_centre_within_the_angle() -> None:
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 16, 28] = 1.0  # 12 pixels right of the centre
    out, _ = _augment(GRAY, {"op": "rotate", "degrees": 30})(x, torch.zeros(64, dtype=torch.long))
    rows, cols = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    mass = out[:, 0].sum(dim=(1, 2))
    dy, dx = (out[:, 0] * (rows - 16)).sum(dim=(1, 2)) / mass, (out[:, 0] * (cols - 16)).sum(dim=(1, 2)) / mass
    torch.testing.assert_close(torch.hypot(dx, dy), torch.full((64,), 12.0), atol=0.35, rtol=0)
    angles = torch.rad2deg(torch.atan2(dy, dx)).abs()
    assert float(angles.max()) <= 30.5 and float(angles.max()) > 20  # spread over the range


def test_colour_jitter_keeps_pixels_in_range_and_moves_them() -> None:
    torch.manual_seed(0)
    x = _images(64)
    out, _ = _augment(RGB, {"op": "color_jitter", "brightness": 0.5, "contrast": 0.5, "saturation": 0.5},
                      strength=2.0)(x, torch.zeros(64, dtype=torch.long))  # fmt: skip
    mean, std = torch.tensor(RGB.pixel_mean).view(1, -1, 1, 1), torch.tensor(RGB.pixel_std).view(1, -1, 1, 1)
    pixels = out * std + mean
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    assert float(pixels.min()) < 1e-5 and float(pixels.max()) > 1 - 1e-5  # factors up to 2: clamped at both ends
    plain, _ = _augment(GRAY, {"op": "color_jitter", "brightness": 0.5})(3 * x[:, :1], torch.zeros(64).long())
    assert float(plain.max()) > 1.0  # no pixel normalisation: the values as they are, unclamped


def test_cutout_erases_one_square_per_sample_with_zeros() -> None:
    torch.manual_seed(0)
    out, _ = _augment(RGB, {"op": "cutout", "size": 0.25, "p": 1.0})(torch.ones(64, 3, 16, 16), torch.zeros(64).long())
    for image in out:
        rows, cols = torch.nonzero(image[0] == 0, as_tuple=True)
        assert 1 <= len(rows) <= 16  # a 4 x 4 square, clipped at the border
        assert len(rows) == (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert torch.equal(image[0] == 0, image[2] == 0)  # every channel


def test_mixup_mixes_each_sample_with_its_partner_in_a_permutation_by_its_own_weight() -> None:
    torch.manual_seed(0)
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()  # image i is all i
    out, soft = _augment(RGB.model_copy(update={"n_classes": n}), {"op": "mixup", "alpha": 1.0})(x, torch.arange(n))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(n))
    partners = []
    for i in range(n):
        others = [c for c in torch.nonzero(soft[i]).flatten().tolist() if c != i]
        assert len(others) <= 1
        partner = others[0] if others else i
        partners.append(partner)
        torch.testing.assert_close(out[i], torch.full_like(out[i], soft[i, i] * i + soft[i, partner] * partner))
    assert sorted(partners) == list(range(n))  # a permutation of the batch
    assert len({round(float(soft[i, i]), 4) for i in range(n)}) > n // 2  # each sample its own weight


def test_cutmix_weights_the_targets_by_the_pasted_area() -> None:
    torch.manual_seed(0)
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()
    out, soft = _augment(RGB.model_copy(update={"n_classes": n}), {"op": "cutmix"})(x, torch.arange(n))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(n))
    kept = []
    for i in range(n):
        assert set(out[i].unique().tolist()) <= {float(c) for c in torch.nonzero(soft[i]).flatten().tolist()}
        if not torch.equal(out[i], x[i]) or soft[i, i] < 1:  # paired with itself: nothing to see
            kept.append(round(float((out[i] == i).float().mean()), 4))
            torch.testing.assert_close(soft[i, i], (out[i] == i).float().mean())
    assert len(set(kept)) > len(kept) // 2  # each sample its own box


def test_gaussian_noise_leaves_the_one_hot_columns_alone() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(256, 3), torch.nn.functional.one_hot(torch.randint(0, 3, (256,)), 3).float()], dim=1)
    out, _ = _augment(ROWS, {"op": "gaussian_noise", "std": 0.1})(x, torch.zeros(256).long())
    assert torch.equal(out[:, 3:], x[:, 3:])
    assert abs(float((out[:, :3] - x[:, :3]).std()) - 0.1) < 0.01


def test_swap_noise_takes_each_value_from_the_same_column_of_another_row() -> None:
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(6.0), indexing="ij")
    x = 100 * rows + cols  # value = 100 * row + column
    out, _ = _augment(ROWS, {"op": "swap_noise", "p": 0.3})(x, torch.zeros(64).long())
    assert torch.equal(out % 100, cols)  # the same column
    swapped = out != x
    assert 0.2 < float(swapped.float().mean()) < 0.4


def test_every_draw_comes_from_the_global_rng_a_checkpoint_restores() -> None:
    torch.manual_seed(0)
    augment, x, y = _augment(RGB, *IMAGE_OPS), _images(32), torch.arange(32) % 10
    saved = rng_state()
    first = augment(x, y)
    set_rng_state(saved)
    again = augment(x, y)
    other = augment(x, y)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    ("spec", "ops", "match"),
    [
        (ROWS, [{"op": "hflip"}, {"op": "mixup"}], r"train\.augment\.ops: image ops \(hflip\) on table data"),
        (GRAY, [{"op": "swap_noise"}], r"train\.augment\.ops: table ops \(swap_noise\) on image data"),
        (DataSpec(task="language_modeling", input_shape=(16,), n_classes=256), [{"op": "mixup"}],
         r"train\.augment\.ops: augmentation is for classification data, and this data is language modelling"),
    ],
    ids=["image-ops-on-a-table", "table-ops-on-images", "language-modelling"],
)  # fmt: skip
def test_ops_that_do_not_fit_the_data_are_a_config_error(spec: DataSpec, ops: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_augment(AugmentConfig(ops=ops), spec)


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"train": {"augment": {"ops": [{"op": "rotate"}]}}}, r"image ops \(rotate\) on table data"),
        ({"data": DIGITS, "model": CNN, "train": {"augment": {"ops": [{"op": "gaussian_noise"}]}}},
         r"table ops \(gaussian_noise\) on image data"),
        ({"data": {"source": "text", "seq_len": 16}, "model": {"name": "gpt", "n_layer": 1, "n_embd": 16},
          "train": {"augment": {"ops": [{"op": "cutmix"}]}}}, r"this data is language modelling"),
    ],
    ids=["image-ops-on-wine", "table-ops-on-digits", "text"],
)  # fmt: skip
def test_the_preflight_names_ops_that_do_not_fit_in_one_line(sections: dict, match: str, in_tmp: Path) -> None:
    raw = tiny_raw(train=sections.pop("train")) | sections
    with pytest.raises(ConfigError, match=r"^train\.augment\.ops: .*" + match) as caught:
        preflight(config_from_dict(raw))
    assert "\n" not in str(caught.value)


# -------------------------------------------------------------------------------------------- where it applies
@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """One store for the module's digits runs: the data is prepared once."""
    return LocalStore(tmp_path_factory.mktemp("digits"))


def _digits_spec(store: LocalStore, **train: Any) -> TrainingSpec:
    cfg = config_from_dict(tiny_raw(data=DIGITS, train={"max_epochs": 1, "batch_size": 64, **train}) | {"model": CNN})
    return TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))


class _Counting:
    """Wraps an Augment and counts its calls."""

    def __init__(self, augment: Any):
        self.augment, self.calls = augment, 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.augment(x, y)


def test_training_augments_each_micro_batch_and_validation_never(digits_store: LocalStore) -> None:
    store = digits_store
    spec = _digits_spec(store, grad_accum_steps=2, augment={"ops": [{"op": "rotate"}, {"op": "mixup"}]})
    trainer = build_trainer(spec, store)
    assert trainer.augment is not None
    trainer.augment = counting = _Counting(trainer.augment)
    trainer.validate()
    assert counting.calls == 0
    trainer.fit()  # one epoch, then validation
    assert counting.calls == len(trainer.loaders.train)
    model = build_trainer(spec, store).module
    assert build_trainer(spec, store, model=model).augment is None  # a pre-built (pruned) model's fine-tune


@pytest.mark.parametrize("in_lr_range_test", [False, True])
def test_the_lr_range_test_sweeps_plain_data_unless_asked(digits_store, monkeypatch, in_lr_range_test: bool) -> None:
    store = digits_store
    import trainflow.core.lr_range_test as stage
    from trainflow.core.config import LRRangeTestConfig

    seen = []

    def sweep(trainer: Any, *args: Any) -> Any:
        seen.append(trainer.augment)
        return real_sweep(trainer, *args)

    real_sweep = stage.lr_sweep
    monkeypatch.setattr(stage, "lr_sweep", sweep)
    spec = _digits_spec(store, augment={"ops": [{"op": "cutout"}], "in_lr_range_test": in_lr_range_test})
    stage.lr_range_test(LRRangeTestConfig(num_steps=20, skip_start=1, skip_end=1), spec, store, f"lr{in_lr_range_test}")
    assert (seen[0] is not None) == in_lr_range_test


def test_a_sigkilled_augmented_run_resumes_to_the_uninterrupted_weights(digits_store: LocalStore) -> None:
    store = digits_store
    augment = {"ops": [*IMAGE_OPS[:3], {"op": "cutout", "p": 1.0}, {"op": "mixup"}, {"op": "cutmix"}]}
    train_cfg = {"max_epochs": 2, "batch_size": 128, "augment": augment, "checkpoint": {"every_steps": 3},
                 "early_stopping": {"enabled": False}}  # fmt: skip
    raw = tiny_raw(data=DIGITS, train=train_cfg) | {"model": CNN}
    cfg = config_from_dict(raw)
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    full = train(spec, store, "full")
    kill = full.steps // 2 + 1  # mid-epoch, two steps after a checkpoint
    run = subprocess.run([sys.executable, "-m", "tests.core.finetune_support", json.dumps(raw), str(store.root),
                          "killed", str(kill)], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == -9, run.stderr[-2000:]
    resumed = train(spec, store, "killed")
    assert resumed.resumed_from_step is not None and 0 < resumed.resumed_from_step < kill
    full_weights = load_checkpoint(store.local_path(full.checkpoint_uri))["model"]
    resumed_weights = load_checkpoint(store.local_path(resumed.checkpoint_uri))["model"]
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- the search
def test_the_search_tunes_the_strength(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainflow.core.training.builder as builder
    from tests.core.hpo_support import search

    strengths = []

    def recording(cfg: AugmentConfig, spec: DataSpec) -> Any:
        strengths.append(cfg.strength)
        return build_augment(cfg, spec)

    monkeypatch.setattr(builder, "build_augment", recording)
    space = {"train.augment.strength": {"type": "float", "low": 0.0, "high": 2.0}}
    hpo = {"enabled": True, "sampler": "random", "pruner": "none", "max_epochs_per_trial": 1, "seed": 0,
           "n_trials": 2, "space": space}  # fmt: skip
    raw = tiny_raw(train={"augment": {"ops": [{"op": "gaussian_noise"}, {"op": "swap_noise"}]}},
                   tune={"lr_range_test": {"enabled": False}, "hpo": hpo})  # fmt: skip
    result = search(config_from_dict(raw), store, None)
    assert len(strengths) == 2 and len(set(strengths)) == 2 and all(0 <= s <= 2 for s in strengths)
    assert math.isclose(result.best_params["train.augment.strength"], strengths[result.best_trial], rel_tol=1e-9)
    too_far = {"train.augment.strength": {"type": "float", "low": 0.0, "high": 3.0}}
    with pytest.raises(ConfigError, match=r"tune\.hpo\.space\.train\.augment\.strength: high 3\.0 is not a valid"):
        config_from_dict(tiny_raw(tune={"hpo": hpo | {"space": too_far}}))
