"""The key store's layout, in one place (documented in docs/store.md).

Version 2 (written today)::

    STORE/                           Zarr v3 group; attrs: see ``extract.run.root_attrs`` (``version: 2``)
      _index.json                    the store index (kscale.store.index): one row per committed shard
      shards/                        Zarr group (``zarr.json``), so plain zarr/xarray can walk the store
        sNNNNNN/                     one group per committed shard (written as ``.sNNNNNN.tmp-<host>-<pid>-<token>``
                                     beside its ``.owner`` record, and renamed)
          <modality>/                text, image, video, special: only those present in the shard
            keys    (layer, token, kv_head, head_dim) float16|float32; Zarr sharding: one file per
                    ``chunk_tokens`` rows holding every layer (shard (L, c, H, D)), inner chunks (1, c, H, D)
                    so reading one layer reads only its bytes; crc32c on every inner chunk and on the index
            tokens  (token, field) int64, chunks (c, F), zstd + crc32c; fields ``token_fields(R)``:
                    sample_id, position, token_id, image_index, rope_0 .. rope_{R-1}, and in stores whose
                    root attrs list ``token_fields`` (written since videos) video_index, frame, time_ms
          queries/<modality>/queries (layer, token, q_head, head_dim)  with ``extract.vectors`` holding q: laid
          values/<modality>/values   (layer, token, kv_head, head_dim)  out and checked like keys, same rows
          attention/                 optional side tables (crc32c too)
        sNNNNNN.done.json            commit marker, created exclusively, last: stats, errors, every file + size
        sNNNNNN.damaged-<time>.json  a marker moved aside by ``kscale verify --repair`` (not committed)
      _progress.json                 live progress of the running / last job

Version 1 (read as before): per modality ``keys`` with chunks (1, c, H, D), one file per layer and
chunk, and five column arrays (``TABLE_COLUMNS``); markers without ``files``. A store's shards say their
own layout in their marker (``layout``: 2; absent means 1).

Keys of one (layer, modality) are contiguous within a shard. Each shard is written in its own staging
folder and appears under its final name only at commit: no two writers ever touch one chunk, and a
committed shard is never written into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kscale.errors import KscaleError
from kscale.output import write_json_atomic  # noqa: F401  (the one atomic JSON writer; markers use it)

from kscale.models.facts import MODALITIES  # noqa: F401  (one definition, with the tags, in kscale.models)

STORE_FORMAT = "kscale-keys"
STORE_VERSION = 2
SHARD_LAYOUT = 2  # ``layout`` in a v2 marker; v1 markers have none
TABLE_COLUMNS = {  # the reader's token columns and their dtypes (v1: one array each; v2: fields of ``tokens``)
    "sample_id": "int64",
    "position": "int32",
    "rope_pos": "int32",
    "token_id": "int32",
    "image_index": "int16",
    "video_index": "int16",  # which video of the sample (-1: not in a video block)
    "frame": "int32",  # which frame of that video (Qwen3-VL's "<t seconds>" text carries its frame too)
    "time_ms": "int32",  # that frame's time in the video, milliseconds (-1 outside videos)
}
VIDEO_FIELDS = ("video_index", "frame", "time_ms")  # after the rope fields; absent from older stores
COLUMN_FILL = -1  # what a column a store does not hold reads as (VIDEO_FIELDS of a store written before them)
KEY_DIMS = ("layer", "token", "kv_head", "head_dim")
# The vectors a store can hold, each hooked on its own projection (``extract.vectors``): queries per query
# head (those reading the kept KV heads), keys and values per kept KV head. Keys are always written (their
# group carries the token table every kind's rows are aligned with); q and v sit in their own groups.
VECTOR_KINDS = ("q", "k", "v")
VECTOR_GROUPS = {"q": "queries", "v": "values"}  # top-level group of q/v in a shard (keys: the modality groups)
VECTOR_DIMS = {"q": ("layer", "token", "q_head", "head_dim"), "k": KEY_DIMS, "v": KEY_DIMS}
TOKEN_DIMS = ("token", "field")
INDEX_FILE = "_index.json"
# Zarr array options of every layout-2 array: flat chunk files (``c.0.3.0.0``, the names readers and
# markers use) and no scan for all-fill chunks (every chunk is written: a missing file is damage).
FLAT_CHUNKS = {"chunk_key_encoding": {"name": "default", "separator": "."}, "config": {"write_empty_chunks": True}}
MARKER_SUFFIX = ".done.json"


class StoreError(KscaleError, ValueError):
    """A path is not a readable key store, or a read asks for something the store does not hold."""


def token_fields(rope_rows: int, video: bool = False) -> tuple[str, ...]:
    """Field names of the v2 ``tokens`` array (its second axis); ``video``: with ``VIDEO_FIELDS`` (new stores)."""
    return ("sample_id", "position", "token_id", "image_index", *(f"rope_{r}" for r in range(rope_rows)),
            *(VIDEO_FIELDS if video else ()))


def store_token_fields(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The token fields of a store from its root attributes (stores written before videos list none)."""
    return tuple(attrs.get("token_fields") or token_fields(int(attrs.get("rope_rows", 1))))


def field_slice(name: str, rope_rows: int, fields: tuple[str, ...] | None = None) -> slice:
    """Which fields of ``tokens`` make the reader's column ``name`` (``rope_pos`` is R fields)."""
    fields = fields or token_fields(rope_rows)
    if name == "rope_pos":
        return slice(4, 4 + rope_rows)
    i = fields.index(name)
    return slice(i, i + 1)


def shard_dir(store: str | Path, shard_name: str) -> Path:
    return Path(store) / "shards" / shard_name


def staging_dir(store: str | Path, shard_name: str, tag: str) -> Path:
    """Where a writer writes ``shard_name`` before the commit renames it to ``shard_dir``: ``tag`` is
    ``<host>-<pid>-<token>`` (``kscale.store.staging``: unique across hosts and writers). Stores written before
    owner records have ``.<name>.tmp-<pid>`` leftovers (no record; swept as before)."""
    return Path(store) / "shards" / f".{shard_name}.tmp-{tag}"


def staging_record(store: str | Path, shard_name: str, tag: str) -> Path:
    """The owner record beside ``staging_dir``: who writes it, and (its mtime) the writer's heartbeat."""
    return Path(store) / "shards" / f".{shard_name}.tmp-{tag}.owner"


def marker_path(store: str | Path, shard_name: str) -> Path:
    return Path(store) / "shards" / f"{shard_name}{MARKER_SUFFIX}"


def vector_array(kind: str, modality: str) -> str:
    """Path inside a shard of the ``kind`` vectors of ``modality``: ``image/keys``, ``queries/image/queries``,
    ``values/image/values`` (q as ``extract.attention.store_queries`` always wrote it)."""
    if kind == "k":
        return f"{modality}/keys"
    g = VECTOR_GROUPS[kind]
    return f"{g}/{modality}/{g}"


def store_vectors(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The kinds a store holds, from its root attributes: ``vectors`` (written since q/k/v peers), else keys,
    plus q where the spec stored queries (``extract.attention.store_queries``, before ``vectors`` existed)."""
    if attrs.get("vectors"):
        return tuple(k for k in VECTOR_KINDS if k in attrs["vectors"])
    extract = (attrs.get("spec") or {}).get("extract") or {}
    return ("q", "k") if (extract.get("attention") or {}).get("store_queries") else ("k",)


def keys_chunk_file(shard_tokens_index: int) -> str:
    """File of the ``i``-th ``chunk_tokens`` rows of a v2 ``keys`` array (shard grid (0, i, 0, 0))."""
    return f"c.0.{shard_tokens_index}.0.0"


def tokens_chunk_file(i: int) -> str:
    return f"c.{i}.0"


def is_store(path: str | Path) -> bool:
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("format") == STORE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def read_root_attrs(path: str | Path) -> dict[str, Any]:
    """The store's root attributes (its ``zarr.json``), after checking that ``path`` is a kscale store.
    Plain JSON: opening a store for ``kscale info`` imports neither zarr nor dask."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StoreError(f"no store at {str(p)!r}")
    if not is_store(p):
        raise StoreError(f"{str(p)!r} is not a kscale key store (no zarr.json with format kscale-keys)")
    return dict(json.loads((p / "zarr.json").read_text())["attributes"])


def marker_names(store: str | Path) -> list[str]:
    """Names of committed shards: one directory listing, no file opened."""
    root = Path(store) / "shards"
    if not root.is_dir():
        return []
    n = len(MARKER_SUFFIX)
    return sorted(e.name[:-n] for e in os.scandir(root) if e.name.endswith(MARKER_SUFFIX) and e.name[0] == "s")


def read_marker(store: str | Path, shard_name: str) -> dict:
    """A shard's marker; ``ValueError`` naming the file when it is not a JSON object."""
    p = marker_path(store, shard_name)
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"marker {p}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"marker {p}: not a JSON object")
    return m


def committed_shards(store: str | Path) -> dict[str, dict]:
    """Shard name -> marker contents, for every committed shard (reads every marker; prefer
    ``marker_names`` for the names and ``kscale.store.index`` for the rows). A garbage marker gives
    ``{"invalid": reason}``: the shard stays committed (never silently redone) until ``kscale verify
    --repair`` un-commits it."""
    out = {}
    for name in marker_names(store):
        try:
            out[name] = read_marker(store, name)
        except ValueError as e:
            out[name] = {"invalid": str(e)}
    return out
