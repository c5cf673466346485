"""Extraction end to end on tiny models: stored keys against independent references, invariances,
resume after SIGKILL, Ray vs in-process, bad input.

Legend: T tokens, H kv heads, D head dim, L layers.
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

import kscale.store
from kscale.extract import worker
from kscale.models import load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import MODALITIES, marker_names, marker_path, shard_dir
from tests.conftest import extract_spec

FAMILIES = ["debug:qwen2_5_vl", "debug:llava"]


def sample_keys(store, sample_id: int, layer: int):
    """(positions, keys_THD, rope_pos) of one sample over all modalities, ordered by position."""
    pos, keys, rope = [], [], []
    for m in MODALITIES:
        t = store.tokens(m)
        sel = t["sample_id"] == sample_id
        if not sel.any():
            continue
        pos.append(t["position"][sel])
        keys.append(store.keys(layer, m).compute()[sel])
        rope.append(t["rope_pos"][sel])
    pos, keys, rope = np.concatenate(pos), np.concatenate(keys), np.concatenate(rope)
    order = np.argsort(pos)
    return pos[order], keys[order], rope[order]


def reference_inputs(spec, sample_id: int):
    lm = load_model(spec.model)
    state = worker.ExtractState(lm, [0, 1], [0, 1], __import__("kscale.data", fromlist=["x"]).open_source(spec.data))
    rec = state.source.get(sample_id)
    return lm, lm.adapter.build_batch(lm, [rec.image], [rec.text])


@pytest.fixture(scope="module", params=FAMILIES)
def bs1_store(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param.split(":")[1])
    spec = spec_from_dict(extract_spec(tmp, model=request.param, extract={"batch_size": 1, "key_dtype": "float32"}))
    run_job(spec, show_bar=False)
    return spec, kscale.store.open(spec.output.path)


def test_keys_equal_recomputation_from_hidden_states(bs1_store):
    spec, store = bs1_store
    for sid in (0, 5):
        lm, batch = reference_inputs(spec, sid)
        with torch.no_grad():
            out = lm.model(**batch.inputs, output_hidden_states=True)
        layers = lm.adapter.decoder_layers(lm.model)
        for li in store.layers:
            with torch.no_grad():
                ref = layers[li].self_attn.k_proj(layers[li].input_layernorm(out.hidden_states[li]))[0]
            ref_THD = ref.view(ref.shape[0], lm.info.num_kv_heads, lm.info.head_dim).numpy()
            pos, got, _ = sample_keys(store, sid, li)
            assert np.array_equal(pos, np.arange(ref_THD.shape[0]))  # every real token, no padding
            np.testing.assert_allclose(got, ref_THD, atol=1e-5, rtol=0)


def test_keys_and_positions_reproduce_kv_cache(bs1_store):
    spec, store = bs1_store
    lm, batch = reference_inputs(spec, 3)
    assert batch.n_image_tokens[0] > 0
    with torch.no_grad():
        out = lm.model(**batch.inputs, use_cache=True)
    mod = sys.modules[type(lm.adapter.decoder_layers(lm.model)[0].self_attn).__module__]
    rotary = lm.adapter.rotary_module(lm.model)
    for li in store.layers:
        _, k_THD, rope_TR = sample_keys(store, 3, li)
        k = torch.from_numpy(k_THD).permute(1, 0, 2)[None]  # (1, H, T, D)
        pos = torch.from_numpy(rope_TR).long()
        pos = pos.T[:, None, :] if pos.shape[1] == 3 else pos.T  # (3, 1, T) or (1, T)
        cos, sin = rotary(k, pos)
        _, k_rot = mod.apply_rotary_pos_emb(k, k, cos, sin)
        cached = out.past_key_values.layers[li].keys
        torch.testing.assert_close(k_rot, cached, atol=1e-5, rtol=0)
        # the reader's post-RoPE keys (issue "Attention") agree with the same cache
        post = {m: store.keys(li, m, rope=True).compute() for m in MODALITIES}
        toks = {m: store.tokens(m) for m in MODALITIES}
        for m in MODALITIES:
            sel = toks[m]["sample_id"] == 3
            if sel.any():
                want = cached[0].permute(1, 0, 2).numpy()[toks[m]["position"][sel]]
                np.testing.assert_allclose(post[m][sel], want, atol=1e-5, rtol=0)
    if spec.model.path.endswith("qwen2_5_vl"):  # 3-D M-RoPE really used: image rows differ in h/w
        _, _, rope_TR = sample_keys(store, 3, 0)
        assert (rope_TR[:, 1] != rope_TR[:, 2]).any()


def test_batch_invariance_and_tag_counts(bs1_store, tmp_path):
    spec1, store1 = bs1_store
    d = extract_spec(tmp_path, model=spec1.model.path, extract={"batch_size": 4, "key_dtype": "float32"})
    spec4 = spec_from_dict(d)
    run_job(spec4, show_bar=False)
    store4 = kscale.store.open(spec4.output.path)
    for m in MODALITIES:
        t1, t4 = store1.tokens(m), store4.tokens(m)
        for col in t1:
            assert np.array_equal(t1[col], t4[col]), (m, col)
        for li in store1.layers:
            # padded batches run different kernels: equal to float32 rounding, stated tolerance 1e-5
            np.testing.assert_allclose(store4.keys(li, m).compute(), store1.keys(li, m).compute(), atol=1e-5)
    # image tokens per sample = the processor's formula; no pad token stored
    lm = load_model(spec1.model)
    img = store1.tokens("image")
    src = __import__("kscale.data", fromlist=["x"]).open_source(spec1.data)
    for sid in range(len(src)):
        b = lm.adapter.build_batch(lm, [src.get(sid).image], [src.get(sid).text])
        assert (img["sample_id"] == sid).sum() == b.n_image_tokens[0] > 0
    if lm.info.family == "qwen2_5_vl":
        grid = lm.image_processor(images=[src.get(0).image], return_tensors="pt")["image_grid_thw"][0]
        assert (img["sample_id"] == 0).sum() == int(grid.prod()) // 4
    pad = lm.tokenizer.pad_token_id
    n_real = sum(len(store1.tokens(m)["position"]) for m in MODALITIES)
    n_pad_tokens = sum(int((store1.tokens(m)["token_id"] == pad).sum()) for m in MODALITIES)
    assert n_real > 0 and n_pad_tokens == 0


def test_token_sampling_is_seeded_and_bounded(tmp_path):
    d = extract_spec(tmp_path, extract={"sample_tokens": {"image": 3, "text": 2, "seed": 7}})
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    s = kscale.store.open(spec.output.path)
    counts = np.bincount(s.tokens("image")["sample_id"])
    assert counts.max() == 3 and np.bincount(s.tokens("text")["sample_id"]).max() == 2
    d2 = extract_spec(tmp_path / "b", extract={"batch_size": 1, "sample_tokens": {"image": 3, "text": 2, "seed": 7}})
    run_job(spec_from_dict(d2), show_bar=False)
    s2 = kscale.store.open(str(tmp_path / "b" / "store"))
    assert np.array_equal(s.tokens("image")["position"], s2.tokens("image")["position"])


# Documented as differing between two runs of one job (docs/store.md): when it ran, how long a shard took,
# and where/how it ran (output.path and resources are part of the recorded spec and its fingerprint).
VOLATILE_ATTRS = ("created_at", "spec_fingerprint")
VOLATILE_SPEC = ("output", "resources")
VOLATILE_MARKER = ("seconds",)


def _stable_attrs(attrs: dict) -> dict:
    out = {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    out["spec"] = {k: v for k, v in attrs["spec"].items() if k not in VOLATILE_SPEC}
    return out


def stores_equal(a: str, b: str) -> None:
    """Byte-equal keys, token tables, side tables (attention), errors, shard markers and root attributes,
    minus the volatile fields above."""
    sa, sb = kscale.store.open(a), kscale.store.open(b)
    assert sorted(sa.shards) == sorted(sb.shards)
    assert _stable_attrs(sa.attrs) == _stable_attrs(sb.attrs)
    for name in sa.shards:
        ma, mb = ({k: v for k, v in m[name].items() if k not in VOLATILE_MARKER} for m in (sa.shards, sb.shards))
        assert ma == mb, name
    assert sa.errors() == sb.errors()
    for table in ("attention",):
        ta, tb = sa.table(table), sb.table(table)
        assert sorted(ta) == sorted(tb), table
        for col in ta:
            assert ta[col].dtype == tb[col].dtype and ta[col].tobytes() == tb[col].tobytes(), (table, col)
    for m in MODALITIES:
        ta, tb = sa.tokens(m), sb.tokens(m)
        for col in ta:
            assert np.array_equal(ta[col], tb[col]), (m, col)
        for li in sa.layers:
            ka, kb = sa.keys(li, m).compute(), sb.keys(li, m).compute()
            assert ka.dtype == kb.dtype and ka.tobytes() == kb.tobytes(), (m, li)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    over = dict(data={"source": "generated", "generated": {"n_samples": 24, "image_size": 112}, "shard_size": 3},
                extract={"batch_size": 1, "key_dtype": "float16"})
    ref_spec = spec_from_dict(extract_spec(tmp_path / "ref", **over))
    run_job(ref_spec, show_bar=False)

    d = extract_spec(tmp_path / "killed", **over)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    store = Path(d["output"]["path"])
    proc = subprocess.Popen([sys.executable, "-m", "kscale.cli", "submit", "--no-progress", str(job)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "shards").glob("*.done.json"))) < 2:
        time.sleep(0.05)
    # kill mid-shard: wait for a shard being written (its staging folder, renamed at commit)
    while time.time() < deadline:
        if list((store / "shards").glob(".s??????.tmp-*")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = set(marker_names(store))
    assert 2 <= len(committed) < 8, "the kill must land mid-job"
    before = {name: shard_files(store, name) for name in committed}

    summary = run_job(spec_from_dict(d), show_bar=False)
    # Which shards were redone, read from the store: every file of a shard committed before the rerun (its
    # marker and its folder) is the same file (inode, mtime, size); every other planned shard is new.
    after = {name: shard_files(store, name) for name in marker_names(store)}
    assert {name: after.get(name) for name in committed} == before, "a committed shard was rewritten"
    redone = set(after) - committed
    assert redone == {f"s{i:06d}" for i in range(8)} - committed
    assert summary.shards_skipped == len(committed) and summary.shards_done == len(redone)
    assert summary.shards_failed == 0
    assert not list((store / "shards").glob(".s*.tmp-*")), "the killed writer's staging folder is cleared"
    stores_equal(ref_spec.output.path, str(store))


def shard_files(store: Path, name: str) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime ns, size) of a committed shard's marker and of every file in its folder, by path."""
    paths = [marker_path(store, name), *sorted(p for p in shard_dir(store, name).rglob("*") if p.is_file())]
    return {p.relative_to(store).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in paths}


def _manifest_with_bad_rows(root: Path, n: int = 10) -> str:
    """Generated QA images on disk, plus a missing image and an empty text: records the store must keep."""
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec

    src = GeneratedSource(GeneratedDataSpec(n_samples=n, seed=5, image_size=112))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rec = src.get(i)
        rec.image.save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "text": rec.text})
    rows[3] = {"image": "nowhere.png", "text": "what color ?"}
    rows[7] = {"image": "img7.png", "text": "  "}
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root / "data.jsonl")


def test_a_rerun_clears_what_killed_writers_left(tmp_path):
    """A writer killed between a marker's temp file and its link/unlink, or mid-shard, leaves hidden files
    in shards/ that no shard's own writer would remove (the shard may be committed): the next run, holding
    the lock, clears them, and the store equals an uninterrupted one. Deterministic companion of the SIGKILL
    test above, where the kill lands wherever it lands."""
    over = dict(data={"source": "generated", "generated": {"n_samples": 8, "image_size": 56}, "shard_size": 2},
                extract={"batch_size": 2, "key_dtype": "float16"})
    ref = spec_from_dict(extract_spec(tmp_path / "ref", **over))
    run_job(ref, show_bar=False)
    d = extract_spec(tmp_path / "rerun", **over)
    run_job(spec_from_dict(d), show_bar=False)
    shards = Path(d["output"]["path"]) / "shards"
    marker_path(shards.parent, "s000003").unlink()  # shard 3 is redone; shards 0-2 stay committed
    left = [shards / ".s000001.done.json.tmp-424242-1", shards / ".s000003.done.json.tmp-424242-1"]
    for f in left:  # killed after linking (shard 1, committed) and before it (shard 3)
        f.write_text("{}")
    (shards / ".s000002.tmp-424242" / "tokens").mkdir(parents=True)  # a staging folder of a committed shard
    summary = run_job(spec_from_dict(d), show_bar=False)
    assert summary.shards_skipped == 3 and summary.shards_failed == 0
    assert not list(shards.glob(".*.tmp-*"))
    stores_equal(ref.output.path, d["output"]["path"])


def test_ray_executor_equals_in_process(tmp_path, ray_local):
    """Keys, tokens, recorded errors, attention tables, markers and attributes: Ray == in-process."""
    over = dict(data={"source": "manifest", "path": _manifest_with_bad_rows(tmp_path / "data"), "shard_size": 4},
                extract={"batch_size": 2, "key_dtype": "float32",
                         "attention": {"enabled": True, "query_chunk": 4}})
    local_d = extract_spec(tmp_path / "local", **over)
    del local_d["data"]["generated"]
    local = spec_from_dict(local_d)
    run_job(local, show_bar=False)
    ray_d = extract_spec(tmp_path / "ray", **over, resources={"executor": "ray", "workers": 2})
    del ray_d["data"]["generated"]
    ray_spec = spec_from_dict(ray_d)
    summary = run_job(ray_spec, show_bar=False)
    assert summary.shards_done == 3 and summary.state == "succeeded"
    stores_equal(local.output.path, ray_spec.output.path)
    store = kscale.store.open(ray_spec.output.path)
    assert {e["sample_id"] for e in store.errors()} == {3, 7} and store.table("attention")  # both were compared
    progress = json.loads((Path(ray_spec.output.path) / "_progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["shards_done"] == 3
    rerun = run_job(ray_spec, show_bar=False)  # everything committed: reported, nothing redone
    assert rerun.shards_skipped == 3 and rerun.shards_done == 0 and rerun.state == "succeeded"


def test_killed_ray_worker_shard_is_redone(tmp_path, ray_local):
    """SIGKILL the worker that holds shard s000002 (its own PID, reported by the worker): the executor
    replaces the actor, retries that shard once, and the store equals an uninterrupted in-process run."""
    import threading

    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract
    from tests.integration.killable_stage import VICTIM

    over = dict(data={"source": "generated", "generated": {"n_samples": 24, "image_size": 112}, "shard_size": 3},
                extract={"batch_size": 1, "key_dtype": "float16"}, resources={"executor": "ray", "workers": 2})
    spec = spec_from_dict(extract_spec(tmp_path / "r", **over))
    note = Path(spec.output.path) / "kill-me.json"
    killed, finished = [], threading.Event()

    def killer():  # no deadline of its own: on a loaded machine the victim shard may start late
        while not note.exists():
            if finished.wait(0.05):
                return
        victim = json.loads(note.read_text())
        assert victim["pid"] != os.getpid()  # a Ray worker process, not this test's driver
        os.kill(victim["pid"], signal.SIGKILL)
        killed.append(victim)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = run_extract(spec, RayExecutor("tests.integration.killable_stage", show_bar=False))
    finally:
        finished.set()
        t.join(timeout=5)
    assert killed and killed[0]["shard"] == VICTIM
    assert summary.retries == 1 and list(summary.retried) == [VICTIM], summary
    assert summary.retried[VICTIM][0].startswith("worker died"), summary.retried
    assert summary.shards_failed == 0 and summary.shards_done == 8
    ref = spec_from_dict(extract_spec(tmp_path / "ref", **{**over, "resources": {"executor": "local"}}))
    run_job(ref, show_bar=False)
    stores_equal(ref.output.path, spec.output.path)


def test_bad_input_is_recorded_and_skipped(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 80), "red").save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [
        {"image": "img/ok.png", "text": "what color is the square ?"},
        {"image": "img/missing.png", "text": "what color ?"},
        {"image": "img/corrupt.png", "text": "what color ?"},
        {"image": "img/ok.png", "text": "   "},
        {"image": "img/ok.png", "text": " ".join(["red"] * 200)},
        {"image": None, "text": "a text only sample"},
    ]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = extract_spec(tmp_path, data={"source": "manifest", "path": str(manifest), "shard_size": 4,
                                     "generated": {}}, extract={"max_seq_len": 100})
    del d["data"]["generated"]
    summary = run_job(spec_from_dict(d), show_bar=False)
    assert summary.state == "succeeded" and summary.samples == 2
    s = kscale.store.open(d["output"]["path"])
    errs = {e["sample_id"]: e["reason"] for e in s.errors()}
    assert set(errs) == {1, 2, 3, 4}
    assert "missing image file" in errs[1] and "missing.png" in errs[1]
    assert "corrupt image" in errs[2] and "data.jsonl line 3" in errs[2]
    assert "empty text" in errs[3]
    assert "longer than extract.max_seq_len=100" in errs[4]
    assert set(s.tokens("text")["sample_id"]) == {0, 5} and set(s.tokens("image")["sample_id"]) == {0}


def test_store_policies(tmp_path):
    d = extract_spec(tmp_path, data={"generated": {"n_samples": 4, "image_size": 112}})
    run_job(spec_from_dict(d), show_bar=False)
    before = marker_path(d["output"]["path"], "s000000").read_text()
    from kscale.extract.run import StoreExistsError

    with pytest.raises(StoreExistsError, match="different spec"):
        run_job(spec_from_dict({**d, "extract": {**d["extract"], "key_dtype": "float16"}}), show_bar=False)
    with pytest.raises(StoreExistsError, match="'fail'"):
        run_job(spec_from_dict({**d, "output": {**d["output"], "if_exists": "fail"}}), show_bar=False)
    assert marker_path(d["output"]["path"], "s000000").read_text() == before
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a kscale store"):
        run_job(spec_from_dict({**d, "output": {"path": str(other), "if_exists": "overwrite"}}), show_bar=False)
    assert (other / "precious.txt").read_text() == "keep me"
    s = run_job(spec_from_dict({**d, "output": {**d["output"], "if_exists": "overwrite"}}), show_bar=False)
    assert s.shards_done == 1 and s.shards_skipped == 0


def test_info_cli(tmp_path):
    d = extract_spec(tmp_path, data={"generated": {"n_samples": 4, "image_size": 112}})
    run_job(spec_from_dict(d), show_bar=False)
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "info", "--json", d["output"]["path"]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["samples"] == 4 and info["tokens"]["image"] == 4 * 16 and info["layers"] == [0, 1]


def test_store_is_self_contained_for_post_rope_keys(tmp_path):
    import shutil

    from kscale.models.debug import build_debug_model

    model_dir = build_debug_model("qwen2_5_vl", tmp_path / "model")
    d = extract_spec(tmp_path, model=model_dir, data={"generated": {"n_samples": 4, "image_size": 112}})
    run_job(spec_from_dict(d), show_bar=False)
    before = kscale.store.open(d["output"]["path"]).keys(1, "image", rope=True).compute()
    shutil.rmtree(model_dir)  # the checkpoint moved away: the store's recorded config still serves
    after = kscale.store.open(d["output"]["path"]).keys(1, "image", rope=True).compute()
    assert np.array_equal(before, after)
    pre = kscale.store.open(d["output"]["path"]).keys(1, "image").compute()
    assert np.abs(after - pre).max() > 1e-3
