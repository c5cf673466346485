"""Every stage shows progress like extract (issue 12): a bar on stderr that ends at its total, exactly one
summary line on stdout, the result as JSON in a file the summary line names (never dumped on stdout), and a
``kscale status`` that reports the finished run instead of "none yet".

Each test drives the real CLI in a subprocess with its own ``KSCALE_HOME`` and ``HOME``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from kscale.analysis.source import open_store
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import REPO, extract_spec
from tests.unit.bias.conftest import bias_job


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "KSCALE_HOME": str(tmp_path / "home" / ".kscale"), "HOME": str(tmp_path / "home"),
            "PYTHONPATH": str(REPO)}


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kscale.cli", *args], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _bar_end(stderr: str, desc: str) -> str:
    """The bar's last state: tqdm redraws with carriage returns, so the final frame is the last one."""
    frames = [f for f in re.split(r"[\r\n]", stderr) if f.startswith(desc)]
    assert frames, f"no progress bar {desc!r} on stderr:\n{stderr[-3000:]}"
    return frames[-1]


def _one_summary(stdout: str, prefix: str) -> str:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), f"stdout is not one summary line:\n{stdout}"
    assert "{" not in stdout, "a JSON dump on stdout"
    return lines[0]


def _result_file(line: str, kind: str) -> dict:
    m = re.search(r"; details (\S+)$", line)
    assert m, f"the summary line names no result file: {line}"
    result = json.loads(Path(m.group(1)).read_text())
    assert result["kind"] == kind
    return result


def _status_progress(tmp_path: Path, job: Path) -> str:
    out = _cli(tmp_path, "status", str(job)).stdout
    line = next(x for x in out.splitlines() if x.startswith("progress"))
    assert "none yet" not in line
    return line


def test_analyze_shows_a_bar_one_summary_line_and_keeps_its_json_in_a_file(tmp_path):
    store = tmp_path / "keys"
    run_job(spec_from_dict(extract_spec(tmp_path, data={"generated": {"n_samples": 6, "image_size": 56},
                                                        "shard_size": 3}, output={"path": str(store)})),
            show_bar=False)
    job = tmp_path / "analyze.yaml"
    job.write_text(yaml.safe_dump({
        "kind": "analyze", "name": "ta",
        "analyze": {"stores": [str(store)], "layers": "all", "estimators": ["mmd_rf"], "embed": {"methods": []},
                    "mmd": {"n_features": 32, "median_subsample": 60}, "exact_subsample": 20,
                    "significance": {"n_buckets": 4, "permutations": 0}},
        "output": {"path": str(tmp_path / "analysis")}}))
    r = _cli(tmp_path, "submit", str(job))
    n_layers = len(open_store(str(store)).layers)
    end = _bar_end(r.stderr, "analyze ta:")
    assert "100%" in end and f"{n_layers}/{n_layers}" in end and "layer" in end, end
    line = _one_summary(r.stdout, "kscale: analysis done:")
    result = _result_file(line, "analyze")
    assert result["rows"] > 0 and result["key_bytes"] > 0
    assert "analyze ta: succeeded" in _status_progress(tmp_path, job)


def test_bias_shows_a_bar_one_summary_line_and_keeps_its_json_in_a_file(tmp_path, qwen_dir):
    job = tmp_path / "bias.yaml"
    job.write_text(yaml.safe_dump(bias_job(tmp_path, qwen_dir, bias={"batch_size": 4, "bootstrap": 50,
                                                                    "dropping": {"fractions": [1.0],
                                                                                 "orders": ["random"]}})))
    r = _cli(tmp_path, "submit", str(job))
    end = _bar_end(r.stderr, "bias tb:")
    assert "100%" in end and "2/2" in end, end
    line = _one_summary(r.stdout, "kscale: bias succeeded:")
    result = _result_file(line, "bias")
    assert result["shards_done"] == 2 and result["report"]
    assert "bias tb: succeeded" in _status_progress(tmp_path, job)


def test_train_shows_steps_loss_and_tokens_per_s_then_one_summary_line(tmp_path, qwen_dir):
    job = tmp_path / "train.yaml"
    job.write_text(yaml.safe_dump({
        "kind": "train", "name": "tt", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
        "data": {"source": "generated", "generated": {"n_samples": 8, "image_size": 56, "tasks": ["color"]}},
        "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1, "checkpoint_every": 0,
                  "eval": {"at_end": False}, "malora": {"rank": 2, "target_modules": ["k_proj"]},
                  "deepspeed": {"zero_stage": 2, "bf16": False}},
        "output": {"path": str(tmp_path / "train")}, "resources": {"executor": "local"}}))
    env_extra = {"DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "submit", str(job)], env={**_env(tmp_path), **env_extra},
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    end = _bar_end(r.stderr, "train tt:")
    assert "100%" in end and "3/3" in end and "loss=" in end and "tok_s=" in end, end
    line = _one_summary(r.stdout, "kscale: train done:")
    assert _result_file(line, "train")["steps"] == 3
    assert "train tt: succeeded" in _status_progress(tmp_path, job)
