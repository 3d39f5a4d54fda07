"""load_config / config_from_dict: every problem is one line naming its YAML path and the bad value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from trainflow.core.config import config_from_dict, load_config
from trainflow.core.config.overrides import parse_override
from trainflow.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA = {"data": {"source": "sklearn", "name": "wine"}}  # every config must name its data


def _write(path: Path, text: str) -> None:
    """A config file with `text`, given a data section when `text` is a mapping without one."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    prefix = "data: {source: sklearn, name: wine}\n" if isinstance(parsed, dict) and "data" not in parsed else ""
    path.write_text(prefix + text, encoding="utf-8")


# (id, config file text or None for no file, --set overrides, the whole one-line message as a regex)
BAD_CONFIGS = [
    (
        "unknown key, did you mean",
        "train: {bach_size: 32}",
        [],
        r"config\.yaml: train\.bach_size: unknown key; did you mean batch_size\?",
    ),
    (
        "unknown section, did you mean",
        "trian: {max_epochs: 3}",
        [],
        r"config\.yaml: trian: unknown key; did you mean train\?",
    ),
    (
        "unknown key, no close match lists the allowed keys",
        "optim: {zzz: 1}",
        [],
        r"config\.yaml: optim\.zzz: unknown key; allowed keys: betas, eps, lr, min_lr_ratio, momentum, name, "
        r"nesterov, schedule, trust_coefficient, warmup_steps, weight_decay",
    ),
    (
        "wrong type",
        "train: {batch_size: abc}",
        [],
        r"config\.yaml: train\.batch_size: 'abc': input should be a valid integer, unable to parse string as an "
        r"integer \(or one of auto\)",
    ),
    (
        "section given as a scalar",
        "data: digits",
        [],
        r"config\.yaml: data: 'digits': expected a section \(a mapping of keys to values\)",
    ),
    (
        "out of range, >=",
        "train: {batch_size: 0}",
        [],
        r"config\.yaml: train\.batch_size: 0 must be >= 1 \(or one of auto\)",
    ),
    ("out of range, >", "optim: {lr: -0.5}", [], r"config\.yaml: optim\.lr: -0\.5 must be > 0\.0 \(or one of auto\)"),
    (
        "out of range in a list",
        "model: {name: mlp, hidden_sizes: [8, 0]}",
        [],
        r"config\.yaml: model\.hidden_sizes\.1: 0 must be >= 1",
    ),
    (
        "bad literal",
        "train: {precision: fp8}",
        [],
        r"config\.yaml: train\.precision: 'fp8' is not one of fp32, bf16, fp16",
    ),
    (
        "bad literal, nested section",
        "train: {early_stopping: {mode: up}}",
        [],
        r"config\.yaml: train\.early_stopping\.mode: 'up' is not one of min, max",
    ),
    (
        "unknown model name",
        "model: {name: resnet}",
        [],
        r"config\.yaml: model\.name: 'resnet' is not one of mlp, cnn, gpt, factory",
    ),
    (
        "unknown data source",
        "data: {source: s3}",
        [],
        r"config\.yaml: data\.source: 's3' is not one of sklearn, csv, parquet, text, synthetic, image_folder, "
        r"text_folder",
    ),
    (
        "csv without target",
        "data: {source: csv, path: table.csv}",
        [],
        r"config\.yaml: data\.target: required but missing",
    ),
    (
        "csv without path",
        "data: {source: csv, target: label}",
        [],
        r"config\.yaml: data\.path: required but missing",
    ),
    (
        "persistent_workers without workers",
        "data: {loader: {persistent_workers: true}}",
        [],
        r"config\.yaml: data\.loader: persistent_workers=true needs num_workers > 0",
    ),
    (
        "val + test fractions leave too little training data",
        "data: {val_fraction: 0.5, test_fraction: 0.45}",
        [],
        r"config\.yaml: data: val_fraction \+ test_fraction = 0\.95 must be < 0\.9",
    ),
    (
        "gpt width not divisible by heads",
        "model: {name: gpt, n_embd: 100, n_head: 3}",
        [],
        r"config\.yaml: model: n_embd=100 is not divisible by n_head=3",
    ),
    (
        "adamw betas out of range",
        "optim: {betas: [0.9, 1.5]}",
        [],
        r"config\.yaml: optim: betas \[0\.9, 1\.5\] must each be in \[0, 1\)",
    ),
    (
        "bad factory string",
        "model: {name: factory, factory: os.path}",
        [],
        r"config\.yaml: model\.factory: 'os\.path' is not of the form 'package\.module:function'",
    ),
    (
        "bad device string",
        "train: {device: gpu}",
        [],
        r"config\.yaml: train\.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps",
    ),
    (
        "unsupported store uri",
        "store: {uri: 'gs://bucket/artifacts'}",
        [],
        r"config\.yaml: store\.uri: 'gs://bucket/artifacts': only local folders and s3://bucket\[/prefix\] are "
        r"supported as artifact store",
    ),
    (
        "bad publish name",
        "publish: {name: my model}",
        [],
        r"config\.yaml: publish\.name: 'my model': string should match pattern .*",
    ),
    (
        "top level is a list",
        "- train\n- model\n",
        [],
        r"config\.yaml: expected a mapping of sections at the top level, found list",
    ),
    (
        "top level is a string",
        "just words\n",
        [],
        r"config\.yaml: expected a mapping of sections at the top level, found str",
    ),
    (
        "invalid YAML syntax",
        "seed: 0\ntrain: batch_size: 32\nmodel: {name: mlp}",
        [],
        r"config\.yaml: line 2: invalid YAML: mapping values are not allowed here",
    ),
    (
        "invalid YAML, tab indent",
        "train:\n\tbatch_size: 3\n",
        [],
        r"config\.yaml: line 2: invalid YAML: found character '\\t' .*",
    ),
    ("missing config file", None, [], r"config\.yaml: config file not found"),
    (
        "bad --set syntax, no =",
        "seed: 0",
        ["train.batch_size"],
        r"--set train\.batch_size: expected section\.key=value",
    ),
    (
        "bad --set syntax, bad key",
        "seed: 0",
        ["train..batch_size=3"],
        r"--set train\.\.batch_size=3: expected section\.key=value",
    ),
    ("--set into a value", "seed: 0", ["seed.a=1"], r"--set seed\.a=1: seed is a value, not a section"),
    (
        "--set into a value the file leaves at its default",
        "train: {max_epochs: 3}",
        ["seed.a=1"],
        r"--set: seed: a mapping: input should be a valid integer",
    ),
    (
        "--set bad value",
        "train: {batch_size: 32}",
        ["train.batch_size=lots"],
        r"--set: train\.batch_size: 'lots': input should be a valid integer, unable to parse string as an integer "
        r"\(or one of auto\)",
    ),
    (
        "--set unknown key",
        "seed: 0",
        ["train.bach_size=32"],
        r"--set: train\.bach_size: unknown key; did you mean batch_size\?",
    ),
]


@pytest.mark.parametrize(
    ("text", "overrides", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_is_one_line_naming_path_and_value(
    in_tmp: Path, text: str | None, overrides: list[str], message: str
) -> None:
    if text is not None:
        _write(in_tmp / "config.yaml", text + "\n")
    with pytest.raises(ConfigError, match=f"^{message}$") as caught:
        load_config("config.yaml", overrides)
    assert len(caught.value.problems) == 1
    assert "\n" not in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_unreadable_config_file_names_it(in_tmp: Path) -> None:
    (in_tmp / "config.yaml").write_bytes(b"\xff\xfe\x00seed: 0\n")
    with pytest.raises(ConfigError, match=r"^config\.yaml: cannot read config file \('utf-8' codec can't decode .*\)$"):
        load_config("config.yaml")


def test_config_path_that_is_a_folder(in_tmp: Path) -> None:
    (in_tmp / "config.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"^config\.yaml: cannot read config file \(.*Is a directory.*\)$"):
        load_config("config.yaml")


def test_every_problem_is_reported_on_its_own_line(in_tmp: Path) -> None:
    _write(
        in_tmp / "config.yaml",
        "seed: -1\n"
        "model: {name: mlp, dropout: 1.5}\n"
        "train: {precision: fp8, bach_size: 3, device: gpu}\n"
        "store: {uri: 'gs://bucket'}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml")
    expected = {
        "config.yaml: seed: -1 must be >= 0",
        "config.yaml: model.dropout: 1.5 must be < 1.0",
        "config.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16",
        "config.yaml: train.bach_size: unknown key; did you mean batch_size?",
        "config.yaml: train.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps",
        "config.yaml: store.uri: 'gs://bucket': only local folders and s3://bucket[/prefix] are supported as artifact "
        "store",
    }
    assert set(caught.value.problems) == expected
    assert len(caught.value.problems) == len(expected)
    assert str(caught.value).splitlines() == caught.value.problems


def test_file_and_set_problems_are_told_apart(in_tmp: Path) -> None:
    _write(in_tmp / "config.yaml", "train: {precision: fp8}\n")
    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml", ["train.batch_size=0", "optim.lr=big"])
    assert set(caught.value.problems) == {
        "config.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16",
        "--set: train.batch_size: 0 must be >= 1 (or one of auto)",
        "--set: optim.lr: 'big': input should be a valid number, unable to parse string as a number (or one of auto)",
    }


def test_every_bad_set_item_is_reported(in_tmp: Path) -> None:
    _write(in_tmp / "config.yaml", "seed: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml", ["nokey", "seed.a=1", "train.batch_size=8"])
    assert caught.value.problems == [
        "--set nokey: expected section.key=value",
        "--set seed.a=1: seed is a value, not a section",
    ]


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("train.batch_size=32", ("train", "batch_size"), 32),
        ("train.grad_clip_norm=null", ("train", "grad_clip_norm"), None),
        ("train.grad_clip_norm=0.5", ("train", "grad_clip_norm"), 0.5),
        ("train.resume=false", ("train", "resume"), False),
        ("train.precision=bf16", ("train", "precision"), "bf16"),
        ("model.hidden_sizes=[8,8]", ("model", "hidden_sizes"), [8, 8]),
        ("model.hidden_sizes=[4, 2, 1]", ("model", "hidden_sizes"), [4, 2, 1]),
        ("train.early_stopping.patience=2", ("train", "early_stopping", "patience"), 2),
        ("publish.registered_model_name=a=b", ("publish", "registered_model_name"), "a=b"),
    ],
)
def test_set_values_are_typed_by_yaml(in_tmp: Path, override: str, field: tuple[str, ...], expected: object) -> None:
    _write(in_tmp / "config.yaml", "model: {name: mlp}\ntrain: {batch_size: 64, max_epochs: 3}\n")
    config = load_config("config.yaml", [override])
    value: object = config
    for name in field:
        value = getattr(value, name)
    assert value == expected
    assert type(value) is type(expected)
    assert config.train.max_epochs == 3  # the rest of the file stays as written


def test_set_is_typed_before_validation() -> None:
    """`32` from the command line is the YAML int 32 (strict check: the raw mapping, not pydantic's coercion)."""
    assert parse_override("train.batch_size=32") == (("train", "batch_size"), 32)
    assert parse_override("train.grad_clip_norm=null") == (("train", "grad_clip_norm"), None)
    assert parse_override("model.hidden_sizes=[8,8]") == (("model", "hidden_sizes"), [8, 8])


def test_later_set_wins() -> None:
    config = config_from_dict(DATA, ["train.batch_size=8", "train.batch_size=16"])
    assert config.train.batch_size == 16


def test_config_from_dict_does_not_touch_its_input() -> None:
    raw = DATA | {"train": {"batch_size": 8}}
    config_from_dict(raw, ["train.batch_size=16", "optim.lr=0.1"])
    assert raw == DATA | {"train": {"batch_size": 8}}


def test_sha256_ignores_key_order_formatting_and_spelled_out_defaults(tmp_path: Path) -> None:
    block = tmp_path / "block.yaml"
    _write(
        block,
        "# a comment\nseed: 3\nmodel:\n  name: mlp\n  hidden_sizes:\n    - 16\n    - 8\ntrain:\n  batch_size: 32\n",
    )
    flow = tmp_path / "flow.yaml"
    _write(
        flow,
        "train: {batch_size: 32.0, precision: fp32}\nmodel: {hidden_sizes: [16, 8], name: mlp, activation: gelu}\n"
        "seed: 3\n",
    )
    reference = load_config(block).sha256()
    assert re.fullmatch(r"[0-9a-f]{64}", reference)
    assert load_config(flow).sha256() == reference
    assert load_config(block).sha256() == reference  # deterministic across loads
    assert (
        config_from_dict(
            DATA | {"seed": 3, "model": {"name": "mlp", "hidden_sizes": [16, 8]}}, ["train.batch_size=32"]
        ).sha256()
        == reference
    )


@pytest.mark.parametrize(
    "override",
    ["seed=4", "train.batch_size=33", "model.hidden_sizes=[8,16]", "train.grad_clip_norm=null", "optim.lr=0.003000001"],
)
def test_sha256_changes_with_any_value(override: str) -> None:
    raw = DATA | {"seed": 3, "model": {"name": "mlp", "hidden_sizes": [16, 8]}, "train": {"batch_size": 32}}
    assert config_from_dict(raw, [override]).sha256() != config_from_dict(raw).sha256()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"config\.yaml: the file is empty; a config needs at least a data section \(see configs/\)"),
        (
            "# a truncated file: comments only\n",
            r"config\.yaml: the file is empty; a config needs at least a data sec.*",
        ),
        ("seed: 1\nmodel: {name: mlp}\n", r"config\.yaml: data: required but missing"),
    ],
    ids=["empty", "comments only", "no data section"],
)
def test_a_config_that_names_no_data_is_an_error(in_tmp: Path, text: str, message: str) -> None:
    (in_tmp / "config.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{message}$") as caught:
        load_config("config.yaml")
    assert len(caught.value.problems) == 1
