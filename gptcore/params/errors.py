"""pydantic's validation report as lines naming each key path, in words a params.yaml editor acts on."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ValidationError

from gptcore.errors import ConfigError, ConfigProblems

# What a value of each kind must be, in words, by pydantic error type.
_EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "dataclass_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
    "none_required": "null",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """The field names of the (nested) model or dataclass at loc, for did-you-mean hints."""
    for part in loc:
        fields = _fields_of(model)
        if part not in fields:
            return []
        model = _unwrap(fields[part])
    return list(_fields_of(model))


def _fields_of(model: Any) -> dict[str, Any]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {name: f.annotation for name, f in model.model_fields.items()}
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model, include_extras=False)
        return {f.name: hints[f.name] for f in dataclasses.fields(model) if f.init}
    return {}


def _unwrap(hint: Any) -> Any:
    """The model/dataclass/Literal inside an annotation (through Optional and Annotated)."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) not in (None, Literal, dict, list) and len(args) == 1:
        return _unwrap(args[0])
    return hint


def _choices(model: Any, loc: tuple) -> tuple | None:
    hint = model
    for part in loc:
        if isinstance(part, int):  # an item of a list: its element type
            args = typing.get_args(hint)
            hint = _unwrap(args[0]) if args else None
        else:
            hint = _unwrap(_fields_of(hint).get(part))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def describe_error(error: dict[str, Any], model: Any) -> str:
    """One pydantic error as `key.path: problem` in words a params.yaml editor acts on."""
    loc = tuple(p for p in error["loc"] if isinstance(p, (str, int)))
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    where = _dotted(loc) or "(top level)"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = _allowed_keys(model, loc[:-1])
        what = "section" if not loc[:-1] and isinstance(value, dict) else "key"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(allowed)}"
        return f"{where}: unknown {what}; {hint}"
    if kind == "literal_error":
        choices = _choices(model, loc)
        listed = ", ".join(map(str, choices)) if choices else ctx.get("expected", "")
        return f"{where}: expected one of {listed}, got {value!r}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{where}: must be {_BOUNDS[kind]} {bound:g}, got {value!r}"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", error["msg"]))
        return f"{where}: {message}" if loc else message  # a whole-file rule names its keys itself
    if kind in _EXPECTED:
        hint = ""
        if kind.startswith("float") and isinstance(value, str) and _is_number(value):
            hint = " (YAML reads 5e-5 as text: write 5.0e-5)"
        return f"{where}: expected {_EXPECTED[kind]}, got {value!r}{hint}"
    return f"{where}: {error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validation_error(err: ValidationError, model: Any, where: str) -> ConfigError:
    """A ConfigError naming every problem pydantic found: one line when there is one, else a count
    followed by one indented line per problem, each with its key path (fix them all in one go)."""
    problems = [" ".join(describe_error(error, model).split()) for error in err.errors(include_url=False)]
    if len(problems) == 1:
        return ConfigError(f"{where}: {problems[0]}")
    return ConfigProblems(where, problems)
