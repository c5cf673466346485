"""Data sources and the shard plan.

A source turns a ``DataSpec`` into indexable ``Record``s. A record that cannot be used (missing or
corrupt image, empty text) is still returned, carrying ``error``: the stage records it in the store's
error table and goes on. ``plan_shards`` cuts the index range into fixed shards, so the same spec
always gives the same shards (the unit of work, retry and resume).

Sources (``records.py``: manifest, saved datasets; ``parquet.py``, ``hub.py``, ``webdataset.py``) read only
the rows a worker asks for, through indexes the driver builds once while planning and keeps beside the
output (``lineindex.py``, ``files.py``); ``rows.py`` turns a row's images and conversation into the record's
turns; ``identity.py`` is what resume compares. See docs/data.md.
"""

from kscale.data.records import Record, Shard, open_source, plan_shards  # noqa: F401
