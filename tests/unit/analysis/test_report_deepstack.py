"""The report marks the layers whose keys come right after a DeepStack injection (Qwen3-VL), read from the
store's ``model.deepstack_layers``; a store without it gets no mark."""

from __future__ import annotations

import json

import pytest

from analysis_fakes import make_store
from kscale.analysis.report import build_report, deepstack_marks
from kscale.analysis.run import analyze
from kscale.spec.analyze import AnalyzeConfig, EmbedConfig, JSDConfig, MMDConfig, SignificanceConfig


def test_marks_are_the_layers_after_each_injection() -> None:
    meta = {"stores": [{"path": "a", "attrs": {"model": {"deepstack_layers": [0, 1, 2]}}},
                       {"path": "b", "attrs": {"model": {}}}]}
    assert deepstack_marks(meta) == {"a": {1, 2, 3}, "b": set()}


@pytest.mark.slow
@pytest.mark.parametrize("deepstack", [[0], None])
def test_report_marks_deepstack_layers(tmp_path, deepstack) -> None:
    ks = make_store(n_samples=10, layers=(0, 1, 2), n_heads=1, head_dim=4)
    if deepstack is not None:
        ks.attrs = {"model": {"name": "fake", "deepstack_layers": deepstack}}
    cfg = AnalyzeConfig(stores=["unused"], estimators=["mmd_rf"], mmd=MMDConfig(n_features=64, median_subsample=100),
                        jsd=JSDConfig(epochs=1, min_steps=10, mlp_hidden=8, n_random=2),
                        significance=SignificanceConfig(n_buckets=4, permutations=19), embed=EmbedConfig(methods=[]))
    analyze(cfg, tmp_path, stores=[ks])
    html = build_report(tmp_path).read_text()
    assert json.loads((tmp_path / "meta.json").read_text())["stores"][0]["attrs"]["model"].get("deepstack_layers") == deepstack
    assert ("<td>1 (DeepStack)</td>" in html) == (deepstack is not None)
    assert "(DeepStack)" not in html.replace("<td>1 (DeepStack)</td>", "").split("<h2>Run metadata")[0]
