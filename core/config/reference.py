"""The config reference page, generated from the schema: every section and field with its type, default and
description; a union section (data sources, zoo models, search-space params) per variant. It walks the pydantic
models, so a new field or section shows up without an edit here.

    python -m trainflow.core.config.reference           # write docs/reference/config.md
    python -m trainflow.core.config.reference --check   # exit 1 if the committed page differs
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from trainflow.core.config.schema import Config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "config.md"
COMMAND = "python -m trainflow.core.config.reference"
INTRO = f"""# Config reference

Every key of a trainflow config, generated from the schema's field descriptions (`core/config/`) by
`{COMMAND}`: do not edit this page by hand, edit the descriptions and regenerate it.
Every section but `data` is optional, and so is every key that shows a default. An unknown key is an error
(with a "did you mean"). How configs are written, overridden and checked: [Configuration](../configuration.md).
"""


class _Pending(NamedTuple):  # a section to write: one model class, or a union's variants, at its path
    path: str
    classes: tuple[type[BaseModel], ...]
    about: str


def config_reference() -> str:
    """The Markdown of docs/reference/config.md for the current schema."""
    return _Reference().page()


class _Reference:
    def __init__(self) -> None:
        self.anchors: dict[tuple[type[BaseModel], ...], str] = {}  # a section (or union) -> its heading's slug
        self.titles: dict[type[BaseModel], str] = {}  # how a link to a section reads: its path, or `key: value`
        self.lines: list[str] = []

    def page(self) -> str:
        self.anchors[(Config,)] = "top-level"
        self._write_all(self._fields(Config, "", "## Top level", "The sections of a config file."))
        return INTRO + "\n" + "\n".join(self.lines).rstrip() + "\n"

    def _write_all(self, pending: list[_Pending]) -> None:
        for item in pending:  # depth first: a section, then the sections first met in it
            self._write_all(self._write(item))

    def _write(self, item: _Pending) -> list[_Pending]:
        if len(item.classes) == 1:
            return self._fields(item.classes[0], item.path, f"## `{item.path}`", item.about)
        key = _discriminator(item.classes)
        self.lines += [f"## `{item.path}`", "", *_paragraph(item.about)]
        self.lines += [f"One of these, chosen by `{key}`: {', '.join(map(self._link, item.classes))}.", ""]
        children: list[_Pending] = []
        for cls in item.classes:  # every variant first, then what they hold, so the headings nest
            children += self._fields(cls, item.path, f"### {_variant_heading(cls, key)}", "")
        return children

    def _fields(self, cls: type[BaseModel], path: str, heading: str, about: str) -> list[_Pending]:
        """Write one section's heading and field list; return the sections first met in its fields."""
        own_doc = cls.__dict__.get("__doc__") if cls is not Config else None
        self.lines += [heading, "", *_paragraph(about), *_paragraph(inspect.cleandoc(own_doc or ""))]
        children: list[_Pending] = []
        for name, field in cls.model_fields.items():
            children += self._register(field.annotation, f"{path}.{name}".lstrip("."), field.description or "")
            self.lines.append(self._field_line(name, field))
        self.lines.append("")
        return children

    def _register(self, annotation: Any, path: str, about: str) -> list[_Pending]:
        """Give every section (or union of sections) not seen before its heading's slug; queue it to be written."""
        found = []
        for classes in _sections_in(annotation):
            if classes in self.anchors:
                continue
            self.anchors[classes] = _slug(path)
            if len(classes) == 1:
                self.titles[classes[0]] = path
            else:
                key = _discriminator(classes)
                for cls in classes:
                    self.titles[cls] = f"{key}: {' | '.join(map(_value, _literals(cls, key)))}"
                    self.anchors[(cls,)] = _slug(_variant_heading(cls, key))
            found.append(_Pending(path, classes, about))
        return found

    def _field_line(self, name: str, field: FieldInfo) -> str:
        parts = [self._type(field.annotation)]
        parts += [_constraints([*field.metadata, *_member_metadata(field.annotation)]), self._default(field)]
        return f"- **`{name}`**: {', '.join(p for p in parts if p)}. {_markdown(field.description or '')}".rstrip()

    def _default(self, field: FieldInfo) -> str:
        if field.is_required():
            return "required"
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):  # a section's default is its fields' defaults; a union's names its variant
            return f"default `{self.titles[type(value)]}`" if len(_sections_in(field.annotation)[0]) > 1 else ""
        return f"default `{_value(value)}`"

    def _type(self, annotation: Any) -> str:
        """`int`, `float | null`, `'a' | 'b'`; sections as links to their headings."""
        parts = [self._part(member) for member in _members(annotation)]
        if any(link for _, link in parts):
            return " | ".join(text if link else f"`{text}`" for text, link in parts)
        return f"`{' | '.join(text for text, _ in parts)}`"

    def _part(self, tp: Any) -> tuple[str, bool]:
        """One union member as (text, is Markdown with links)."""
        origin, args = get_origin(tp), get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self._link(tp), True
        if origin is Literal:
            return " | ".join(f"'{value}'" if isinstance(value, str) else _value(value) for value in args), False
        if tp is type(None):
            return "null", False
        if tp is Any:
            return "any", False
        if origin in (list, tuple, dict):
            inner = [self._type(arg) for arg in args]
            if origin is dict and any("](#" in text for text in inner):
                return f"mapping of {inner[0]} to {inner[1]}", True
            text = ", ".join(arg.strip("`") for arg in inner)
            return (f"[{text}]" if origin is tuple else f"{origin.__name__}[{text}]"), False
        return getattr(tp, "__name__", str(tp)), False

    def _link(self, cls: type[BaseModel]) -> str:
        return f"[`{self.titles[cls]}`](#{self.anchors[(cls,)]})"


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a type, Annotated layers stripped (`float | None` -> [float, NoneType])."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        members: list[Any] = []
        for arg in get_args(annotation):
            members += [m for m in _members(arg) if m not in members]
        return members
    return [annotation]


def _member_metadata(annotation: Any) -> list[Any]:
    """Constraints written on a union's members, such as `Annotated[float, Field(gt=0)] | Literal['auto']`."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    found = [meta for member in members if get_origin(member) is Annotated for meta in get_args(member)[1:]]
    return [item for meta in found for item in (meta.metadata if isinstance(meta, FieldInfo) else [meta])]


def _sections_in(annotation: Any) -> list[tuple[type[BaseModel], ...]]:
    """The sections a field's type holds: one model, or the models of a union, also inside list/dict."""
    members = _members(annotation)
    models = tuple(m for m in members if isinstance(m, type) and issubclass(m, BaseModel))
    found = [models] if models else []
    for member in members:
        if get_origin(member) in (list, dict):
            found += _sections_in(get_args(member)[-1])
    return found


def _discriminator(classes: tuple[type[BaseModel], ...]) -> str:
    """The key that tells a union's variants apart: the first Literal-typed field every variant has."""
    for name in classes[0].model_fields:
        if all(
            name in cls.model_fields and get_origin(cls.model_fields[name].annotation) is Literal for cls in classes
        ):
            return name
    raise ValueError(f"no Literal field tells {[cls.__name__ for cls in classes]} apart")


def _literals(cls: type[BaseModel], key: str) -> tuple[Any, ...]:
    return get_args(cls.model_fields[key].annotation)


def _variant_heading(cls: type[BaseModel], key: str) -> str:
    return " or ".join(f"`{key}: {_value(value)}`" for value in _literals(cls, key))


def _slug(heading: str) -> str:
    """The id MkDocs (Python-Markdown's toc) and GitHub both give a heading: `data.loader` -> dataloader."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _constraints(metadata: list[Any]) -> str:
    """Pydantic's constraints as read: `>= 1`, `> 0, <= 10`, not empty, matches `^[a-z]+$`."""
    bounds, words = [], []
    for meta in metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{symbol} {_value(getattr(meta, attr))}")
        if getattr(meta, "min_length", None):
            words.append("not empty" if meta.min_length == 1 else f"at least {meta.min_length} items")
        if getattr(meta, "max_length", None):
            words.append(f"at most {meta.max_length} items")
        if getattr(meta, "pattern", None):
            words.append(f"matches `{meta.pattern}`")
    return ", ".join(([f"`{', '.join(bounds)}`"] if bounds else []) + words)


def _value(value: Any) -> str:
    """A value as it is written in YAML: null, true, 1e-06, [32, 64], auto ('' when YAML would misread it)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list | tuple):
        return f"[{', '.join(_value(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        try:
            plain = bool(value) and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else f"'{value}'"
    return str(value)


def _paragraph(text: str) -> list[str]:
    return [_markdown(" ".join(text.split())), ""] if text.strip() else []


def _markdown(text: str) -> str:
    """Plain text made safe for Markdown outside its `code` spans: `*`, `<` and word-edge `_` escaped."""
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):
        piece = pieces[i].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
        pieces[i] = re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", piece)
    return "`".join(pieces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=f"Write {PAGE.relative_to(PAGE.parents[2])}.")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = config_reference()
    if not args.check:
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(text, encoding="utf-8")
        print(f"wrote {PAGE}")
    elif not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
        print(f"{PAGE}: stale; regenerate it with `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
