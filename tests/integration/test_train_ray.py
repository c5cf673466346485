"""The same training spec on a local Ray cluster through Ray Train's TorchTrainer (2 gloo workers).

Ray runs in a subprocess with its own HOME and temp dir, so it neither meets the session's Ray fixture
nor touches anyone else's Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.integration.test_train_deepspeed import _assert_follows, _generated, _raw_spec, plain_pytorch_losses
from tests.testing_utils import require_module

require_module("deepspeed", install="pip install -e '.[train]'")
require_module("ray.train.torch", install="pip install -e '.[train]'")

REPO = Path(__file__).resolve().parents[2]
DRIVER = """
import json, sys, ray
from kscale.spec import load_spec
from kscale.train.ray_train import run_train_on_ray
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[2])
try:
    print("METRICS " + json.dumps(run_train_on_ray(load_spec(sys.argv[1])).to_dict()))
finally:
    ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_torchtrainer_follows_plain_pytorch(tmp_path) -> None:
    from kscale.models.debug import build_debug_model

    model_dir = build_debug_model("qwen2_5_vl", tmp_path / "model", seed=0)
    raw = _raw_spec(model_dir, tmp_path / "run", _generated(), micro_batch_size=1)
    raw["resources"] = {"executor": "ray", "workers": 2, "cpus_per_worker": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    ray_tmp = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
               DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "job.yaml"), ray_tmp], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=560)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads(proc.stdout.split("METRICS ", 1)[1].splitlines()[0])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    _assert_follows(losses, plain_pytorch_losses(raw, world=2))
    assert metrics["last"]["loss"] == pytest.approx(losses[-1], rel=1e-6)
    assert (Path(metrics["adapter_checkpoint"]) / "adapter_model.safetensors").is_file()
