"""The DeepSpeed training stage against a hand-written PyTorch loop on the same model and data.

Each DeepSpeed run is a real subprocess (``python -m kscale.train job.yaml`` or ``torchrun``), so the
process-group setup, the spec loading and the launcher entry are exercised as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.testing_utils import require_module

require_module("deepspeed", install="pip install -e '.[train]'")

REPO = Path(__file__).resolve().parents[2]
STEPS = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from kscale.models.debug import build_debug_model

    return build_debug_model("qwen2_5_vl", tmp_path_factory.mktemp("debug_qwen"), seed=0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """Generated QA records, every other one text-only, so some micro-batches carry no image."""
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec

    root = tmp_path_factory.mktemp("manifest")
    src = GeneratedSource(GeneratedDataSpec(n_samples=24, seed=3, tasks=["color", "shape"]))
    lines = []
    for i in range(len(src)):
        rec = src.get(i)
        image = None
        if i % 2 == 0:
            image = f"img{i}.png"
            rec.image.save(root / image)
        lines.append(json.dumps({"image": image, "text": rec.text, "answer": rec.answer}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "data.jsonl")


def _raw_spec(model_dir: str, run_dir: Path, data: dict, **train) -> dict:
    base = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 2e-3, "clip_grad": 0.5,
            "checkpoint_every": 0, "eval": {"at_end": False},
            "malora": {"rank": 4, "init": "gaussian", "target_modules": ["k_proj", "v_proj"]},
            "align": {"loss": "mmd", "weight": 1.0}, "deepspeed": {"zero_stage": 2, "bf16": False}}
    for key, value in train.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return {"kind": "train", "model": {"path": model_dir, "device": "cpu", "dtype": "float32"},
            "data": data, "output": {"path": str(run_dir)}, "train": base}


def _generated(n: int = 32) -> dict:
    return {"source": "generated", "generated": {"n_samples": n, "seed": 1, "tasks": ["color", "shape", "position"]}}


def _launch(raw: dict, run_dir: Path, nproc: int = 1) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    job = run_dir.parent / f"{run_dir.name}.yaml"
    job.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "kscale.train", str(job)]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), "-m", "kscale.train", str(job)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a hang is killed as a whole


def _run(raw: dict, run_dir: Path, nproc: int = 1, timeout: float = 300) -> list[float]:
    _run_output(raw, run_dir, nproc, timeout)
    return _losses(run_dir)


def _run_output(raw: dict, run_dir: Path, nproc: int = 1, timeout: float = 300) -> str:
    """Run to completion; returns the combined stdout/stderr."""
    proc = _launch(raw, run_dir, nproc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"training did not finish in {timeout} s (hang?):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(run_dir: Path) -> list[float]:
    """Loss per logged step, in file order (a resumed run logs each step once)."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_pytorch_losses(raw: dict, world: int) -> list[float]:
    """The reference: AdamW + clipping + accumulation written out by hand, ranks simulated in turn."""
    from kscale.data import open_source
    from kscale.models.registry import load_model
    from kscale.spec import spec_from_dict
    from kscale.train.data import MicroBatchPlan, collate, split_indices
    from kscale.train.objective import MaLoRAObjective
    from kscale.train.run import build_adapter

    spec = spec_from_dict(raw)
    cfg = spec.train
    loaded = load_model(spec.model)
    torch.manual_seed(cfg.seed)
    objective = MaLoRAObjective(build_adapter(loaded.model, cfg), cfg.align).train()
    source = open_source(spec.data)
    split = split_indices(len(source), cfg.eval.heldout_fraction, cfg.eval.max_samples, cfg.seed)
    plan = MicroBatchPlan(source, split.train, cfg.micro_batch_size, cfg.grad_accum, world, cfg.seed)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    for step in range(cfg.max_steps):
        optimizer.zero_grad()
        total = 0.0
        for micro in range(cfg.grad_accum):
            for rank in range(world):
                batch = collate(loaded, plan.records(step, micro, rank))
                loss, _ = objective(batch.inputs, batch.answer_mask_BT, batch.modality_BT)
                (loss / (cfg.grad_accum * world)).backward()
                total += loss.item() / (cfg.grad_accum * world)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        losses.append(total)
    return losses


def _assert_follows(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, reference)]
    assert max(rel) < 1e-3, rel
    assert reference[-1] < reference[0]  # the run learns: the comparison is over a moving curve


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.extended)])  # ZeRO-3: test_train_zero3_*
def test_zero_single_process_follows_plain_pytorch(model_dir, tmp_path, stage) -> None:
    raw = _raw_spec(model_dir, tmp_path / f"zero{stage}", _generated(), deepspeed={"zero_stage": stage},
                    activation_checkpointing=True)
    _assert_follows(_run(raw, tmp_path / f"zero{stage}"), plain_pytorch_losses(raw, world=1))
    assert (tmp_path / f"zero{stage}" / "adapter" / "adapter_model.safetensors").is_file()


def _ranks_disagree_on_images(raw: dict, world: int) -> bool:
    """Some micro-batch has an image on one rank and none on the other (the ZeRO-3 hang scenario)."""
    from kscale.data import open_source
    from kscale.spec import spec_from_dict
    from kscale.train.data import MicroBatchPlan, split_indices

    spec = spec_from_dict(raw)
    cfg = spec.train
    source = open_source(spec.data)
    split = split_indices(len(source), cfg.eval.heldout_fraction, cfg.eval.max_samples, cfg.seed)
    plan = MicroBatchPlan(source, split.train, cfg.micro_batch_size, cfg.grad_accum, world, cfg.seed)
    for step in range(cfg.max_steps):
        for micro in range(cfg.grad_accum):
            has = [any(r.image is not None for r in plan.records(step, micro, k)) for k in range(world)]
            if len(set(has)) > 1:
                return True
    return False


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.extended)])
def test_zero_two_processes_follow_plain_pytorch_without_hanging(model_dir, manifest, tmp_path, stage) -> None:
    raw = _raw_spec(model_dir, tmp_path / f"zero{stage}x2", {"source": "manifest", "path": manifest},
                    deepspeed={"zero_stage": stage}, micro_batch_size=1)
    assert _ranks_disagree_on_images(raw, world=2)
    _assert_follows(_run(raw, tmp_path / f"zero{stage}x2", nproc=2, timeout=300), plain_pytorch_losses(raw, world=2))


def test_resume_after_kill_continues_the_same_curve(model_dir, tmp_path) -> None:
    """The rerun restores the newest checkpoint (it does not start over), logs each step once, keeps the
    lines logged up to that checkpoint as they were, and ends on the uninterrupted run's curve."""
    steps = 40
    reference = _raw_spec(model_dir, tmp_path / "straight", _generated(), max_steps=steps, checkpoint_every=5)
    killed = _raw_spec(model_dir, tmp_path / "killed", _generated(), max_steps=steps, checkpoint_every=5)
    proc = _launch(killed, tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 12):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill, mid-run
    proc.communicate()
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    checkpoint = int(latest.read_text().strip().removeprefix("step"))
    before = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
    logged = [json.loads(line)["step"] for line in before]
    assert 5 <= checkpoint < max(logged) < steps, (checkpoint, logged)  # steps after the checkpoint get redone
    out = _run_output(killed, tmp_path / "killed")
    after = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == list(range(1, steps + 1))  # each step once, in order
    # Steps up to the checkpoint are not recomputed: their lines (wall times included) are the first run's.
    assert after[:checkpoint] == before[:checkpoint]
    assert f"resumed from step {checkpoint}" in out, out[-4000:]
    resumed = _losses(tmp_path / "killed")
    straight = _run(reference, tmp_path / "straight")
    assert len(resumed) == steps
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-5, atol=0)


def test_zero3_bf16_trains_and_saves_a_loadable_adapter(model_dir, tmp_path) -> None:
    from kscale.models.registry import load_model
    from kscale.spec import spec_from_dict
    from kscale.train.malora import MaLoRAModel

    raw = _raw_spec(model_dir, tmp_path / "bf16", _generated(), max_steps=8, lr=5e-3,
                    deepspeed={"zero_stage": 3, "bf16": True}, malora={"gate": "token"})
    losses = _run(raw, tmp_path / "bf16")
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    gates = [json.loads(line)["gates"] for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(gates[-1]) == 2 * 2 * 2 and gates[-1] != gates[0]  # layers x (k, v) x branches, from ZeRO-3 shards
    loaded = load_model(spec_from_dict(raw).model)
    adapter = MaLoRAModel.from_pretrained(loaded.model, tmp_path / "bf16" / "adapter")
    assert any(p.abs().sum() > 0 for n, p in adapter.adapter_parameters().items() if "_B_" in n)


def test_method_lora_trains_under_zero3_like_plain_pytorch_and_saves_a_peft_adapter(model_dir, tmp_path) -> None:
    """``train.method: lora``: PEFT's LoRA layers injected into a ZeRO-3 partitioned model, the same objective
    and loop; the losses follow the hand-written loop, and PEFT's own loader reads the adapter/ it writes.
    The held-out table has the base and LoRA rows (no image-branch ablation: LoRA has no branches)."""
    import copy

    peft = require_module("peft", install="pip install -e '.[train]'")
    from kscale.models.registry import load_model
    from kscale.spec import spec_from_dict
    from kscale.train.lora import LoRAModel

    steps = 4
    raw = _raw_spec(model_dir, tmp_path / "lora", _generated(), method="lora", max_steps=steps,
                    deepspeed={"zero_stage": 3}, eval={"at_end": True, "max_samples": 4})
    losses = _run(raw, tmp_path / "lora")
    reference = plain_pytorch_losses(raw, world=1)
    assert len(losses) == len(reference) == steps
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference)) < 1e-3, (losses, reference)
    assert reference[-1] != reference[0]
    gates = [json.loads(line)["gates"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert gates[-1] == {}  # no gate to log
    table = json.loads((tmp_path / "lora" / "eval.json").read_text())
    assert sorted(table) == ["base", "lora"]
    loaded = load_model(spec_from_dict(raw).model)
    ours = LoRAModel.from_pretrained(copy.deepcopy(loaded.model), tmp_path / "lora" / "adapter")
    assert any(p.abs().sum() > 0 for n, p in ours.adapter_parameters().items() if "lora_B" in n)
    theirs = peft.PeftModel.from_pretrained(loaded.model, str(tmp_path / "lora" / "adapter"))
    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
    assert "LoRA" in (tmp_path / "lora" / "report.html").read_text()


@pytest.mark.slow  # builds DeepSpeed's cpu_adam op on first use (~160 s), cached in .cache/torch_extensions
def test_zero3_with_optimizer_and_parameter_offload_follows_plain_pytorch(model_dir, tmp_path) -> None:
    from kscale.train.safe_load import load_weights_only

    raw = _raw_spec(model_dir, tmp_path / "offload", _generated(),
                    deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True})
    _assert_follows(_run(raw, tmp_path / "offload", timeout=500), plain_pytorch_losses(raw, world=1))
    # resume reads these weights only: the offloaded optimizer's state asks for no class off the allowlist
    saved = sorted((tmp_path / "offload" / "checkpoints").glob("step*/*.pt"))
    assert any("optim_states" in p.name for p in saved), saved
    for path in saved:
        assert isinstance(load_weights_only(path), dict)


@pytest.mark.extended  # ~28 s; the if_exists rules of every stage: tests/unit/test_output.py
def test_if_exists_fail_refuses_and_overwrite_starts_over(model_dir, tmp_path) -> None:
    raw = _raw_spec(model_dir, tmp_path / "again", _generated(), max_steps=3)
    first = _run(raw, tmp_path / "again")
    raw["output"]["if_exists"] = "fail"
    proc = _launch(raw, tmp_path / "again")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "output.if_exists is 'fail'" in out
    raw["output"]["if_exists"] = "overwrite"
    (tmp_path / "again" / "marker").write_text("from the first run")
    assert _run(raw, tmp_path / "again") == first  # the same seeded curve ...
    assert not (tmp_path / "again" / "marker").exists()  # ... from a fresh directory, not a resume
