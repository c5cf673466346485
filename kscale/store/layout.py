"""The key store's layout, in one place (documented in docs/store.md).

```
STORE/                         Zarr v3 group; attrs: see ``root_attrs``
  shards/sNNNNNN/<modality>/   one group per shard and modality (text, image, video, special)
      keys       (layer, token, kv_head, head_dim)  float16|float32, chunks (1, chunk_tokens, H, D)
      sample_id  (token,) int64     global sample index (row of the data source)
      position   (token,) int32     index of the token in its sequence (0-based, no padding)
      rope_pos   (token, rope_row) int32   RoPE positions the model used (3 rows for M-RoPE, 1 for 1-D)
      token_id   (token,) int32
      image_index (token,) int16    which image of the sample (-1 for non-image tokens)
  shards/sNNNNNN.done.json     commit marker, written last: stats and the shard's per-sample errors
  _progress.json               live progress of the running / last job
```

Keys of one (layer, modality) are contiguous within a shard, so reading that slice is sequential.
Each shard writes only its own groups: no two writers ever touch one chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

from kscale.output import write_json_atomic  # noqa: F401  (the one atomic JSON writer; markers use it)

from kscale.models.facts import MODALITIES  # noqa: F401  (one definition, with the tags, in kscale.models)

STORE_FORMAT = "kscale-keys"
STORE_VERSION = 1
TABLE_COLUMNS = {  # name -> (dtype, trailing shape key)
    "sample_id": "int64",
    "position": "int32",
    "rope_pos": "int32",
    "token_id": "int32",
    "image_index": "int16",
}
KEY_DIMS = ("layer", "token", "kv_head", "head_dim")


def shard_dir(store: str | Path, shard_name: str) -> Path:
    return Path(store) / "shards" / shard_name


def marker_path(store: str | Path, shard_name: str) -> Path:
    return Path(store) / "shards" / f"{shard_name}.done.json"


def is_store(path: str | Path) -> bool:
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("format") == STORE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def committed_shards(store: str | Path) -> dict[str, dict]:
    """Shard name -> marker contents, for every committed shard."""
    root = Path(store) / "shards"
    if not root.is_dir():
        return {}
    out = {}
    for p in sorted(root.glob("s*.done.json")):
        out[p.name[: -len(".done.json")]] = json.loads(p.read_text())
    return out
