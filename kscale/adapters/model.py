"""Model-level MaLoRA: inject the layers, feed them the modality mask, save, load and merge.

:class:`MaLoRAModel` wraps a Hugging Face vision-language model (PEFT's ``LoraModel`` shape): it freezes
the base, swaps each target ``nn.Linear`` of the language model's decoder layers for a
:class:`~kscale.adapters.layer.MaLoRALinear`, and registers one forward pre-hook on the wrapped model
that turns ``input_ids`` into the image mask all layers read through a shared
:class:`~kscale.adapters.layer.ModalityContext`. The hook lives as long as the adapter does and is
removed by :meth:`MaLoRAModel.unload`.

Activation checkpointing recomputes a decoder layer in the backward pass, possibly after other forwards
changed the context; :meth:`MaLoRAModel.enable_activation_checkpointing` wraps the model's checkpoint
function so each recompute runs with the mask of its own forward (and flags it, so key capture in
:mod:`kscale.train.objective` does not record the replay twice).

Saved adapter directory: ``adapter_model.safetensors`` (keys ``<module path>.<param name>`` with the
names of :data:`~kscale.adapters.layer.MALORA_PARAM_NAMES`) and ``adapter_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kscale.models.facts import resolve_layers
from kscale.adapters.layer import MALORA_PARAM_NAMES, MaLoRALinear, ModalityContext
from kscale.spec import section_problems
from kscale.spec.adapter import ADAPTER_CONFIG
from kscale.spec.malora import MaLoRAConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # MaLoRA's, and PEFT's name too
FORMAT_VERSION = 1


def model_adapter(model: nn.Module) -> Any:
    """The :mod:`kscale.models` adapter of a loaded model (where its decoder layers and token ids are)."""
    from kscale.models.registry import get_adapter

    return get_adapter(getattr(model.config, "model_type", ""))


def visual_token_ids(model: nn.Module) -> tuple[int, ...]:
    """Token ids that stand for image or video patches."""
    adapter = model_adapter(model)
    ids = [adapter.image_token_id(model.config), adapter.video_token_id(model.config)]
    return tuple(int(i) for i in ids if i is not None)


class MaLoRAModel(nn.Module):
    """A frozen vision-language model with MaLoRA layers in its language model; ``forward`` is the model's."""

    def __init__(self, model: nn.Module, config: MaLoRAConfig) -> None:
        super().__init__()
        errors = section_problems(config)  # also a config read back from adapter_config.json
        if errors:
            raise ValueError("; ".join(f"malora.{f}: {m}" for f, m in errors))
        self.model = model
        self.malora_config = config
        self.context = ModalityContext()
        self._visual_ids = visual_token_ids(model)
        model.requires_grad_(False)
        self._inject()
        self._hook = model.register_forward_pre_hook(self._set_modality_mask, with_kwargs=True)

    def _inject(self) -> None:
        adapter = model_adapter(self.model)
        layers = adapter.decoder_layers(self.model)
        for idx in resolve_layers(self.malora_config.layers, len(layers), "malora.layers"):
            for target in self.malora_config.target_modules:
                parent = getattr(layers[idx], adapter.malora_parent(target))
                base = getattr(parent, target, None)
                if not isinstance(base, nn.Linear):
                    raise ValueError(f"Target module {target!r} not found as nn.Linear in language layer {idx}")
                setattr(parent, target, MaLoRALinear(base, self.malora_config, self.context))

    def _set_modality_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self.context.image_mask_BT = None  # the layers refuse to run without a mask
            return
        ids = torch.tensor(self._visual_ids, device=input_ids.device)
        self.context.image_mask_BT = torch.isin(input_ids, ids)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- introspection -------------------------------------------------------------------------------------
    def malora_layers(self) -> dict[str, MaLoRALinear]:
        """Module path (relative to the wrapped model) -> MaLoRA layer, in model order."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MaLoRALinear)}

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable adapter parameters with their stable names ``<module path>.<MALORA_PARAM_NAMES item>``."""
        out = {}
        for path, layer in self.malora_layers().items():
            for pname in MALORA_PARAM_NAMES:
                param = getattr(layer, pname, None)
                if param is not None:
                    out[f"{path}.{pname}"] = param
        return out

    def gate_values(self) -> dict[str, float]:
        """Mean per-layer gate of each branch (for logs); token gates report their sigmoid bias."""
        out = {}
        for path, layer in self.malora_layers().items():
            for branch in layer.branches:
                g = getattr(layer, f"malora_gate_{branch}", None)
                if g is not None and g.numel() > 0:
                    value = torch.sigmoid(g) if layer.config.gate == "token" else g
                    out[f"{path}.{branch}"] = float(value.detach().float().mean())
        return out

    @contextmanager
    def branches(self, image: bool = True, text: bool = True) -> Iterator[None]:
        """Switch branches off for a block (``image=False``: partial-modality ablation; both: base model)."""
        with self.context.branches(image=image, text=text):
            yield

    # -- activation checkpointing --------------------------------------------------------------------------
    def enable_activation_checkpointing(self) -> None:
        """Non-reentrant checkpointing of every decoder layer, with the modality mask pinned per forward."""
        enable_replaying_checkpointing(self.model, self.context)

    # -- save / load / merge -------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.adapter_parameters().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.adapter_parameters()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"adapter state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the adapter (``state`` if given, e.g. gathered from ZeRO-3 shards) as safetensors + json."""
        from safetensors.torch import save_file

        if any(layer.text_merged for layer in self.malora_layers().values()):
            raise RuntimeError("the text branch is merged into W; save the adapter before merging")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state if state is not None else self.adapter_state_dict(), str(directory / ADAPTER_WEIGHTS))
        meta = {"format": "malora", "version": FORMAT_VERSION, "malora": self.malora_config.to_dict()}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> MaLoRAModel:
        """Inject the adapter saved in ``directory`` into ``model`` and load its weights."""
        from safetensors.torch import load_file

        config = load_adapter_config(directory)
        wrapped = cls(model, config)
        wrapped.load_adapter_state_dict(load_file(str(Path(directory) / ADAPTER_WEIGHTS)))
        return wrapped

    def merge_text_branch(self) -> None:
        """Fold the text branch into the base weights; the image branch stays a (now self-correcting) adapter."""
        for layer in self.malora_layers().values():
            layer.merge_text_branch()

    def unload(self) -> nn.Module:
        """Remove the hook and put the base Linears back (unmerged weights only); returns the base model."""
        self._hook.remove()
        for path, layer in self.malora_layers().items():
            if layer.text_merged:
                raise RuntimeError(f"{path}: text branch is merged; unload would keep the merged weights")
            parent_name, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent_name), leaf, layer.base_layer)
        return self.model


def load_adapter_config(directory: str | Path) -> MaLoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no MaLoRA adapter at {directory}: {ADAPTER_CONFIG} missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != "malora":
        raise ValueError(f"{path}: not a MaLoRA adapter config (format={meta.get('format')!r})")
    return MaLoRAConfig.from_dict(meta["malora"])


def enable_replaying_checkpointing(model: nn.Module, context: ModalityContext) -> None:
    """Non-reentrant checkpointing of every decoder layer of ``model`` whose recomputes replay ``context``
    (the modality mask of the forward they recompute): MaLoRA's and the plain-LoRA baseline's."""
    model.activation_checkpointing_enable({"use_reentrant": False})
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            module._gradient_checkpointing_func = _replaying_checkpoint(func, context)


def _replaying_checkpoint(checkpoint_fn: Callable, context: ModalityContext) -> Callable:
    """Wrap a ``torch.utils.checkpoint``-style function so the recompute sees the forward's mask."""

    def run(function: Callable, *args: Any, **kwargs: Any) -> Any:
        mask_BT = context.image_mask_BT
        calls = [0]

        def replay(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            with context.replaying(mask_BT, recomputing=calls[0] > 1):
                return function(*a, **k)

        return checkpoint_fn(replay, *args, **kwargs)

    return run
