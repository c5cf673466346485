"""A JSON Schema (draft 2020-12) of the job spec, built from the spec dataclasses and their field docs.

``kscale schema > kscale.schema.json``, then point an editor at it (e.g. a first line
``# yaml-language-server: $schema=./kscale.schema.json``) for completion and hover docs. The loader
(:func:`kscale.spec.load_spec`) stays the authority: the schema describes types, enums, bounds and
unknown keys; cross-field and model-dependent checks happen only there.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

_BOUND_KEYS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def json_schema() -> dict[str, Any]:
    from kscale.spec import JobSpec

    defs: dict[str, Any] = {}
    root = _object(JobSpec, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "kscale job spec",
            **root, "$defs": defs}


def _object(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        prop = _type(hints[f.name], defs)
        if f.metadata.get("doc"):
            prop["description"] = f.metadata["doc"]
        for k, b in (f.metadata.get("bounds") or {}).items():
            prop[_BOUND_KEYS[k]] = b
        if f.default is not dataclasses.MISSING and _jsonable(f.default):
            prop["default"] = f.default
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        props[f.name] = prop
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        out["required"] = required
    return out


def _type(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any or tp is None:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder against recursion
            defs[tp.__name__] = _object(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type(a, defs) for a in args]}
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        return {"type": "array", **({"items": _type(args[0], defs)} if args else {})}
    if origin is dict or tp is dict:
        return {"type": "object", **({"additionalProperties": _type(args[1], defs)} if len(args) == 2 else {})}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]} if tp is not float else {"type": ["number", "integer"]}
    return {}


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))
