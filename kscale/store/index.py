"""The store index: one small table of committed shards, so a reader needs no per-shard file to open.

``STORE/_index.json`` holds one row per committed shard (``index_row``: sample range, tokens and row
offset per modality, key bytes, chunking, its groups, number of files and bytes on disk) and the shards
whose marker is unreadable (``invalid``: name -> reason). The reader builds every lazy array from these
rows alone (``reader.py``); ``summary()`` and ``kscale info`` sum them.

Markers stay the truth. ``load_index`` compares the index's shard names with one directory listing of
the markers (``layout.marker_names``); when they differ (a shard committed or un-committed since), or
the index is missing or unreadable, the rows are rebuilt from the markers. A marker is read only to
build its row, so an index never lists a shard that has no marker. The index is written atomically
(``write_index``) at the end of every extraction, by ``kscale info --reindex`` and by ``kscale verify
--repair``; a reader never writes it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kscale.output import fence
from kscale.store.layout import (INDEX_FILE, MODALITIES, StoreError, marker_names, read_marker, read_root_attrs,
                                 store_vectors, write_json_atomic)

INDEX_FORMAT = "kscale-index"
INDEX_VERSION = 1


@dataclass
class Index:
    """Committed shards in shard order (name -> row) and shards with an unreadable marker."""
    rows: dict[str, dict[str, Any]]
    invalid: dict[str, str] = field(default_factory=dict)
    source: str = "markers"  # "index" when read from _index.json as it was

    def names(self) -> set[str]:
        return set(self.rows) | set(self.invalid)


def index_row(name: str, marker: dict) -> dict[str, Any]:
    """A shard's row, from its marker; ``ValueError`` when the marker lacks what a reader needs."""
    tokens = marker.get("tokens")
    if not isinstance(tokens, dict) or not all(isinstance(tokens.get(m, 0), int) for m in MODALITIES):
        raise ValueError(f"marker of {name}: no token counts")
    layout = marker.get("layout", 1)
    files = marker.get("files")
    if layout != 1 and (not isinstance(files, dict) or not isinstance(marker.get("chunk_tokens"), int)):
        raise ValueError(f"marker of {name}: layout {layout} without files or chunk_tokens")
    return {
        "name": name, "start": marker.get("start"), "stop": marker.get("stop"),
        "n_samples_ok": int(marker.get("n_samples_ok", 0)), "n_errors": len(marker.get("errors", [])),
        "tokens": {m: int(tokens.get(m, 0)) for m in MODALITIES}, "key_bytes": int(marker.get("key_bytes", 0)),
        "layout": layout, "chunk_tokens": marker.get("chunk_tokens"), "groups": marker.get("groups"),
        "files": len(files) if files is not None else None,
        "disk_bytes": sum(files.values()) if files is not None else None,
    }


def _row_or_reason(store: Path, name: str) -> tuple[str, dict | str]:
    try:
        return name, index_row(name, read_marker(store, name))
    except ValueError as e:
        return name, str(e)


def build_index(store: str | Path, names: list[str] | None = None) -> Index:
    """Rows from the markers (read in parallel threads: many small files)."""
    store = Path(store)
    names = marker_names(store) if names is None else names
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda n: _row_or_reason(store, n), names))
    return Index(rows={n: r for n, r in got if isinstance(r, dict)},
                 invalid={n: r for n, r in got if isinstance(r, str)})


def _with_offsets(rows: list[dict]) -> list[dict]:
    at = {m: 0 for m in MODALITIES}
    for r in rows:
        r["offset"] = dict(at)
        for m in MODALITIES:
            at[m] += r["tokens"][m]
    return rows


def write_index(store: str | Path, index: Index | None = None) -> Index:
    """Write ``_index.json`` atomically (rebuilt from the markers unless given); return it."""
    fence(store)  # a run whose store lock was taken over leaves the index to the run that took it
    index = build_index(store) if index is None else index
    rows = _with_offsets([dict(r) for r in index.rows.values()])
    write_json_atomic(Path(store) / INDEX_FILE, {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                                                 "shards": rows, "invalid": index.invalid})
    return index


def read_index_file(store: str | Path) -> Index | None:
    """``_index.json`` as written, or None when missing or unreadable (a half-written temp is never it)."""
    p = Path(store) / INDEX_FILE
    try:
        d = json.loads(p.read_text())
        if d.get("format") != INDEX_FORMAT or d.get("version") != INDEX_VERSION:
            return None
        return Index(rows={r["name"]: r for r in d["shards"]}, invalid=dict(d["invalid"]), source="index")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def load_index(store: str | Path) -> Index:
    """The committed shards: the index file when it matches the marker listing, else rebuilt from markers
    (only the markers it lacks are read; rows of shards no longer committed are dropped)."""
    names = marker_names(store)
    idx = read_index_file(store)
    if idx is not None and idx.names() == set(names):
        return idx
    known = idx.rows if idx is not None else {}
    new = build_index(store, [n for n in names if n not in known])
    rows = {n: known[n] if n in known else new.rows.get(n) for n in names}
    return Index(rows={n: r for n, r in rows.items() if r is not None}, invalid=new.invalid)


def shard_errors(store: str | Path, index: Index) -> list[dict]:
    """Per-sample errors of committed shards (read from the markers of shards that have some)."""
    return [e for name, r in index.rows.items() if r["n_errors"]
            for e in read_marker(store, name).get("errors", [])]


def summarize(store: str | Path, attrs: dict[str, Any], index: Index) -> dict[str, Any]:
    """``KeyStore.summary()`` / ``kscale info``: sums of the index rows, no shard file opened or stat'ed
    (a store with layout-1 shards, whose markers list no files, is walked for its size as before)."""
    root = Path(store)
    rows = index.rows.values()
    if any(r["disk_bytes"] is None for r in rows):
        disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    else:
        disk = sum(r["disk_bytes"] for r in rows) + sum(
            p.stat().st_size for p in (root / "zarr.json", root / "shards" / "zarr.json") if p.is_file())
    tokens = {m: sum(r["tokens"][m] for r in rows) for m in MODALITIES}
    out = {
        "path": str(store),
        "model": attrs.get("model", {}).get("path"),
        "family": attrs.get("model", {}).get("family"),
        "version": attrs.get("version", 1),
        "shards_committed": len(index.rows),
        "shards_planned": attrs.get("plan", {}).get("n_shards"),
        "samples": sum(r["n_samples_ok"] for r in rows),
        "errors": sum(r["n_errors"] for r in rows),
        "tokens": tokens,
        "layers": list(attrs["layers"]),
        "heads": list(attrs["heads"]),
        "head_dim": int(attrs["head_dim"]),
        "vectors": list(store_vectors(attrs)),  # q, k, v (extract.vectors)
        "key_dtype": attrs.get("key_dtype"),
        **({"key_source": attrs["key_source"]} if "key_source" in attrs else {}),  # k_proj or k_norm output
        "key_bytes": sum(r["key_bytes"] for r in rows),
        "disk_bytes": disk,
    }
    if "q" in out["vectors"]:
        m = attrs["model"]
        G = m["num_heads"] // m["num_kv_heads"]
        out["query_heads"] = [h * G + g for h in attrs["heads"] for g in range(G)]  # those reading the kept KV heads
    if "attention_scaling" in attrs.get("model", {}):  # what the model multiplies q·k by
        out["attention_scaling"] = attrs["model"]["attention_scaling"]
    if attrs.get("adapter"):  # extract.adapter: the adapted model's keys
        a = attrs["adapter"]
        out["adapter"] = f"{a['kind']} {a['path']}{' (merged)' if a.get('merge') else ''} (files {a['fingerprint']})"
    if "deepstack_layers" in attrs.get("model", {}):  # Qwen3-VL: visual features injected after these layers
        out["deepstack_layers"] = list(attrs["model"]["deepstack_layers"])
    prompt = attrs.get("prompt_template")  # the whole template is in the root attributes
    if prompt:
        out["prompt_template"] = (f"{prompt['kind']} (sha256 {prompt['sha256'][:12]})" if prompt["kind"] == "native"
                                  else f"{prompt['kind']} {prompt['template']!r}")
    if index.invalid:
        out["shards_invalid"] = dict(index.invalid)
    return out


def store_identity(store: str | Path) -> dict[str, Any]:
    """What a store is, for the runs that read it (an analysis records it and refuses to resume over another):
    the spec fingerprint and data identity it was extracted with, when it was created (an overwrite makes a
    new store) and how many shards are committed (one directory listing). ``{"unreadable": why}`` when
    ``store`` is not a readable key store here."""
    try:
        attrs = read_root_attrs(store)
    except (StoreError, OSError, ValueError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}
    return {"spec_fingerprint": attrs.get("spec_fingerprint"), "data": attrs.get("data"),
            "created_at": attrs.get("created_at"), "committed_shards": len(marker_names(store))}
