"""Data sources and the shard plan.

A source turns a ``DataSpec`` into indexable ``Record``s. A record that cannot be used (missing or
corrupt image, empty text) is still returned, carrying ``error``: the stage records it in the store's
error table and goes on. ``plan_shards`` cuts the index range into fixed shards, so the same spec
always gives the same shards (the unit of work, retry and resume).
"""

from kscale.data.records import Record, Shard, open_source, plan_shards  # noqa: F401
