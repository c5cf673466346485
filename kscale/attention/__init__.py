"""Attention utilisation beside the key gap (docs/attention.md).

- ``stats``: per-sample attention statistics computed from hooked q/k projections (during extraction,
  and in the MaLoRA evaluation);
- ``report``: utilisation by layer and head with intervals, next to the key gap, and a figure.

Post-RoPE keys and stored query vectors belong to the store (:mod:`kscale.store.rope`,
:mod:`kscale.store.queries`).
"""
