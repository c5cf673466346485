"""Attention utilisation beside the key gap (issue 4; docs/attention.md).

- ``stats``: per-sample attention statistics computed during extraction from hooked q/k projections;
- ``keyspace``: post-RoPE keys rebuilt lazily from the stored pre-RoPE keys and positions;
- ``queries``: optional query vectors stored like keys;
- ``report``: utilisation by layer and head with intervals, next to the key gap, and a figure.
"""
