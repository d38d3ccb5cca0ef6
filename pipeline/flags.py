"""Command-line flags generated from the settings models (``RunConfig`` with its ``MaskConfig``, ``RuntimeOptions``),
so that the pydantic fields are the one source of truth: one flag per field, named after it (``steps`` ->
``--steps``, ``mask.refine`` -> ``--mask-refine``) unless the field names its own (``json_schema_extra={"flag":
...}``), with the field's description and default in ``--help``. Flags only parse a value into the field's type;
the models validate, and their errors name the flag the user wrote (``written_as``)."""

from __future__ import annotations

import argparse
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from seediff.schemas.config import RECORDED, yaml_value


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help text between words only, so hub ids, paths and URLs in defaults stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


@dataclass(frozen=True)
class Flag:
    field: str  # dotted field name: "mask.refine"
    flag: str  # "--mask-refine"

    @property
    def dest(self) -> str:
        return f"setting:{self.field}"


def flag_name(field: str, info: FieldInfo) -> str | None:
    """The field's flag, or None for a field that is recorded but not set (``RECORDED``)."""
    extra = _extra(info)
    if "flag" in extra:
        return None if extra["flag"] == RECORDED else extra["flag"]
    return "--" + field.replace(".", "-").replace("_", "-")


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def add_flags(group: argparse._ActionsContainer, model: type[BaseModel], prefix: str = "",
              skip: frozenset[str] = frozenset()) -> list[Flag]:
    """One flag per field of ``model`` (nested models flattened with ``prefix``), added to ``group``; every flag
    defaults to None, meaning "not given", so a config file's value stands unless a flag overrides it. ``skip``:
    dotted fields whose flag the caller adds itself (e.g. the output root)."""
    flags = []
    for name, info in model.model_fields.items():
        field = f"{prefix}{name}"
        if field in skip:
            continue
        annotation = _unwrap_optional(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            flags += add_flags(group, annotation, f"{field}.", skip)
            continue
        flag = flag_name(field, info)
        if flag is None:
            continue
        spec = Flag(field, flag)
        group.add_argument(flag, dest=spec.dest, default=None, help=_help(info), **_parsing(annotation, info))
        flags.append(spec)
    return flags


def given(args: argparse.Namespace, flags: list[Flag]) -> tuple[dict[str, Any], dict[str, str]]:
    """The flags the user gave, as nested settings ({"mask": {"refine": "none"}}), and dotted field -> flag."""
    values: dict[str, Any] = {}
    written_as: dict[str, str] = {}
    for spec in flags:
        value = getattr(args, spec.dest)
        if value is None:
            continue
        *parents, leaf = spec.field.split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
        written_as[spec.field] = spec.flag
    return values, written_as


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _parsing(annotation: Any, info: FieldInfo) -> dict[str, Any]:
    """argparse keywords that turn the flag's text into the field's type. A list of settings models (``--lora``) is
    a repeatable flag: each value is the model's own text form, which the model parses."""
    origin = typing.get_origin(annotation)
    parts = typing.get_args(annotation)
    if origin is tuple and parts[1:] == (Ellipsis,) and isinstance(parts[0], type) and issubclass(parts[0], BaseModel):
        return {"action": "append", "type": str, "metavar": _extra(info).get("metavar", "TEXT")}
    if origin is Literal:
        choices = typing.get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": annotation.__name__.upper()}
    if origin is tuple and all(a in (int, float, str) for a in parts):
        return {"nargs": len(parts), "type": parts[0], "metavar": tuple(a.__name__.upper() for a in parts)}
    return {"type": yaml_value, "metavar": "YAML"}  # lists, mappings: written as in the config file, same bounds


def _help(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    shown = default.model_dump() if isinstance(default, BaseModel) else default
    if shown in (None, "", ()):
        shown = "unset"
    if isinstance(shown, (list, tuple)):
        shown = " ".join(str(v) for v in shown)
    # argparse formats help with %-interpolation
    return f"{info.description or ''} (default: {shown})".replace("%", "%%")
