"""The t-SNE maps computed beside the analysis (``embed.MapsHelper``: one spawned process at the lowest CPU
priority) are the maps computed in place, bit for bit; a helper that died leaves the map to be computed
in place, not lost. Reference: ``embed.tsne_2d`` called here, and openTSNE underneath."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kscale.analysis import embed as E

pytest.importorskip("openTSNE", reason="pip install 'kscale[analysis]'")


def _keys(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(1.0, 1.0, size=(90, 2, 4)), "text": rng.normal(0.0, 1.0, size=(70, 2, 4))}


def test_helper_maps_equal_maps_in_place_and_run_at_lowest_priority():
    keys = _keys(0)
    here = E.maps(keys, ["pca", "tsne"], 60, 10.0, 3)
    with E.MapsHelper() as helper:
        assert helper.pool.submit(os.nice, 0).result() == 19  # only idle CPU
        pending = E.maps(keys, ["pca", "tsne"], 60, 10.0, 3, helper)
        assert isinstance(pending["tsne"], E._Pending)  # computed over there
        got = E.resolved(pending, 10.0, 3)
    np.testing.assert_array_equal(got["labels"], here["labels"])
    for method in ("pca", "tsne"):
        np.testing.assert_array_equal(got[method][0], here[method][0])
    assert got["tsne"][1] is None and here["pca"][1].shape == (2,)


@pytest.mark.parametrize("noticed", [False, True])
def test_a_dead_helper_leaves_the_map_to_be_computed_here(noticed):
    from concurrent.futures.process import BrokenProcessPool

    keys = _keys(1)
    here = E.maps(keys, ["tsne"], 50, 10.0, 5)
    with E.MapsHelper() as helper:
        pid = helper.pool.submit(os.getpid).result()
        os.kill(pid, 9)  # the helper process this test started
        if noticed:  # the pool already knows: the next submit raises
            with pytest.raises(BrokenProcessPool):
                while True:
                    helper.pool.submit(int).result()
        pending = E.maps(keys, ["tsne"], 50, 10.0, 5, helper)
        got = E.resolved(pending, 10.0, 5)
    np.testing.assert_array_equal(got["tsne"][0], here["tsne"][0])
