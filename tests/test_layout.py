"""The layering rules of ../shared/design.md, read from the sources' imports.

Stages are the core modules with a Prefect task of the same name (`core/<stage>.py` + `tasks/<stage>.py`).
A stage never imports another stage, a subpackage of core never imports a stage (shared code lives
below the stages), core never imports Prefect, and imports point down: flows -> tasks -> core.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE, TASKS = REPO / "core", REPO / "tasks"
STAGES = sorted(({p.stem for p in CORE.glob("*.py")} & {p.stem for p in TASKS.glob("*.py")}) - {"__init__"})
PIPELINE = ["prepare_data", "lr_range_test", "hpo_search", "train", "evaluate", "compress", "publish"]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included), named as in the checkout
    (`trainflow.core.x` -> `core.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name.removeprefix("trainflow.") for name in found}


def test_the_stages_are_the_pipeline() -> None:
    assert sorted(PIPELINE) == STAGES


def test_the_top_of_core_is_the_stages_and_what_they_share() -> None:
    """The rest lives in subpackages named for what they hold (the report and `trainflow compare`: core/report/)."""
    shared = {"__init__", "records", "preflight", "errors"}
    assert {p.stem for p in CORE.glob("*.py")} == set(PIPELINE) | shared


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage: str) -> None:
    others = {f"core.{other}" for other in STAGES if other != stage}
    assert imported_modules(CORE / f"{stage}.py") & others == set()


@pytest.mark.parametrize(
    "path", sorted(p for p in CORE.rglob("*.py") if p.parent != CORE), ids=lambda p: str(p.relative_to(REPO))
)
def test_no_subpackage_depends_on_a_stage(path: Path) -> None:
    stages = {f"core.{stage}" for stage in STAGES}
    assert imported_modules(path) & stages == set()


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_core_never_imports_prefect_or_the_layers_above(path: Path) -> None:
    above = {m for m in imported_modules(path) if m.split(".")[0] in ("prefect", "tasks", "flows", "deployments")}
    assert above == set()


@pytest.mark.parametrize("path", sorted(TASKS.glob("*.py")), ids=lambda p: p.name)
def test_tasks_never_import_flows(path: Path) -> None:
    assert {m for m in imported_modules(path) if m.split(".")[0] in ("flows", "deployments")} == set()


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_is_one_hop_from_its_task(stage: str) -> None:
    """flows/pipeline.py -> tasks/<stage>.py -> core/<stage>.py, and the core module says what it builds on."""
    assert f"core.{stage}" in imported_modules(TASKS / f"{stage}.py")
    assert f"tasks.{stage}" in imported_modules(REPO / "flows" / "pipeline.py")
    docstring = ast.get_docstring(ast.parse((CORE / f"{stage}.py").read_text(encoding="utf-8")))
    assert docstring and docstring.startswith(f"The {stage} stage")


def test_every_core_folder_is_a_package_with_a_docstring() -> None:
    for folder in [CORE, *(p for p in CORE.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} has no __init__.py (setuptools would not ship it)"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} says nothing"


def _project_imports(path: Path) -> set[str]:
    """The project modules `path` imports at run time: function-level imports count (they hide a cycle, they do
    not remove it); imports under `if TYPE_CHECKING:` do not (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                setattr(node, field, [n for n in body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in
                                                             ast.unparse(n.test))])  # fmt: skip
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name.removeprefix("trainflow.") for name in found}


def _module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolved to the deepest module that exists)."""
    files = {}
    for folder in ("core", "tasks", "flows", "deployments"):
        for path in (REPO / folder).rglob("*.py"):
            files[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _project_imports(path):
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_cycle_anywhere() -> None:
    """A cycle (function-level imports included) is the sign of a split by line count, not by responsibility."""
    import graphlib

    try:
        tuple(graphlib.TopologicalSorter(_module_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The check above could not fail if the graph missed function-level imports: a planted one is found."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from trainflow.core.records import StageResult\n")
    assert "core.records" in _project_imports(planted)
    typing_only = tmp_path / "typing_only.py"
    typing_only.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trainflow.core.records\n")
    assert "core.records" not in _project_imports(typing_only)


TRAINING_SECTIONS = {"ModelConfig", "OptimConfig", "TrainConfig", "LoaderConfig", "DataConfig"}


@pytest.mark.parametrize(
    "path",
    [*sorted(TASKS.glob("*.py")), *(CORE / f"{stage}.py" for stage in PIPELINE), REPO / "flows" / "pipeline.py",
     CORE / "training" / "fit.py", CORE / "training" / "builder.py", CORE / "tuning" / "hpo_worker.py"],
    ids=lambda p: str(p.relative_to(REPO)),
)  # fmt: skip
def test_training_settings_travel_in_the_spec_not_in_signatures(path: Path) -> None:
    """A new training setting is a schema field plus the one place that uses it: the stages, their tasks, the
    flow, the fit routine and the HPO worker take the `TrainingSpec`, never the sections it is resolved from."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in [*node.args.args, *node.args.kwonlyargs]:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if set(annotation.replace("|", " ").split()) & TRAINING_SECTIONS or arg.arg == "seed":
                    found.append(f"{node.name}({arg.arg}: {annotation})")
    allowed = {"prepare_data_task(data_cfg: DataConfig)", "prepare_data_task(seed: int)",
               "prepare_data(cfg: DataConfig)", "prepare_data(seed: int)"}  # fmt: skip
    assert set(found) - allowed == set()


STAGE_ONLY_LIBRARIES = ("onnx", "onnxruntime", "sklearn", "optuna", "torch._dynamo")


def test_loading_the_pipeline_loads_no_library_only_a_stages_work_needs() -> None:
    """A fully cached run imports the flow but runs no stage: ONNX, scikit-learn, Optuna and torch._dynamo
    (about 4 s of imports on 2 cores) load when a stage that needs them runs (tasks/__init__.py)."""
    code = f"import sys, trainflow.flows.pipeline; print([m for m in {STAGE_ONLY_LIBRARIES!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
