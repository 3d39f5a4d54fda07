"""The installed package: one import name, `trainflow`, over the checkout's top-level folders.

pyproject.toml maps `trainflow.core` to `core/` and so on (setuptools `package-dir`); its package list must
name every package folder, or a wheel ships without it while the editable install used by the tests still
finds it. The wheel's only top-level name is `trainflow`. (tests/test_cli.py runs the installed command from
outside the checkout and checks that no module loads under a folder's bare name.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"trainflow": "trainflow", "core": "trainflow.core", "tasks": "trainflow.tasks", "flows": "trainflow.flows",
           "deployments": "trainflow.deployments"}  # fmt: skip


def _package_folders() -> set[str]:
    names = set()
    for folder, name in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            names.add(".".join([name, *init.parent.relative_to(REPO / folder).parts]))
    return names


def test_pyproject_lists_every_package_folder_under_trainflow() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    setuptools = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _package_folders()
    assert setuptools["package-dir"] == {name: folder for folder, name in FOLDERS.items()}


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("trainflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"trainflow", wheel.name.split("-py")[0] + ".dist-info"}
    assert "trainflow/core/serving/trainflow_serving.py" in names
    assert "trainflow/flows/cli.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/entry_points.txt").decode()
    assert "trainflow = trainflow.flows.cli:_entry" in entry_points
