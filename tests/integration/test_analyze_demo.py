"""End to end: the analysis stage on a demo store produces a complete table, pictures and a report."""

import json
import sys
from pathlib import Path

import pandas as pd

from kscale.store.layout import STORE_FORMAT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "analysis"))
from analysis_fakes import make_store  # noqa: E402

from kscale.spec.analyze import (AnalyzeConfig, EmbedConfig, JSDConfig, MMDConfig,  # noqa: E402
                                    SignificanceConfig)
from kscale.analysis.report import build_report  # noqa: E402
from kscale.analysis.run import analyze, run_analyze  # noqa: E402

ESTIMATORS = {"mmd2_rf", "mmd2_linear", "mmd2_exact", "mmd2_paper", "jsd_hist_marginal", "jsd_hist_random",
              "jsd_hist_pca", "jsd_hist_lda", "jsd_clf_logistic", "jsd_clf_mlp"}


def small_cfg(**kw) -> AnalyzeConfig:
    base = dict(stores=["unused"], mmd=MMDConfig(n_features=128, median_subsample=300), exact_subsample=150,
                jsd=JSDConfig(epochs=1, min_steps=40, mlp_hidden=16, n_random=4),
                significance=SignificanceConfig(n_buckets=8, permutations=99), embed=EmbedConfig(subsample=150))
    return AnalyzeConfig(**{**base, **kw})


def test_every_layer_and_head_has_every_estimator(tmp_path):
    ks = make_store(n_samples=20, layers=(0, 1, 2), n_heads=2, head_dim=8, shift=0.8)
    df = analyze(small_cfg(), tmp_path, stores=[ks])
    for layer in (0, 1, 2):
        for head in (0, 1, -1):
            for comp in ("cross", "intra_text", "intra_image"):
                got = set(df[(df.layer == layer) & (df["head"] == head) & (df.comparison == comp)].estimator)
                assert ESTIMATORS <= got, (layer, head, comp, ESTIMATORS - got)
    # the planted gap grows with layer and dominates the intra-modal baseline
    prim = df[(df.estimator == "mmd2_rf") & (df.kernel == "rbf") & (df.normalisation == "none")
              & (df.multiple == 1.0) & (df["head"] == -1)]
    cross = prim[prim.comparison == "cross"].sort_values("layer")
    intra = prim[prim.comparison == "intra_text"].sort_values("layer")
    assert (cross.value.values > intra.value.values + 3 * cross.se.values).all()
    assert cross.value.is_monotonic_increasing
    assert (cross.p <= 0.01).all() and cross.p_method.iloc[0].startswith("sequence_permutation")
    assert (df.n_tokens.dropna() > 0).all() and (df.n_samples > 0).all()
    assert all(json.loads(c) for c in df.conventions)
    # files: table twice, pictures, a self-contained report that can be rebuilt from the directory
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), df)
    assert len(pd.read_csv(tmp_path / "results.csv")) == len(df)
    for name in ("mmd_by_layer.png", "jsd_by_layer.png", "heatmap_mmd_layer_head.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 1000
    assert list(tmp_path.glob("tsne_*layer00*.png")) and list(tmp_path.glob("pca_*layer00*.png"))
    # where the gap lives: a table beside results.parquet (d directions per layer and head), a figure per layer
    assert len(pd.read_parquet(tmp_path / "directions.parquet")) == 3 * 3 * 8
    assert sorted(p.name for p in (tmp_path / "directions").glob("*.png")) == [
        f"directions_layer{l:02d}.png" for l in (0, 1, 2)]
    (tmp_path / "report.html").unlink()
    html = build_report(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == len(list(tmp_path.rglob("*.png")))  # directions/ too
    assert "src=\"http" not in html
    assert not list(tmp_path.glob("query_gap_*")) and "What text queries see" not in html  # no stored queries
    assert "<h2>Where the gap lives</h2>" in html


def test_run_analyze_entry_uses_the_spec_output_path(tmp_path, monkeypatch):
    ks = make_store(n_samples=10, layers=(0,), n_heads=1, head_dim=4)
    import kscale.analysis.run as run_mod

    monkeypatch.setattr(run_mod, "open_store", lambda path: ks)
    stub = tmp_path / "store"  # validation checks that the input store is a kscale store: its root attributes
    stub.mkdir()
    (stub / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                "attributes": {"format": STORE_FORMAT}}))
    from kscale.spec import JobSpec, OutputSpec

    spec = JobSpec(kind="analyze", name="demo", output=OutputSpec(path=str(tmp_path / "run"), if_exists="resume"),
                   analyze=small_cfg(stores=[str(stub)], estimators=["mmd_rf"], embed=EmbedConfig(methods=[])))
    result = run_analyze(spec)
    assert result.rows > 0 and (tmp_path / "run" / "report.html").exists()
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(df.estimator) == {"mmd2_rf", "mmd2_linear", "ratio_mmd2_rf", "gap_normalised"}
