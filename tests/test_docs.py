"""The documentation stays navigable and true to the schema: the committed config reference is what the schema
generates, the README stays a front page, every page is in the site's nav and every relative link resolves.
Fast checks only; `make docs` builds the site itself (mkdocs build --strict)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainflow.core.config import reference
from trainflow.core.config.reference import COMMAND, config_reference

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", *DOCS.rglob("*.md")])
README_MAX_LINES = 200
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_the_committed_config_reference_is_what_the_schema_generates() -> None:
    committed = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    generated = config_reference()
    if committed != generated:
        old, new = committed.splitlines(), generated.splitlines()
        line = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/reference/config.md is stale from line {line + 1}; regenerate it with `{COMMAND}`")


def test_check_fails_on_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "config.md"
    monkeypatch.setattr(reference, "PAGE", page)
    assert reference.main(["--check"]) == 1  # missing
    assert reference.main([]) == 0 and page.read_text(encoding="utf-8") == config_reference()
    assert reference.main(["--check"]) == 0
    page.write_text(page.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert reference.main(["--check"]) == 1


def test_the_reference_generator_loads_no_heavy_library() -> None:
    code = (
        "import sys, trainflow.core.config.reference; print(sorted({'torch', 'prefect', 'mlflow'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_readme_is_a_front_page() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    nav = _nav_files(config["nav"])
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert missing == [], f"mkdocs.yml names pages that do not exist: {missing}"
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, f"pages not in mkdocs.yml's nav: {sorted(set(pages) - set(nav))}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == [], f"{page.relative_to(REPO)}: {broken}"


def _nav_files(nav: Any) -> list[str]:
    """Every page a nav names, at any depth (`- Title: page.md`, `- page.md`, sections of either)."""
    if isinstance(nav, str):
        return [nav]
    items = nav.values() if isinstance(nav, dict) else nav
    return [page for item in items for page in _nav_files(item)]


def _without_fences(text: str) -> str:
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.DOTALL | re.MULTILINE)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _anchors(page: Path) -> set[str]:
    """The ids MkDocs (Python-Markdown's toc) and GitHub give the page's headings."""
    text = _without_fences(page.read_text(encoding="utf-8"))
    return {reference._slug(heading) for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)}
