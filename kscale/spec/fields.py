"""The field helper and the generic checks shared by every spec section (a leaf: it imports no stage).

A section is a frozen dataclass whose fields are declared with :func:`doc` (one line of documentation,
the default, optional bounds). :func:`convert` turns a YAML value into a field's type, collecting every
problem as a ``(dotted field, message)`` pair: wrong types, choices outside a ``Literal`` (with a
did-you-mean), bounds, unknown keys, then the section's own ``validate()``. ``kscale.spec.load_spec``
drives it for a whole job; :func:`section_problems` runs the same checks on a section built in code.
The section modules (``kscale.spec.analyze``, ``.train``, ``.malora``, ``.bias``, ``.cluster``) import
only this module, so ``kscale.spec`` can import them and stays below every stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

from kscale.errors import shown


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A spec field: its one-line documentation, its default and optional bounds.

    Bounds apply to a number, or to every number of a list; ``load_spec`` (and :func:`section_problems`)
    report a violation as ``section.field: must be >= N (got X)``.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"doc": text, "bounds": bounds} if bounds else {"doc": text}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_LOWER = {"ge": (">=", "[", lambda v, b: v >= b), "gt": (">", "(", lambda v, b: v > b)}
_UPPER = {"le": ("<=", "]", lambda v, b: v <= b), "lt": ("<", ")", lambda v, b: v < b)}


def bounds_text(bounds: dict[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``">= 0, < 1"`` (the bounds as ``kscale validate --explain`` shows them)."""
    return ", ".join(f"{({**_LOWER, **_UPPER})[k][0]} {b}" for k, b in bounds.items())


def bound_problems(value: Any, bounds: dict[str, float], where: str) -> list[tuple[str, str]]:
    """``(where, "must be >= N (got X)")`` when the number ``value`` (or an item of a list) breaks ``bounds``."""
    if not bounds:
        return []
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in bound_problems(v, bounds, f"{where}[{i}]")]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return []  # non-numbers and nan/inf are reported by the type check
    rules = {**_LOWER, **_UPPER}
    if all(rules[k][2](value, b) for k, b in bounds.items()):
        return []
    lower = [(k, b) for k, b in bounds.items() if k in _LOWER]
    upper = [(k, b) for k, b in bounds.items() if k in _UPPER]
    if lower and upper:
        (lk, lb), (uk, ub) = lower[0], upper[0]
        return [_ValueProblem((where, f"must be in {_LOWER[lk][1]}{lb}, {ub}{_UPPER[uk][1]} (got {shown(value)})"))]
    k, b = (lower or upper)[0]
    return [_ValueProblem((where, f"must be {rules[k][0]} {b} (got {shown(value)})"))]


def did_you_mean(value: Any, choices: typing.Iterable[Any]) -> str:
    """`` (did you mean 'dtype'?)`` when a string is close to one of ``choices`` (difflib), else ''."""
    if not isinstance(value, str) or len(value) > 200:
        return ""
    names = {str(c): c for c in choices}
    close = difflib.get_close_matches(value, list(names), n=1, cutoff=0.6)
    return f" (did you mean {names[close[0]]!r}?)" if close else ""


class _ValueProblem(tuple):
    """A (field, message) problem of a well-typed value (not an allowed choice, out of bounds). The section
    is still built, so its cross-field checks run too and one load reports every problem."""


def type_text(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    """Convert a YAML value into ``tp``; append problems and return None on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, problems)
    if origin in (typing.Union, types.UnionType):
        alts = typing.get_args(tp)
        if value is None and type(None) in alts:
            return None
        for alt in alts:
            if alt is type(None):
                continue
            trial: list[tuple[str, str]] = []
            out = convert(alt, value, where, trial)
            if not trial:
                return out
        # report the most specific failure: the alternative whose kind matches the value
        for alt in alts:
            if (typing.get_origin(alt) is list and isinstance(value, list)) or (
                dataclasses.is_dataclass(alt) and isinstance(value, dict)):
                return convert(alt, value, where, problems)
        problems.append((where, f"expected {' or '.join(type_text(a) for a in alts)}, got {shown(value)}"))
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            msg = f"{shown(value)} is not one of {', '.join(map(repr, choices))}{did_you_mean(value, choices)}"
            if isinstance(value, (str, int, float)):  # well typed: keep it, so cross-field checks still run
                problems.append(_ValueProblem((where, msg)))
                return value
            problems.append((where, msg))
            return None
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append((where, f"expected a list, got {shown(value)}"))
            return None
        return [convert(item_tp, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append((where, f"expected a mapping, got {shown(value)}"))
            return None
        _, val_tp = typing.get_args(tp)
        return {str(k): convert(val_tp, v, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((where, f"expected true or false, got {shown(value)}"))
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((where, f"expected an integer, got {shown(value)}"))
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((where, f"expected a number, got {shown(value)}"))
            return None
        if not math.isfinite(value):
            problems.append(_ValueProblem((where, f"must be a finite number (got {value})")))
            return value  # well typed but unusable: the section is still built so every other check runs
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append((where, f"expected a string, got {shown(value)}"))
            return None
        return value
    raise TypeError(f"spec type {tp!r} at {where} is not supported")  # a bug in a section definition


def _convert_dataclass(cls: type, value: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    prefix = f"{where}." if where else ""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append((where, f"expected a mapping, got {shown(value)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            problems.append(_ValueProblem((f"{prefix}{key}",  # the section is still built from its known keys
                                           f"unknown key{did_you_mean(key, fields)} (known: {', '.join(fields)})")))
    kwargs: dict[str, Any] = {}
    n_before = len(problems)
    for name, f in fields.items():
        if name in value:
            kwargs[name] = convert(hints[name], value[name], f"{prefix}{name}", problems)
            problems.extend(bound_problems(kwargs[name], f.metadata.get("bounds", {}), f"{prefix}{name}"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((f"{prefix}{name}", "required field is missing"))
    if any(not isinstance(p, _ValueProblem) for p in problems[n_before:]):
        return None  # a value of the wrong type: the section cannot be built
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problems.extend((f"{prefix}{f}" if f else where, m) for f, m in validate())
    return obj


def section_problems(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every problem of a section built in code rather than loaded (e.g. a ``MaLoRAConfig`` read back from
    an adapter): the same Literal and bound checks as ``load_spec``, nested sections, then ``validate()``."""
    out: list[tuple[str, str]] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += section_problems(value, f"{prefix}{f.name}.")
            continue
        convert(hints[f.name], value, f"{prefix}{f.name}", out)
        out += bound_problems(value, f.metadata.get("bounds", {}), f"{prefix}{f.name}")
    validate = getattr(obj, "validate", None)
    if validate is not None:
        out += [(f"{prefix}{f}", m) for f, m in validate()]
    return [tuple(p) for p in out]


def to_dict(obj: Any) -> Any:
    """A spec (or section) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
