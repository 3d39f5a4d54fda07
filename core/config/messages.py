"""Turn pydantic validation errors into one line per problem, named by YAML path.

`config.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16`
`config.yaml: train.bach_size: unknown key; did you mean batch_size?`
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError


def format_validation_error(
    exc: ValidationError,
    root: type[BaseModel],
    source: str,
    overridden: set[tuple[str, ...]],
    override_source: str = "--set",
) -> list[str]:
    """One line per error: `<file or --set>: <yaml.path>: <what was found and what is allowed>`."""
    found: dict[tuple[str, str], list[str]] = {}  # (where, path) -> descriptions, one per union member
    for err in exc.errors():
        path, model, members = _walk(root, err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path.append(_discriminator_field(members))
        where = override_source if any(_overlaps(path, keys, err["type"]) for keys in overridden) else source
        found.setdefault((where, ".".join(path) or "<top level>"), []).append(_describe(err, path, model))
    return [f"{where}: {path}: {_join_alternatives(descriptions)}" for (where, path), descriptions in found.items()]


def _join_alternatives(descriptions: list[str]) -> str:
    """`x | 'auto'` fields fail once per alternative: `-1 must be > 0 (or one of auto)`."""
    first, *others = list(dict.fromkeys(descriptions))
    choices = [d.split(" is not one of ", 1)[1] for d in others if " is not one of " in d]
    return f"{first} (or one of {', '.join(choices)})" if choices else first


def _overlaps(path: list[str], keys: tuple[str, ...], kind: str) -> bool:
    """Whether an override caused this error: it set the key in error or one below it, or made a
    value into a section (`--set seed.a=1`); a section's cross-field check stays the file's."""
    if len(path) >= len(keys):
        return tuple(path[: len(keys)]) == keys
    return tuple(path) == keys[: len(path)] and kind not in ("value_error", "missing")


def _describe(err: Any, path: list[str], parent: type[BaseModel] | None) -> str:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(path[-1], allowed, n=1)
        hint = f"did you mean {close[0]}?" if close else f"allowed keys: {', '.join(allowed)}"
        return f"unknown key; {hint}"
    if kind == "literal_error":
        return f"{_show(value)} is not one of {_choices(ctx.get('expected', ''))}"
    if kind == "union_tag_invalid":
        return f"{_show(ctx.get('tag'))} is not one of {_choices(ctx.get('expected_tags', ''))}"
    if kind in ("missing", "union_tag_not_found"):
        return "required but missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{_show(value)}: expected a section (a mapping of keys to values)"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{_show(value)} must be {bounds[kind]} {limit}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind in ("too_short", "too_long"):
        return f"{_show(value)}: {err['msg'].lower()}"
    return f"{_show(value)}: {err['msg'][0].lower()}{err['msg'][1:]}"


def _walk(
    root: type[BaseModel], loc: tuple[Any, ...]
) -> tuple[list[str], type[BaseModel] | None, dict[str, type[BaseModel]]]:
    """Follow a pydantic error location through the schema, dropping union tags and member names.

    Returns the YAML path, the model class that owns its last key, and the members of the
    tagged union found at the end of the path (if any).
    """
    path: list[str] = []
    model: type[BaseModel] | None = root
    parent: type[BaseModel] | None = root
    members: dict[str, type[BaseModel]] = {}
    plain_union = False
    mapping_values: Any = None  # the value type of a `dict[str, X]` field, once its key is passed
    for part in loc:
        if part in members:
            model, members = members[part], {}  # a discriminated union's tag: not part of the YAML path
            continue
        if plain_union:  # pydantic names the union member that failed ('constrained-float'): not a key
            plain_union = False
            continue
        path.append(str(part))
        parent = model
        if mapping_values is not None:  # `part` was a key of a mapping such as tune.hpo.space
            annotation, mapping_values = mapping_values, None
        elif model is None or not isinstance(part, str) or part not in model.model_fields:
            model = None
            continue
        else:
            annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) is dict:
            mapping_values = typing.get_args(annotation)[1]
        members = _union_members(annotation)
        alternatives = [a for a in typing.get_args(annotation) if a is not type(None)]
        plain_union = not members and typing.get_origin(annotation) in (typing.Union, types.UnionType)
        plain_union = plain_union and len(alternatives) > 1  # `int | None` fails without a member name
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return path, parent, members


def _discriminator_field(members: dict[str, type[BaseModel]]) -> str:
    """The key whose value picks a union member (`source` for data, `name` for model)."""
    for tag, cls in members.items():
        for name, field in cls.model_fields.items():
            if typing.get_origin(field.annotation) is Literal and tag in typing.get_args(field.annotation):
                return name
    return "<kind>"


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Map tag -> model for a tagged union: `Annotated[A, Tag('a')] | ...`, or a union with
    `Field(discriminator='type')` whose members' `type` literals are the tags."""
    discriminator = None
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *meta = typing.get_args(annotation)
        discriminator = next(
            (m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)), None
        )
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {}
    members = {}
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is typing.Annotated:
            cls, *meta = typing.get_args(member)
            for item in meta:
                tag = getattr(item, "tag", None)
                if tag is not None:
                    members[tag] = cls
        elif discriminator and isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get(discriminator)
            if field is not None and typing.get_origin(field.annotation) is Literal:
                members |= dict.fromkeys(typing.get_args(field.annotation), member)
    return members


def _choices(expected: str) -> str:
    return ", ".join(re.findall(r"'([^']*)'", expected)) or expected


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, dict):
        return "a mapping"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
