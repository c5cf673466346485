"""The key store: layout (layout.py), index (index.py), shard writer (writer.py), lazy reader
(reader.py) and checks (verify.py).

``kscale.store.open(path)`` is the reader's entry point; docs/store.md documents the format. The reader
and writer (zarr, dask) load on first use, so ``kscale info`` (layout + index only) starts fast.
"""

from kscale.store.layout import MODALITIES, STORE_FORMAT, STORE_VERSION, StoreError, is_store  # noqa: F401

_LAZY = {"KeyStore": "kscale.store.reader", "StoreDamaged": "kscale.store.reader", "open_store": "kscale.store.reader",
         "open": "kscale.store.reader", "ShardWriter": "kscale.store.writer"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kscale.store' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(_LAZY[name])
    return getattr(mod, "open_store" if name == "open" else name)  # open: the documented kscale.store.open(path)
