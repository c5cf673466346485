"""The key store: layout (layout.py), shard writer (writer.py) and lazy reader (reader.py).

``kscale.store.open(path)`` is the reader's entry point; docs/store.md documents the format.
"""

from kscale.store.layout import MODALITIES, STORE_FORMAT, STORE_VERSION, is_store  # noqa: F401
from kscale.store.reader import KeyStore, StoreError, open_store  # noqa: F401
from kscale.store.writer import ShardWriter  # noqa: F401

open = open_store  # noqa: A001 - the documented public name: kscale.store.open(path)
