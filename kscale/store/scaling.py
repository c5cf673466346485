"""The scale of the model's attention logits, as the store records it: the one place that knows its name.

Attention scores are ``q·k * scale`` before the softmax. Most models scale by ``1/sqrt(head_dim)``; some do not
(Gemma's ``query_pre_attn_scalar``, models with a logit soft-cap or a learned temperature). The extraction
records the model's own scale in the store's model attributes (``attention_scaling``, with the q/k/v kinds);
readers call :func:`attention_scale`, which falls back to ``1/sqrt(head_dim)`` for stores that do not carry
it (every version-1/2 store).
"""

from __future__ import annotations

import math

SCALE_ATTRIBUTE = "attention_scaling"  # attrs["model"][...] (Adapter.attention_facts), or attrs[...]


def attention_scale(attrs: dict, head_dim: int) -> tuple[float, str]:
    """(scale, where it came from: "store" or "1/sqrt(head_dim)") of a store's attributes."""
    value = (attrs.get("model") or {}).get(SCALE_ATTRIBUTE, attrs.get(SCALE_ATTRIBUTE))
    if value is not None:
        return float(value), "store"
    return 1.0 / math.sqrt(head_dim), "1/sqrt(head_dim)"
