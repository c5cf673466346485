"""Extraction with attention statistics, then analysis: the key gap beside visual attention, and
`kscale report` rebuilding the page from the run's tables."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec

LIGHT = {"mmd": {"n_features": 256, "kernels": ["rbf"], "normalisations": ["none"], "bandwidth_multiples": [1.0]},
         "jsd": {"classifiers": [], "histogram": ["marginal"]}, "embed": {"methods": []}}


def test_gap_beside_attention_and_report_rebuild(tmp_path):
    ext = extract_spec(tmp_path, data={"generated": {"n_samples": 16, "image_size": 112}, "shard_size": 8},
                       extract={"attention": {"enabled": True}})
    run_job(spec_from_dict(ext), show_bar=False)
    run_dir = tmp_path / "analysis"
    ana = {"kind": "analyze", "analyze": {"stores": [ext["output"]["path"]], **LIGHT},
           "output": {"path": str(run_dir)}}
    summary = run_job(spec_from_dict(ana), show_bar=False)
    assert summary.rows > 0
    joined = pd.read_csv(run_dir / "attention_vs_gap_store.csv")
    # one row per layer (heads averaged, head -1) and per (layer, KV head): 2 layers x (1 + 2 heads)
    assert sorted(map(tuple, joined[["layer", "head"]].to_numpy())) == sorted(
        (layer, h) for layer in (0, 1) for h in (-1, 0, 1))
    assert (joined["mmd_cross"] > joined["mmd_intra_text"]).all()  # image keys differ from text keys
    assert joined["efficiency_image"].between(0, 10).all()
    corr = pd.read_csv(run_dir / "attention_gap_correlation_store.csv")
    assert set(corr["scope"]) == {"layers", "layers x heads"} and int(corr.set_index("scope").loc["layers x heads", "n"]) == 4
    (run_dir / "report.html").unlink()
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "report", str(run_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    page = (run_dir / "report.html").read_text()
    assert "Attention utilisation beside the key gap" in page and "data:image/png;base64" in page
    bad = subprocess.run([sys.executable, "-m", "kscale.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "neither an analysis run" in bad.stderr
