"""The store as plain Zarr and as xarray: ``KeyStore.to_xarray`` gives the reader's keys with named dims and
coordinates, and every folder of the hierarchy is a Zarr node (a ``zarr.json``), so zarr/xarray walk it.

Stores are written through the real ``ShardWriter`` (``make_store`` of the format-2 tests).
"""

import json
import os
import sys

import dask.array as da
import numpy as np
import pytest
import zarr

import kscale.store
from tests.testing_utils import require_module
from tests.unit.test_store_v2 import LAYERS, R, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("xr") / "s", n_shards=3)


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("heads", [None, [2, 0]])
def test_to_xarray_equals_the_reader(store, modality, heads):
    require_module("xarray", "pip install 'kscale[analysis]'")
    ks = kscale.store.open(store)
    table = ks.tokens(modality)
    for layer in LAYERS:
        arr = ks.to_xarray(layer, modality, heads)
        assert arr.name == "key" and arr.dims == ("token", "kv_head", "head_dim")
        assert isinstance(arr.data, da.Array)  # lazy until asked
        ref = ks.keys(layer, modality, heads).compute()
        got = arr.values
        assert got.dtype == ref.dtype and np.array_equal(got, ref)
        assert arr.coords["layer"].item() == layer and arr.coords["modality"].item() == modality
        assert arr.kv_head.values.tolist() == (ks.heads if heads is None else heads)
        assert arr.head_dim.values.tolist() == list(range(ks.head_dim))
        for name in ("sample_id", "position", "token_id", "image_index"):
            assert np.array_equal(arr.coords[name].values, table[name]), name
        for r in range(R):
            assert np.array_equal(arr.coords[f"rope_{r}"].values, table["rope_pos"][:, r])
    # the coordinates select like the table: one sample's rows are that sample's keys
    sid = int(table["sample_id"][0])
    arr = ks.to_xarray(LAYERS[-1], modality, heads)
    one = arr.isel(token=(arr.sample_id == sid).values)
    assert np.array_equal(one.values, ref[table["sample_id"] == sid])


def test_to_xarray_without_xarray_names_the_extra(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray raises ImportError
    with pytest.raises(ImportError, match=r"kscale\[analysis\]"):
        kscale.store.open(store).to_xarray(LAYERS[0], "image")


def test_every_folder_of_the_store_is_a_zarr_node(store):
    """A folder without ``zarr.json`` is invisible to ``open_group`` walks (and to xarray)."""
    root = os.path.abspath(store)
    arrays, missing = [], []
    for here, dirs, files in os.walk(root):
        if any(here == a or here.startswith(a + os.sep) for a in arrays):
            continue  # chunk folders inside an array
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # staging folders are not committed
        if "zarr.json" not in files:
            missing.append(os.path.relpath(here, root))
            continue
        if json.loads(open(os.path.join(here, "zarr.json")).read())["node_type"] == "array":
            arrays.append(here)
    assert not missing, f"folders without zarr.json: {missing}"
    members = dict(zarr.open_group(store, mode="r").members(max_depth=None))
    assert {"shards", "shards/s000000", "shards/s000000/image", "shards/s000002/text/keys"} <= set(members)
    assert len(arrays) == sum(isinstance(m, zarr.Array) for m in members.values())
