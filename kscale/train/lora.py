"""Plain LoRA, the baseline MaLoRA is judged against (``train.method: lora``), as PEFT builds it.

One low-rank update on every token, whatever its modality: ``out = W x + (alpha / r) B A drop(x)``, with no
modality mask, no gate and no separate image/text branches. The layers are PEFT's own ``lora.Linear``
(:func:`peft.inject_adapter_in_model`), so the baseline is the field's reference implementation, trained by
kscale's objective and DeepSpeed engine with the same data, steps, rank, alpha, dropout, init, targets and
layers as a MaLoRA run (all read from ``train.malora``; its gate and branch fields do not apply).

:class:`LoRAModel` has the surface :class:`~kscale.train.objective.MaLoRAObjective`, the training loop and
:mod:`kscale.train.evaluate` use of :class:`~kscale.adapters.MaLoRAModel`: ``model`` (the wrapped
model, adapted in place), ``context`` (only its ``recomputing`` flag matters here: the activation-checkpoint
wrapper sets it so key capture skips recomputes), ``branches`` (both off: the frozen base, for the
objective's frozen text reference and the "base" row of the before/after table), ``adapter_parameters``,
``gate_values`` (none), ``save_pretrained`` / ``from_pretrained``.

The saved ``adapter/`` is a PEFT adapter directory (``adapter_config.json`` with ``peft_type: LORA``,
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_{A,B}.weight``; kscale's
``kscale_adapter.json`` beside them records the method and the ``train.malora`` section), so
``peft.PeftModel.from_pretrained`` loads it and the eval stage's ``kind: lora`` variant takes the run
directory (:func:`kscale.eval.variants.apply_variant`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kscale.models.facts import resolve_layers
from kscale.spec.malora import MaLoRAConfig
from kscale.adapters.layer import ModalityContext
from kscale.adapters.model import ADAPTER_WEIGHTS, enable_replaying_checkpointing, model_adapter

PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's key prefix, which PeftModel.from_pretrained expects
ADAPTER_NAME = "default"
KSCALE_META = "kscale_adapter.json"  # beside PEFT's files: method and the train.malora section it came from
EVAL_VARIANTS = ("base", "lora")  # rows of the held-out before/after table (kscale.train.evaluate)


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a dependency of the train extra
        raise ImportError("train.method: lora needs PEFT: pip install 'kscale[train]' (or pip install peft)") from e
    return peft


def target_paths(model: nn.Module, config: MaLoRAConfig) -> list[str]:
    """Full module paths (in ``model``) of the Linears to adapt: ``target_modules`` of ``layers``.

    Full paths, not bare names, so PEFT adapts the language model only (a CLIP tower also has ``k_proj``)."""
    adapter = model_adapter(model)
    layers = adapter.decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for idx in resolve_layers(config.layers, len(layers), "malora.layers"):
        for target in config.target_modules:
            parent = getattr(layers[idx], adapter.malora_parent(target))
            base = getattr(parent, target, None)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"Target module {target!r} not found as nn.Linear in language layer {idx}")
            out.append(names[id(base)])
    return out


def lora_config(model: nn.Module, config: MaLoRAConfig) -> Any:
    """The PEFT ``LoraConfig`` equal to ``config`` (rank, alpha, dropout, init, targets) on ``model``."""
    peft = _require_peft()
    init: bool | str = {"kaiming": True, "gaussian": "gaussian", "random": False}[config.init]
    return peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=target_paths(model, config), init_lora_weights=init, bias="none")


class LoRAModel(nn.Module):
    """A frozen vision-language model with PEFT LoRA layers in its language model; ``forward`` is the model's."""

    def __init__(self, model: nn.Module, config: MaLoRAConfig, peft_config: Any | None = None) -> None:
        super().__init__()
        peft = _require_peft()
        self.model = model
        self.malora_config = config
        self.peft_config = peft_config if peft_config is not None else lora_config(model, config)
        self.context = ModalityContext()
        model.requires_grad_(False)
        peft.inject_adapter_in_model(self.peft_config, model, adapter_name=ADAPTER_NAME)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def lora_layers(self) -> dict[str, nn.Module]:
        """Module path (relative to the wrapped model) -> PEFT LoRA layer, in model order."""
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable LoRA parameters by their name in the wrapped model (``...lora_A.default.weight``)."""
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def gate_values(self) -> dict[str, float]:
        return {}  # no gate: one update on every token

    @contextmanager
    def branches(self, image: bool = True, text: bool = True) -> Iterator[None]:
        """The adapter on (both true) or off (both false: the base model). LoRA has no per-modality branch."""
        if image != text:
            raise ValueError("plain LoRA applies one update to every token: it has no image or text branch alone")
        layers = list(self.lora_layers().values())
        saved = [layer._disable_adapters for layer in layers]
        try:  # the flag lora.Linear.forward reads; enable_adapters() would also flip requires_grad mid-training
            for layer in layers:
                layer._disable_adapters = not image
            yield
        finally:
            for layer, flag in zip(layers, saved):
                layer._disable_adapters = flag

    def enable_activation_checkpointing(self) -> None:
        """Non-reentrant checkpointing of every decoder layer; recomputes flagged as MaLoRA's are."""
        enable_replaying_checkpointing(self.model, self.context)

    # -- save / load ---------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.adapter_parameters().items()}

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write a PEFT adapter directory from ``state`` (names as :meth:`adapter_parameters`) or the live weights."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state if state is not None else self.adapter_state_dict()
        tag = f".{ADAPTER_NAME}."
        save_file({PEFT_PREFIX + n.replace(tag, "."): t.contiguous() for n, t in state.items()},
                  str(directory / ADAPTER_WEIGHTS))
        self.peft_config.save_pretrained(str(directory))
        meta = {"method": "lora", "malora": self.malora_config.to_dict()}
        (directory / KSCALE_META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> LoRAModel:
        """Inject the adapter saved in ``directory`` (by :meth:`save_pretrained`) into ``model`` and load it."""
        from safetensors.torch import load_file

        peft = _require_peft()
        directory = Path(directory)
        meta = json.loads((directory / KSCALE_META).read_text())
        wrapped = cls(model, MaLoRAConfig.from_dict(meta["malora"]),
                      peft.LoraConfig.from_pretrained(str(directory)))
        saved = load_file(str(directory / ADAPTER_WEIGHTS))
        tag = f".{ADAPTER_NAME}."
        params = wrapped.adapter_parameters()
        state = {n: saved.get(PEFT_PREFIX + n.replace(tag, ".")) for n in params}
        missing = sorted(n for n, t in state.items() if t is None)
        if missing or len(saved) != len(params):
            raise ValueError(f"{directory}: LoRA adapter does not match the model: missing {missing[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))
        return wrapped


def is_lora_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` holds an adapter saved by :class:`LoRAModel` (a train run's ``adapter/``)."""
    path = Path(directory) / KSCALE_META
    return path.is_file() and json.loads(path.read_text()).get("method") == "lora"


def load_trained(model: nn.Module, directory: str | Path) -> Any:
    """The adapter of a train run (MaLoRA or LoRA, as ``adapter_config.json`` says) injected into ``model``."""
    if is_lora_adapter(directory):
        return LoRAModel.from_pretrained(model, directory)
    from kscale.adapters import MaLoRAModel

    return MaLoRAModel.from_pretrained(model, directory)
