"""Apply an adapter to a loaded model: the one function the eval, extract and bias stages share.

:func:`apply_adapter` takes a :class:`kscale.models.LoadedModel` and anything with ``kind`` (``base``,
``malora`` or ``lora``), ``path`` and ``merge`` -- an ``extract.adapter`` section
(:class:`kscale.spec.AdapterSpec`), an eval variant (:class:`kscale.spec.EvalVariant`), a bias variant's
adapter -- and injects the adapter **in place**: the loaded model's own projections become the adapted
ones, so whatever later looks a projection up through :mod:`kscale.models` (``key_modules`` and the other
hook points) gets the wrapper and sees the adapted output:

- ``malora``: :meth:`kscale.adapters.model.MaLoRAModel.from_pretrained` swaps each target Linear for a
  :class:`~kscale.adapters.layer.MaLoRALinear` and registers the pre-hook that turns each call's
  ``input_ids`` into the modality mask its gate reads (so every forward with ``input_ids`` is gated by its
  own tokens); ``merge`` folds the text branch into the base weights;
- ``lora``: ``peft.PeftModel.from_pretrained`` swaps each target Linear for PEFT's ``lora.Linear``;
  ``merge`` is ``merge_and_unload`` (the Linears are put back with the update folded in).

:func:`adapter_identity` is what a stage records of the adapter it applied (kind, path, the SHA-256 of the
files that define it): the key store's root attributes hold it and resume compares it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kscale.adapters.model import ADAPTER_WEIGHTS, MaLoRAModel
from kscale.spec.adapter import ADAPTER_CONFIG, adapter_dir, adapter_problems

PEFT_BIN_WEIGHTS = "adapter_model.bin"  # older PEFT adapters (torch.save) instead of safetensors


@dataclass
class AppliedAdapter:
    """An adapter injected into a loaded model: ``wrapper`` is the :class:`MaLoRAModel` or ``PeftModel``."""

    kind: str
    directory: Path
    merged: bool
    wrapper: Any

    def remove(self) -> nn.Module:
        """Put the base projections back (an unmerged adapter only); returns the base model."""
        if self.merged:
            raise RuntimeError(f"{self.directory}: the adapter is merged into the weights; load the model again")
        return self.wrapper.unload()


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError("a lora adapter needs PEFT: pip install 'kscale[train]' (or pip install peft)") from e
    return peft


def apply_adapter(loaded: Any, adapter: Any) -> AppliedAdapter | None:
    """Inject ``adapter`` (a section with kind, path, merge) into ``loaded`` in place (``loaded.model`` is the
    adapted model after it); None for ``kind: base`` or no adapter. Raises ``ValueError`` when the path holds
    no adapter of that kind."""
    if adapter is None or adapter.kind == "base":
        return None
    problems = adapter_problems(str(adapter.path), adapter.kind)
    if problems:
        raise ValueError("; ".join(m for _, m in problems))
    directory = adapter_dir(adapter.path)
    if adapter.kind == "malora":
        wrapper: Any = MaLoRAModel.from_pretrained(loaded.model, directory)
        if adapter.merge:
            wrapper.merge_text_branch()
    else:
        wrapper = _peft().PeftModel.from_pretrained(loaded.model, str(directory))
        loaded.model = wrapper.merge_and_unload() if adapter.merge else wrapper.base_model.model
    loaded.model.eval()
    return AppliedAdapter(adapter.kind, directory, bool(adapter.merge), wrapper)


def adapter_files(directory: str | Path) -> list[Path]:
    """The files that define an adapter: its config and its weights (not READMEs or kscale's notes)."""
    d = Path(directory)
    return [d / n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_BIN_WEIGHTS) if (d / n).is_file()]


def adapter_identity(adapter: Any) -> dict[str, Any]:
    """``{kind, path, dir, merge, files: {name: sha256}, fingerprint}`` of an adapter section (kind, path,
    merge): what the store records and what resume compares (``fingerprint``: 16 hex digits over the files'
    names and hashes)."""
    directory = adapter_dir(adapter.path)
    files = {}
    for f in adapter_files(directory):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        files[f.name] = h.hexdigest()
    fingerprint = hashlib.sha256("".join(f"{n}:{h};" for n, h in sorted(files.items())).encode()).hexdigest()[:16]
    return {"kind": adapter.kind, "path": str(adapter.path), "dir": str(directory.resolve()),
            "merge": bool(adapter.merge), "files": files, "fingerprint": fingerprint}
