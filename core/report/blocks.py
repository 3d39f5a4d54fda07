"""What a report is made of: sections of text, tables, images and code, independent of the output format,
and `Sources`, which reads the run's artifacts and metrics, turns a missing one into a line of the report
(and a warning) instead of a failed run, and keeps what the report makes itself (its plots, the HPO trials
table) in the store, so the report of a re-run whose inputs did not change reads them back."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from trainflow.core.errors import TrainflowError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from trainflow.core.storage.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text (escaped on output; `**bold**` is the only markup)."""

    text: str


@dataclass(frozen=True)
class Table:
    """Rows of text cells; `align` gives each column's alignment, `l` or `r` (missing: left)."""

    header: list[str]
    rows: list[list[str]]
    align: str = ""

    def right(self, column: int) -> bool:
        return self.align[column : column + 1] == "r"


@dataclass(frozen=True)
class Image:
    """A PNG: a file next to report.md, a base64 data URI in report.html. `name` is its unique file stem."""

    name: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Code:
    """A preformatted block: a fenced block in Markdown, a collapsed <details> block in HTML."""

    title: str
    text: str
    language: str = ""


Block = Text | Table | Image | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Section:
        self.blocks.extend(blocks)
        return self


@dataclass(frozen=True)
class Report:
    title: str
    sections: list[Section]

    def images(self) -> list[Image]:
        return [block for section in self.sections for block in section.blocks if isinstance(block, Image)]


def facts(pairs: dict[str, Any]) -> Table:
    """A two-column table of named values (None left out)."""
    return Table(["", "value"], [[name, fmt(value)] for name, value in pairs.items() if value is not None])


def fmt(value: Any) -> str:
    """A value as report text: floats to 4 significant digits, containers as compact JSON."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEPT_DIR = "report/kept"  # store folder of what reports made: <stem>-<digest of name, inputs, code>.<suffix>


class Sources:
    """Reads the run's artifacts (through the store) and MLflow data; each failure becomes a report line.

    A report is written after every stage succeeded, so an artifact that cannot be read (deleted, a lost
    S3 object, a metric history the server will not give) is reported, never raised.
    """

    def __init__(self, store: ArtifactStore, client: MlflowClient):
        self.store, self.client = store, client

    def bytes(self, uri: str, what: str, section: Section) -> bytes | None:
        try:
            return self.store.local_path(uri).read_bytes()
        except (OSError, TrainflowError) as exc:
            return self.missing(section, what, uri, exc)

    def png(self, uri: str, name: str, caption: str, section: Section) -> None:
        """Add the store's PNG at `uri` to `section` as an image, or a line saying it is missing."""
        data = self.bytes(uri, caption, section)
        if data is None:
            return
        if not data.startswith(PNG_SIGNATURE):
            self.missing(section, caption, uri, ValueError("not a PNG file"))
            return
        section.add(Image(name, data, caption))

    def json(self, uri: str, what: str, section: Section) -> Any | None:
        data = self.bytes(uri, what, section)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            return self.missing(section, what, uri, exc)

    def metric_history(self, run_id: str, section: Section) -> dict[str, list[tuple[int, float]]]:
        """Every metric of an MLflow run as (step, value) pairs in step order; {} (and a line) on failure."""
        try:
            keys = sorted(self.client.get_run(run_id).data.metrics)
            history = {key: self.client.get_metric_history(run_id, key) for key in keys}
        except MlflowException as exc:
            self.missing(section, "the metric history", f"MLflow run {run_id}", exc)
            return {}
        return {key: sorted((m.step, m.value) for m in metrics) for key, metrics in history.items()}

    def kept(self, name: str, inputs: Any, make: Callable[[], bytes | None]) -> bytes | None:
        """What `make()` returns for `inputs`, made once: kept in the store under a digest of `name`, `inputs`
        (JSON) and the report's code, and read back while those are unchanged. A re-run's report then neither
        imports matplotlib nor draws (about 2 s of a cached run's 3 s), nor opens the HPO study again.

        `inputs` must determine what `make` returns. None (nothing made) is not kept; an exception from `make`
        propagates. A store that cannot be read or written costs only the time: `make` runs, the report goes on."""
        text = json.dumps([name, inputs, _report_code()], sort_keys=True, default=str)
        stem, dot, suffix = name.partition(".")
        key = f"{KEPT_DIR}/{stem}-{hashlib.sha256(text.encode()).hexdigest()[:24]}{dot}{suffix}"
        try:
            uri = self.store.uri_for(key)
            if self.store.exists(uri):
                return self.store.local_path(uri).read_bytes()
        except (OSError, TrainflowError) as exc:
            log.warning("report: %s not read back from the store (%s)", name, exc)
        made = make()
        if made is None:
            return None
        try:
            self.store.put_bytes(made, key)
        except (OSError, TrainflowError) as exc:
            log.warning("report: %s not kept in the store (%s)", name, exc)
        return made

    @staticmethod
    def missing(section: Section, what: str, where: str, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log.warning("report: %s: %s is missing (%s): %s", section.title, what, where, reason)
        section.add(Text(f"missing: {what} ({where}): {reason}"))


@functools.cache
def _report_code() -> str:
    """A digest of this package's modules: a change to how the report draws or tabulates makes things anew."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()
