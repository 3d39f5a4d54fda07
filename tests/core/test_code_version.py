"""The code versions in the stage cache key: what trainflow's stage code and a user's `model.factory` run, not
their text; and a factory edited in a running process builds the edited model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from trainflow.core import models
from trainflow.core.config import FactoryModelConfig
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import ConfigError
from trainflow.core.models import build_model
from trainflow.core.storage.version import code_version, model_code_version, source_digest

SPEC = DataSpec(task="classification", input_shape=(3,), n_classes=2)
FACTORY = '''\
"""A factory of tiny models."""

from torch import nn

LABEL = "tiny"


class Tiny(nn.Linear):
    """A linear layer."""


async def warm_up() -> None:
    """Nothing to warm."""


def build(spec, width: int = 4) -> nn.Module:
    """One layer of `width` outputs."""
    return Tiny(spec.input_shape[0], width)  # the width is what the tests edit
'''
SAME_CODE = [  # (old, new) text edits that leave what runs alone
    pytest.param("# the width is what the tests edit", "# another comment", id="comment"),
    pytest.param('"""A factory of tiny models."""', '"""Tiny models,\n\nover lines."""', id="module docstring"),
    pytest.param('"""A linear layer."""', "'''Edited.'''", id="class docstring"),
    pytest.param('"""Nothing to warm."""', '"""Edited."""', id="async function docstring"),
    pytest.param('    """One layer of `width` outputs."""\n', "", id="function docstring removed"),
    pytest.param("\n\ndef build", "\n\n\n\n# moved down\n\ndef build", id="blank lines and moved lines"),
    pytest.param("Tiny(spec.input_shape[0], width)", "Tiny( spec.input_shape[0],width )", id="spaces in a line"),
]
NEW_CODE = [  # (old, new) text edits that change what runs
    pytest.param("width: int = 4", "width: int = 16", id="default"),
    pytest.param("Tiny(spec.input_shape[0], width)", "Tiny(spec.input_shape[0], width, bias=False)", id="call"),
    pytest.param('LABEL = "tiny"', 'LABEL = "small"', id="string that is data"),
    pytest.param('    """Nothing to warm."""\n', '    """Nothing to warm."""\n    return None\n', id="statement added"),
]
HEX16 = r"[0-9a-f]{16}"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable folder for this test's modules (each test names its own), with a digest cache of its own;
    its modules are dropped from sys.modules afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_FACTORY_VERSIONS", {})
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    yield code
    names = {path.stem for path in code.iterdir()}
    for name in [name for name in sys.modules if name.partition(".")[0] in names]:
        del sys.modules[name]


def write(path: Path, text: str, *, age_s: float = 0) -> Path:
    path.write_text(text)
    if age_s:  # old enough for its digest to be cached: the tests then pass through the cache
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path


@pytest.mark.parametrize(("old", "new"), SAME_CODE)
def test_a_comment_docstring_or_layout_edit_keeps_the_digest(tmp_path: Path, old: str, new: str) -> None:
    path = write(tmp_path / "factory.py", FACTORY)
    before = source_digest(path)
    write(path, FACTORY.replace(old, new, 1))
    assert path.read_text() != FACTORY
    assert source_digest(path) == before


@pytest.mark.parametrize(("old", "new"), NEW_CODE)
def test_a_code_edit_changes_the_digest(tmp_path: Path, old: str, new: str) -> None:
    path = write(tmp_path / "factory.py", FACTORY)
    before = source_digest(path)
    write(path, FACTORY.replace(old, new, 1))
    assert source_digest(path) != before


def test_a_file_that_does_not_parse_is_hashed_as_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.py", "def build(:\n")
    before = source_digest(path)
    write(path, "def build(:  # a comment\n")
    assert source_digest(path) != before


def test_the_code_version_is_stable_with_and_without_the_digest_cache(tmp_path: Path) -> None:
    """Computed from scratch (empty cache), then from the digests that run left: the same, and this process's."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = [sys.executable, "-c", "from trainflow.core.storage.version import code_version; print(code_version())"]
    cold, cached = (subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout for _ in range(2))
    assert re.fullmatch(HEX16, code_version())
    assert cold.strip() == cached.strip() == code_version()
    assert list((tmp_path / "cache" / "trainflow").glob("source-digests.*.json")), "the digests were not kept"


@pytest.mark.parametrize("age_s", [0, 3600], ids=["just written", "digest cached"])
def test_a_plain_module_factory_is_versioned_by_what_its_file_runs(folder: Path, age_s: float) -> None:
    path = write(folder / f"plain_factory_{age_s}.py", FACTORY, age_s=age_s)
    factory = f"{path.stem}:build"
    first = model_code_version(factory)
    assert re.fullmatch(f"sha256:{HEX16}", first)
    assert model_code_version(factory) == first
    write(path, FACTORY.replace("# the width is what the tests edit", "# edited"))
    assert model_code_version(factory) == first
    write(path, FACTORY.replace("width: int = 4", "width: int = 5"))
    assert model_code_version(factory) != first


def test_a_package_factory_is_versioned_by_all_its_files(folder: Path) -> None:
    """Editing a sibling of the factory's module changes the version: the factory may import it."""
    package = folder / "package_factory"
    package.mkdir()
    write(package / "__init__.py", "")
    write(package / "models.py", "from package_factory.layers import WIDTH\n", age_s=3600)
    sibling = write(package / "layers.py", '"""Layer sizes."""\nWIDTH = 4\n', age_s=3600)
    first = model_code_version("package_factory.models:build")
    assert re.fullmatch(f"sha256:{HEX16}", first)
    write(sibling, '"""The layer sizes."""\n\nWIDTH = 4  # outputs\n')
    assert model_code_version("package_factory.models:build") == first
    write(sibling, '"""Layer sizes."""\nWIDTH = 8\n')
    edited = model_code_version("package_factory.models:build")
    assert edited != first
    write(package / "extra.py", "")
    assert model_code_version("package_factory.models:build") != edited, "a new file is part of the package"


@pytest.mark.parametrize(
    ("factory", "distribution"),
    [("sklearn.linear_model:LogisticRegression", "scikit-learn"), ("torch.nn:Linear", "torch")],
)
def test_an_installed_factory_is_versioned_by_its_distribution(factory: str, distribution: str) -> None:
    assert model_code_version(factory) == f"{distribution}=={version(distribution)}"


def test_a_missing_factory_module_is_a_config_error() -> None:
    message = r"model\.factory: cannot import 'no_such_factory\.models:build' \(No module named 'no_such_factory'\)"
    with pytest.raises(ConfigError, match=f"^{message}$"):
        model_code_version("no_such_factory.models:build")


def test_a_factory_edited_in_a_running_process_builds_the_edited_model(folder: Path) -> None:
    path = write(folder / "edited_factory.py", FACTORY)
    cfg = FactoryModelConfig(factory="edited_factory:build")
    assert build_model(cfg, SPEC).out_features == 4
    # a different size: Python trusts a .pyc whose source has the same size and mtime second
    write(path, FACTORY.replace("width: int = 4", "width: int = 16"))
    assert build_model(cfg, SPEC).out_features == 16


def test_a_factory_package_edited_in_a_running_process_builds_the_edited_model(folder: Path) -> None:
    """The edit is in a sibling module the factory imports: the whole package is imported again."""
    package = folder / "edited_package"
    package.mkdir()
    write(package / "__init__.py", "")
    write(package / "layers.py", "WIDTH = 4\n")
    write(
        package / "models.py",
        "from torch import nn\n\nfrom edited_package.layers import WIDTH\n\n\n"
        "def build(spec):\n    return nn.Linear(spec.input_shape[0], WIDTH)\n",
    )
    cfg = FactoryModelConfig(factory="edited_package.models:build")
    assert build_model(cfg, SPEC).out_features == 4
    write(package / "layers.py", "WIDTH = 16\n")
    assert build_model(cfg, SPEC).out_features == 16
