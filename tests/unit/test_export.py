"""``kscale export``: keys and token table as Parquet / a datasets folder, read back equal to the KeyStore
byte for byte, written one shard at a time (issue 24)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import kscale.store
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import REPO, extract_spec


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    spec = spec_from_dict(extract_spec(tmp, extract={"batch_size": 2, "key_dtype": "float16"},
                                       data={"source": "generated", "generated": {"n_samples": 6, "image_size": 56},
                                             "shard_size": 2}))
    run_job(spec, show_bar=False)
    return spec.output.path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kscale.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_an_hf_export_loads_with_datasets_equal_to_the_keystore_byte_for_byte(store, tmp_path):
    from datasets import load_dataset

    proc = cli("export", store, "--to", "hf", str(tmp_path / "out"), "--modalities", "text,image,special")
    assert proc.returncode == 0, proc.stderr
    ks = kscale.store.open(store)
    assert len(list((tmp_path / "out" / "data").glob("*.parquet"))) == len(ks.shards)  # one file per shard
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "keys_layer_1" in card and "image_index" in card
    ds = load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert str(ds.features["keys_layer_0"]) == "List(Value('float16'), length=32)"  # the card's features
    t = ds.with_format("arrow")[:]  # the Arrow data datasets holds (its numpy formatter would upcast float16)
    mod = np.asarray(t["modality"].to_pylist())
    H, D = len(ks.heads), ks.head_dim

    def column(name: str) -> np.ndarray:
        c = t[name].combine_chunks()
        return c.flatten().to_numpy().reshape(len(c), -1)

    for m in ("text", "image", "special"):
        sel = mod == m
        tok = ks.tokens(m)
        assert sel.sum() == len(tok["sample_id"]) > 0
        for c in ("sample_id", "position", "token_id", "image_index"):
            got = t[c].to_numpy()[sel]
            assert got.dtype == tok[c].dtype and got.tobytes() == tok[c].tobytes(), (m, c)
        rope = column("rope")[sel]
        assert rope.dtype == tok["rope_pos"].dtype and rope.tobytes() == tok["rope_pos"].tobytes()
        for layer in ks.layers:
            want = ks.keys(layer, m).compute()
            got = column(f"keys_layer_{layer}")[sel]
            assert got.dtype == np.float16 and got.shape == (len(want), H * D)
            assert got.tobytes() == want.tobytes(), (m, layer)


def test_a_parquet_export_of_some_layers_and_modalities_and_bad_requests(store, tmp_path):
    import pyarrow.parquet as pq

    proc = cli("export", store, "--to", "parquet", str(tmp_path / "p"), "--layers", "1", "--modalities", "image")
    assert proc.returncode == 0, proc.stderr
    t = pq.read_table(tmp_path / "p" / "data")
    assert [c for c in t.column_names if c.startswith("keys_")] == ["keys_layer_1"]
    assert set(t["modality"].to_pylist()) == {"image"}
    ks = kscale.store.open(store)
    c = t["keys_layer_1"].combine_chunks()
    got = c.flatten().to_numpy().reshape(len(c), -1)
    assert got.tobytes() == ks.keys(1, "image").compute().tobytes()
    assert not (tmp_path / "p" / "README.md").read_text().startswith("---")
    bad = cli("export", store, "--to", "parquet", str(tmp_path / "q"), "--layers", "7")
    assert bad.returncode == 2 and "layer 7 is not in store" in bad.stderr and "Traceback" not in bad.stderr
