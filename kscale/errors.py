"""The base of kscale's named refusals, and how a bad value is quoted in one.

Every error that refuses an input (a spec, an output path, a store, changed data) derives from
:class:`KscaleError`; the CLI catches it and prints ``kscale CMD: Name: message`` with exit status 2 and
no traceback (a traceback means a bug in kscale, not a bad input). Stage-local errors keep their own
modules (``kscale.spec.SpecError``, ``kscale.output.OutputError``, ``kscale.store.StoreError``) and
only add this base.
"""

from __future__ import annotations

from typing import Any

SHOWN_CHARS = 80  # a quoted value longer than this is cut, with its full size named


class KscaleError(Exception):
    """An input kscale refuses; the message names the field, file or path and why."""


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to about 80 characters plus its size, so a 100 MB bad
    value is never echoed whole (strings and bytes are cut before ``repr``; containers by their repr)."""
    if isinstance(value, (str, bytes)) and len(value) > SHOWN_CHARS:
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{value[:SHOWN_CHARS]!r}... ({len(value)} {unit})"
    if isinstance(value, (list, dict, tuple, set)):
        text = _bounded_repr(value, SHOWN_CHARS + 1)
        return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({type(value).__name__} of {len(value)})"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


def _bounded_repr(value: Any, limit: int) -> str:
    """A repr of nested containers that stops once ``limit`` characters are produced (never walks a huge
    or deeply shared structure to the end)."""
    out: list[str] = []
    size = 0

    def walk(v: Any) -> None:
        nonlocal size
        if size >= limit:
            return
        if isinstance(v, (list, tuple, set)):
            parts = (("[", "]") if isinstance(v, list) else ("(", ")") if isinstance(v, tuple) else ("{", "}"))
            emit(parts[0])
            for i, item in enumerate(v):
                if size >= limit:
                    return
                if i:
                    emit(", ")
                walk(item)
            emit(parts[1])
        elif isinstance(v, dict):
            emit("{")
            for i, (k, item) in enumerate(v.items()):
                if size >= limit:
                    return
                if i:
                    emit(", ")
                emit(shown(k) + ": ")
                walk(item)
            emit("}")
        else:
            emit(shown(v))

    def emit(s: str) -> None:
        nonlocal size
        out.append(s)
        size += len(s)

    walk(value)
    return "".join(out)
