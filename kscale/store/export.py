"""Keys out of kscale: a key store as Parquet shards or a ``datasets``-loadable folder (``kscale export``).

One Parquet file per committed store shard, written shard by shard (memory: one shard's rows of the
chosen layers, whatever the store's size)::

    DIR/
      README.md                  the dataset card: what each column is (with YAML front matter for ``--to hf``:
                                 ``configs`` and ``dataset_info.features``, so ``load_dataset(DIR)`` needs no guess)
      data/keys-sNNNNNN.parquet  one row per stored token, rows in the order ``KeyStore.keys`` gives them
                                 (modality by modality in ``--modalities`` order, then by shard)
      kscale_store.json          the store's root attributes (model, layers, heads, spec), for provenance

Columns: ``modality`` (text, image, video, special), the token table (``sample_id``, ``position``,
``token_id``, ``image_index``, ``video_index``, ``frame``, ``time_ms``, ``rope`` = the ``rope_rows`` RoPE position ids) and one ``keys_layer_<L>``
per exported layer: the token's pre-RoPE key of every stored KV head, flattened (kv_head, head_dim)
row-major, as a fixed-size list of the store's key dtype (float16 or float32). Read back through
``datasets`` or pyarrow these are the stored bytes (``tests/unit/test_export.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kscale.store.layout import MODALITIES, TABLE_COLUMNS
from kscale.store.reader import KeyStore


# every token column but the RoPE positions (the ``rope`` list column), in the reader's order
SCALAR_COLUMNS = tuple(c for c in TABLE_COLUMNS if c != "rope_pos")


def _schema(ks: KeyStore, layers: list[int]):
    import pyarrow as pa

    width = len(ks.heads) * ks.head_dim
    value = pa.float16() if ks.attrs["key_dtype"] == "float16" else pa.float32()
    t = {c: pa.from_numpy_dtype(np.dtype(d)) for c, d in TABLE_COLUMNS.items()}  # the reader's dtypes
    fields = [pa.field("modality", pa.string())] + [pa.field(c, t[c]) for c in SCALAR_COLUMNS]
    fields.append(pa.field("rope", pa.list_(t["rope_pos"], ks.rope_rows)))
    fields += [pa.field(f"keys_layer_{layer}", pa.list_(value, width)) for layer in layers]
    return pa.schema(fields)


def _shard_table(ks: KeyStore, k: int, layers: list[int], modalities: list[str], schema):
    import pyarrow as pa

    cols: dict[str, list] = {f.name: [] for f in schema}
    width = len(ks.heads) * ks.head_dim
    for m in modalities:
        rows, starts = ks._row_starts(m)
        lo, hi = int(starts[k]), int(starts[k + 1])
        if hi == lo:
            continue
        cols["modality"].append(pa.array([m] * (hi - lo), pa.string()))
        for c in TABLE_COLUMNS:
            v = np.asarray(ks.column_rows(m, c, lo, hi).compute())
            if c == "rope_pos":
                cols["rope"].append(pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), ks.rope_rows))
            else:
                cols[c].append(pa.array(v))
        for layer in layers:
            keys = np.ascontiguousarray(ks.keys_rows(layer, m, lo, hi).compute()).reshape(-1)
            cols[f"keys_layer_{layer}"].append(pa.FixedSizeListArray.from_arrays(pa.array(keys), width))
    if not cols["modality"]:
        return None
    return pa.Table.from_arrays([pa.concat_arrays(cols[f.name]) for f in schema], schema=schema)


def export_store(store: str, out: str | Path, to: str = "parquet", layers: list[int] | None = None,
                 modalities: list[str] | None = None) -> list[Path]:
    """Write the store's keys and token table under ``out`` (see module docstring); returns the Parquet files."""
    import pyarrow.parquet as pq

    import kscale.store

    ks = kscale.store.open(store)
    layers = ks.layers if layers is None else [ks.layers[ks._layer_pos(layer)] for layer in layers]
    modalities = list(MODALITIES) if modalities is None else list(modalities)
    for m in modalities:
        ks._check_modality(m)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    schema = _schema(ks, layers)
    files = []
    names = list(ks.shards)
    for k, name in enumerate(names):  # one shard in memory at a time
        table = _shard_table(ks, k, layers, modalities, schema)
        if table is None:
            continue
        path = out / "data" / f"keys-{name}.parquet"
        pq.write_table(table, path)
        files.append(path)
    (out / "kscale_store.json").write_text(json.dumps(ks.attrs, indent=1, sort_keys=True, default=str))
    (out / "README.md").write_text(card(ks, layers, modalities, to, len(files)))
    return files


def card(ks: KeyStore, layers: list[int], modalities: list[str], to: str, n_files: int) -> str:
    """The dataset card: YAML front matter (for ``hf``) and what each column is."""
    model = ks.attrs.get("model", {})
    dtype = ks.attrs["key_dtype"]
    width = len(ks.heads) * ks.head_dim
    head = ""
    if to == "hf":
        feats = [{"name": "modality", "dtype": "string"}] + [
            {"name": c, "dtype": TABLE_COLUMNS[c]} for c in SCALAR_COLUMNS]
        feats.append({"name": "rope", "sequence": TABLE_COLUMNS["rope_pos"], "length": ks.rope_rows})
        feats += [{"name": f"keys_layer_{layer}", "sequence": dtype, "length": width} for layer in layers]
        meta = {"configs": [{"config_name": "default", "data_files": [{"split": "train",
                                                                          "path": "data/keys-*.parquet"}]}],
                "dataset_info": {"features": feats}, "tags": ["kscale", "attention-keys"]}
        import yaml

        head = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"
    lines = [
        f"# Attention keys of {model.get('path', '?')} (kscale export)", "",
        f"Pre-RoPE key vectors of the language model ({model.get('family', '?')}, {model.get('num_layers', '?')} "
        f"layers), one row per stored token, {n_files} Parquet file(s) under `data/` (one per kscale shard). "
        f"Layers: {layers}; KV heads: {ks.heads}; head dim: {ks.head_dim}; modalities: {modalities}.", "",
        "| column | type | meaning |", "|---|---|---|",
        "| modality | string | text, image, video or special: which kind of token this is |",
        "| sample_id | int64 | the record's position in the job's data (kscale's sample id) |",
        "| position | int32 | the token's index in its sample's sequence |",
        "| token_id | int32 | the tokenizer's id of the token |",
        "| image_index | int16 | which image of the sample an image token belongs to (0-based; as KeyStore.tokens) |",
        "| video_index | int16 | which video of the sample a video token belongs to (-1 elsewhere) |",
        "| frame | int32 | the frame of that video (-1 elsewhere; Qwen3-VL's timestamp text keeps its frame) |",
        "| time_ms | int32 | that frame's time in the video, milliseconds (-1 elsewhere) |",
        f"| rope | {ks.rope_rows} x int32 | the RoPE position ids the model used (M-RoPE: temporal, height, width) |",
    ]
    lines += [f"| keys_layer_{layer} | {width} x {dtype} | pre-RoPE keys of layer {layer}, "
              f"(kv_head, head_dim) = ({len(ks.heads)}, {ks.head_dim}) flattened row-major |" for layer in layers]
    lines += ["", "`kscale_store.json` holds the store's attributes (model, processor settings, job spec, versions).",
              "Load with `datasets.load_dataset(DIR)` or `pyarrow.parquet.read_table(DIR + '/data')`.", ""]
    return head + "\n".join(lines)
