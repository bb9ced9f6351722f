"""Dotted paths over the job schemas: the one way to change a config by field name, and its listing.

``--set train.max_steps=1e5``, a sweep preset's changes to its base config and a Tune trial's
sampled values all go through :func:`set_fields`. A ``--set`` value is typed by the field it names
(:func:`typed_value`): text stays text for string fields, ``1e5`` is a number for numeric ones.
:func:`describe_fields` lists every field of a job with its type, default and description: the
entry points' ``--help``.
"""

from __future__ import annotations

import datetime
import textwrap
import types
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def set_fields(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with ``values`` set by dotted path (``{"optim.lr": 0.1}`` sets
    ``data["optim"]["lr"]``). Missing or null sections are created; a value that replaces a whole
    section replaces it. Naming a field that does not exist is left to validation, which names it."""
    result = dict(data)
    for dotted, value in values.items():
        *sections, leaf = dotted.split(".")
        if not leaf or not all(sections):
            raise ValueError(f"{dotted!r}: empty field name")
        node = result
        for depth, section in enumerate(sections):
            child = node.get(section)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"{dotted}: {'.'.join(sections[:depth + 1])!r} is not a config section")
            node[section] = child = dict(child)  # copy on write: ``data`` stays as it was
            node = child
        node[leaf] = value
    return result


def field_at(model: type[BaseModel], dotted: str) -> FieldInfo | None:
    """The field a dotted path names, through nested sections; ``None`` if there is none."""
    *sections, leaf = dotted.split(".")
    for section in sections:
        field = model.model_fields.get(section)
        found = _section_model(field.annotation) if field is not None else None
        if found is None:
            return None
        model = found
    return model.model_fields.get(leaf)


def typed_value(model: type[BaseModel], dotted: str, text: str) -> Any:
    """A ``--set`` value: YAML (lists, mappings, null, numbers), typed by the field it sets. String
    fields keep the text as written (``name=20261128``, ``name=2026-11-28``); numeric fields also
    take ``1e5``-style numbers, which validation accepts for integers when they are integral."""
    field = field_at(model, dotted)
    kinds = set() if field is None else _leaf_types(field.annotation)
    if kinds and kinds - {type(None)} <= {str, SecretStr}:  # text only: as written, never parsed as YAML
        return None if type(None) in kinds and text in ("", "null", "~") else text
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as error:
        raise ValueError(f"not a YAML value: {getattr(error, 'problem', None) or error}") from None
    if field is None:
        return value
    takes_text = bool(kinds & {str, SecretStr})
    if takes_text and isinstance(value, (bool, int, float, datetime.date)):
        return text
    if value is None and type(None) not in kinds and takes_text:
        return text
    if isinstance(value, str) and kinds & {int, float} and not takes_text:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def is_secret(model: type[BaseModel], dotted: str) -> bool:
    """Whether the field holds a credential (its value must never be echoed)."""
    field = field_at(model, dotted)
    return field is not None and SecretStr in _leaf_types(field.annotation)


def is_test_only(field: FieldInfo) -> bool:
    """A switch for the tests (fault injection): settable, but never shown to users."""
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get("test_only"))


def describe_fields(model: type[BaseModel]) -> str:
    """Every field of ``model`` (sections flattened to dotted names) with type, default and description."""
    return "\n".join(_describe(model, ""))


def _describe(model: type[BaseModel], prefix: str) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        if is_test_only(field):
            continue
        path = prefix + name
        section = _section_model(field.annotation)
        if section is not None:
            optional = type(None) in _leaf_types(field.annotation)
            summary = _first_sentence(field.description or section.__doc__ or "")
            header = f"{path}.*  section{' (optional)' if optional else ''}" + (f": {summary}" if summary else "")
            lines.extend(textwrap.wrap(header, 100, initial_indent="  ", subsequent_indent=" " * 6))
            lines.extend(_describe(section, path + "."))
            continue
        mapped = _mapping_of_sections(field.annotation)
        lines.append(f"  {path}: {_type_name(field.annotation)}{_constraints(field)}, {_default(field)}")
        if field.description:
            lines.extend(textwrap.wrap(field.description, 96, initial_indent=" " * 6, subsequent_indent=" " * 6))
        if mapped is not None:
            lines.extend(_describe(mapped, f"{path}.<key>."))
    return lines


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "default: see its fields"
    if isinstance(value, tuple):
        value = list(value)
    rendered = yaml.safe_dump(value, default_flow_style=True, width=1_000).strip().removesuffix("...").strip()
    return f"default {rendered}"


def _constraints(field: FieldInfo) -> str:
    bounds = {annotated_types.Ge: ("ge", "≥"), annotated_types.Gt: ("gt", ">"),
              annotated_types.Le: ("le", "≤"), annotated_types.Lt: ("lt", "<")}
    parts = [f"{symbol} {getattr(item, name)}" for item in field.metadata
             for kind, (name, symbol) in bounds.items() if isinstance(item, kind)]
    return f" ({', '.join(parts)})" if parts else ""


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is Literal:
        return "|".join(str(arg) for arg in get_args(annotation))
    if origin is tuple and Ellipsis not in get_args(annotation):
        return f"[{', '.join(_type_name(arg) for arg in get_args(annotation))}]"
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(annotation)[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping {_type_name(key)} → {_type_name(value)}"
    if annotation is type(None):
        return "null"
    if annotation is SecretStr:
        return "secret"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _leaf_types(annotation: Any) -> set[type]:
    """The plain types a value of ``annotation`` can have (unions, ``Annotated`` and ``Literal`` unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_leaf_types(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    if origin is not None:
        return {origin}
    return {annotation} if isinstance(annotation, type) else set()


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (also when optional), or ``None`` for a plain field."""
    found = [kind for kind in _leaf_types(annotation) if issubclass(kind, BaseModel)]
    return found[0] if found else None


def _mapping_of_sections(annotation: Any) -> type[BaseModel] | None:
    """For ``dict[str, Section]`` fields (a sweep's search space): the section type of the values."""
    if get_origin(annotation) is dict:
        return _section_model(get_args(annotation)[1])
    return None
