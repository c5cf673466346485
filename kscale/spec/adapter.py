"""The ``extract.adapter`` section, and what an adapter directory's files say it is.

An adapter is applied to the freshly loaded model before any hook (:func:`kscale.adapters.apply_adapter`,
the same function the eval and bias stages use). Two kinds, told apart by ``adapter_config.json``, the file
both write beside ``adapter_model.safetensors``:

- ``malora``: a kscale MaLoRA adapter (``{"format": "malora", ...}``, :mod:`kscale.adapters.model`);
- ``lora``: a PEFT LoRA adapter (``{"peft_type": "LORA", ...}``: ``PeftModel.save_pretrained``, and the
  ``adapter/`` of a ``kind: train`` run with ``train.method: lora``).

``path`` is the adapter directory itself or a ``kind: train`` run directory (its ``adapter/``). These
facts live here, with the spec, because the spec checks them at load time and may not import the adapter
library (tests/unit/test_imports.py); the library and the training stage's run layout read them from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kscale.spec.fields import doc

ADAPTER_CONFIG = "adapter_config.json"  # MaLoRA's and PEFT's: how the adapter was built
RUN_ADAPTER_DIR = "adapter"  # the final adapter inside a `kind: train` run directory (kscale.train.layout)
AdapterKind = Literal["malora", "lora"]


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory itself, or the ``adapter/`` of a ``kind: train`` run directory."""
    p = Path(path).expanduser()
    return p / RUN_ADAPTER_DIR if (p / RUN_ADAPTER_DIR).is_dir() else p


def found_kind(directory: str | Path) -> tuple[str | None, str]:
    """(``"malora"``, ``"lora"`` or None, what the config says) from ``directory``'s ``adapter_config.json``."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{ADAPTER_CONFIG} unreadable ({e.__class__.__name__})"
    if not isinstance(meta, dict):
        return None, f"{ADAPTER_CONFIG} is not a JSON object"
    if meta.get("format") == "malora":
        return "malora", "format: malora"
    if meta.get("peft_type") is not None:
        peft_type = str(meta["peft_type"])
        return ("lora" if peft_type == "LORA" else None), f"peft_type: {peft_type}"
    return None, f"neither format: malora nor a peft_type in {ADAPTER_CONFIG}"


def adapter_problems(path: str, kind: str | None = None) -> list[tuple[str, str]]:
    """(field, message) problems of an adapter ``path`` (and, when given, its declared ``kind``): the
    directory is missing, holds no adapter config, or holds another kind of adapter."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return [("path", f"adapter directory {path!r} does not exist")]
    d = adapter_dir(p)
    if not (d / ADAPTER_CONFIG).is_file():
        return [("path", f"{path!r} holds no {ADAPTER_CONFIG}: neither an adapter directory nor a `kind: train` "
                         f"run directory with {RUN_ADAPTER_DIR}/")]
    got, says = found_kind(d)
    if got is None:
        return [("path", f"{str(d)!r} is neither a MaLoRA nor a PEFT LoRA adapter ({says})")]
    if kind is not None and got != kind:
        return [("kind", f"{kind!r}, but {str(d)!r} holds a {got} adapter ({says})")]
    return []


@dataclass(frozen=True, kw_only=True, slots=True)
class AdapterSpec:
    kind: AdapterKind = doc("malora (a kscale MaLoRA adapter, gated by each token's modality) or lora (a PEFT "
                            "LoRA adapter).")
    path: str = doc("The adapter directory (adapter_config.json + adapter_model.safetensors) or a `kind: train` "
                    "run directory (its adapter/).")
    merge: bool = doc("Fold the adapter into the base weights before extracting: malora merges its text branch "
                      "(the image branch stays gated), lora is merge_and_unload. Keys equal the unmerged "
                      "adapter's up to rounding.", False)

    def validate(self) -> list[tuple[str, str]]:
        out = adapter_problems(self.path, self.kind if self.kind in ("malora", "lora") else None)
        if not out and self.kind == "malora" and self.merge:
            gate = json.loads((adapter_dir(self.path) / ADAPTER_CONFIG).read_text()).get("malora", {}).get("gate")
            if gate == "token":
                out.append(("merge", "a token-conditioned text gate (malora.gate: token) depends on the input and "
                                     "cannot be merged into the weights"))
        return out
