"""A store with video tokens: the analysis also runs video vs text and video vs image, and the report says so.

The store is a real extraction (``debug:qwen2_5_vl``) of a manifest whose rows each name an image and a GIF
(``data.video_field``). References kscale did not compute: the token-level linear MMD² of each pair in closed
form from the store's keys read in full (numpy), and the cross rows of a run configured with
``image_modality: video`` (video vs text through the configured path) for the ``video_vs_text`` pair rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import kscale.store
from kscale.analysis.run import analyze
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.spec.analyze import AnalyzeConfig, DaskConfig, EmbedConfig, MMDConfig, SignificanceConfig
from tests.conftest import extract_spec


@pytest.fixture(scope="module")
def video_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("vstore")
    rows = []
    for i in range(8):
        rng = np.random.default_rng(i)
        frames = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
        frames[0].save(d / f"v{i}.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(d / f"i{i}.png")
        rows.append({"text": "what is shown ?", "image": f"i{i}.png", "video": f"v{i}.gif"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict(extract_spec(d, extract={"batch_size": 4, "key_dtype": "float32"},
                                       data={"source": "manifest", "path": str(d / "m.jsonl"),
                                             "video_field": "video", "shard_size": 4}))
    run_job(spec, show_bar=False)
    return kscale.store.open(spec.output.path)


def _cfg(store, **kw) -> AnalyzeConfig:
    return AnalyzeConfig(stores=[store.path], estimators=["mmd_rf"], embed=EmbedConfig(methods=[]),
                         dask=DaskConfig(scheduler="sync"),
                         mmd=MMDConfig(n_features=16, median_subsample=200, kernels=["rbf", "linear"],
                                       normalisations=["none"], estimator="token"),
                         significance=SignificanceConfig(n_buckets=4, permutations=0), **kw)


def _linear_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Token-level U-statistic of the linear kernel, in closed form."""
    n, m = len(x), len(y)
    sx, sy = x.sum(0), y.sum(0)
    return float((sx @ sx - (x * x).sum()) / (n * (n - 1)) + (sy @ sy - (y * y).sum()) / (m * (m - 1))
                 - 2 * (sx @ sy) / (n * m))


def test_video_store_runs_video_vs_text_and_video_vs_image(video_store, tmp_path) -> None:
    n = video_store.n_tokens() if hasattr(video_store, "n_tokens") else None
    assert n is None or (n["video"] >= 4 and n["image"] >= 4)
    df = analyze(_cfg(video_store), tmp_path / "run")
    assert {"cross", "intra_text", "intra_image", "video_vs_text", "video_vs_image"} <= set(df.comparison)
    lin = df[(df.estimator == "mmd2_linear") & (df.normalisation == "none")]
    for layer in video_store.layers:
        keys = {m: np.asarray(video_store.keys(layer, m).compute(), np.float64) for m in ("image", "video", "text")}
        for comp, (x, y) in {"video_vs_image": ("video", "image"), "video_vs_text": ("video", "text"),
                             "cross": ("image", "text")}.items():
            for head in video_store.heads:
                row = lin[(lin.layer == layer) & (lin["head"] == head) & (lin.comparison == comp)]
                assert len(row) == 1
                assert int(row.n_tokens.iloc[0]) == len(keys[x]) + len(keys[y])
                want = _linear_mmd2(keys[x][:, head], keys[y][:, head])
                np.testing.assert_allclose(row.value.iloc[0], want, rtol=1e-6, atol=1e-9)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert [p["comparison"] for p in meta["modality_pairs"]] == ["video_vs_text", "video_vs_image"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Video, image and text keys" in page and "video vs image" in page and "video vs text" in page


def test_pair_rows_equal_a_run_configured_for_that_pair(video_store, tmp_path) -> None:
    df = analyze(_cfg(video_store), tmp_path / "a")
    ref = analyze(_cfg(video_store, image_modality="video", comparisons=["cross"]), tmp_path / "b")
    ours = df[df.comparison == "video_vs_text"].drop(columns="comparison").reset_index(drop=True)
    theirs = ref[ref.comparison == "cross"].drop(columns="comparison").reset_index(drop=True)
    assert len(ours) > 0
    cols = ["layer", "head", "estimator", "kernel", "value", "ci_low", "ci_high", "n_tokens"]
    assert ours[cols].astype({"n_tokens": float}).equals(theirs[cols].astype({"n_tokens": float}))
    # the image_modality: video run already compares video with text: only video vs image is added there
    assert sorted(set(ref.comparison)) == ["cross", "video_vs_image"]


def test_a_store_without_video_runs_no_pairs(tmp_path) -> None:
    from test_analysis_streaming import write_store

    from kscale.analysis.report import modality_pairs_section
    from kscale.analysis.run import modality_pairs

    ks = write_store(tmp_path / "s", n_shards=2)
    assert modality_pairs(_cfg(ks), ks) == []
    assert modality_pairs_section({"modality_pairs": []}, None) == ""
