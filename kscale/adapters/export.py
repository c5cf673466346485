"""MaLoRA outside kscale: a one-call loader for your own code, and the text branch as a PEFT LoRA adapter.

``load(base, adapter_dir)`` returns a :class:`~kscale.adapters.model.MaLoRAModel` ready for
inference: ``base`` is a loaded Hugging Face vision-language model or a checkpoint path (loaded the way
kscale loads it, :func:`kscale.models.registry.load_model`; the tokenizer and image processor are then on
``malora.loaded``). Call it like the base model, with ``input_ids`` (the modality mask comes from them).

``export_peft(adapter_dir, out_dir)`` writes the **text branch** as a standard PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base,
out_dir)`` loads into the plain base model. On text-only input MaLoRA applies exactly its text branch,
``W x + g_txt * (alpha / r) * B_txt A_txt x``, so the export sets ``lora_B = g_txt * B_txt`` and keeps
``lora_A = A_txt``, ``r`` and ``lora_alpha``: PEFT's ``(lora_alpha / r) * lora_B lora_A`` is then the same
update (test: ``tests/unit/train/test_malora_export.py``, to 1e-5). The image branch has no PEFT
equivalent (PEFT applies one update to every token) and is not exported; neither is a token-conditioned
gate (it depends on the input). Module names are the full paths of the adapted projections, so PEFT
adapts exactly the language-model layers MaLoRA adapted (never the vision tower's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kscale.adapters.model import ADAPTER_WEIGHTS, MaLoRAModel, load_adapter_config

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def load(base: str | Path | nn.Module, adapter_dir: str | Path, *, dtype: str = "auto",
         device: str = "auto") -> MaLoRAModel:
    """Base model (a module or a checkpoint path) + the MaLoRA adapter saved in ``adapter_dir``, in eval mode.

    >>> malora = load("/ckpt/Qwen2.5-VL-7B-Instruct", "runs/train/adapter")       # doctest: +SKIP
    >>> out = malora(**inputs)  # inputs with input_ids, as for the base model  # doctest: +SKIP
    """
    loaded = None
    if not isinstance(base, nn.Module):
        from kscale.models.registry import load_model
        from kscale.spec import ModelSpec

        loaded = load_model(ModelSpec(path=str(base), dtype=dtype, device=device))
        base = loaded.model
    malora = MaLoRAModel.from_pretrained(base, adapter_dir)
    malora.loaded = loaded
    return malora.eval()


def _text_branch(adapter_dir: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, {module path: (A, g*B)}) of the saved text branch; refuses what PEFT cannot express."""
    from safetensors.torch import load_file

    cfg = load_adapter_config(adapter_dir)
    if not cfg.text_branch:
        raise ValueError(f"{adapter_dir}: the adapter has no text branch (malora.text_branch: false); "
                         "only the text branch can be exported to PEFT")
    if cfg.gate == "token":
        raise ValueError(f"{adapter_dir}: a token-conditioned gate (malora.gate: token) depends on the input "
                         "and has no PEFT LoRA equivalent")
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    modules = sorted(k[: -len(".malora_A_txt")] for k in state if k.endswith(".malora_A_txt"))
    out = {}
    for m in modules:
        gate = state[f"{m}.malora_gate_txt"].float() if cfg.gate == "scalar" else torch.ones(1)
        B_OR = state[f"{m}.malora_B_txt"].float() * gate
        out[m] = (state[f"{m}.malora_A_txt"], B_OR.to(state[f"{m}.malora_B_txt"].dtype))
    return cfg, out


def export_peft(adapter_dir: str | Path, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the text branch of the MaLoRA adapter in ``adapter_dir`` as a PEFT LoRA adapter in ``out_dir``."""
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    cfg, branch = _text_branch(adapter_dir)
    if not branch:
        raise ValueError(f"{adapter_dir}: no text-branch weights (malora_A_txt) in {ADAPTER_WEIGHTS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A_RC, B_OR) in branch.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A_RC.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B_OR.contiguous()
    save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    LoraConfig = _peft_lora_config()
    LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
               target_modules=sorted(branch), base_model_name_or_path=base_model_name_or_path,
               inference_mode=True).save_pretrained(str(out_dir))
    (out_dir / "malora_export.json").write_text(json.dumps(
        {"exported_from": str(adapter_dir), "branch": "text", "gate": cfg.gate,
         "note": "lora_B = gate_txt * B_txt; the image branch is not part of this adapter"}, indent=2) + "\n")
    return out_dir


def _peft_lora_config():
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ImportError("exporting to PEFT needs peft: pip install 'kscale[train]' (or pip install peft)") from err
    return LoraConfig
