"""Every input format gives the keys of the same samples given through a manifest (run_extract on the tiny
Qwen2.5-VL, stores compared byte for byte); a partial run resumes to an identical store; a changed file is
DataChanged; bad rows are recorded (issue 24)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kscale.store
from kscale.output import DataChanged
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec

COLORS = ["red", "blue", "green", "orange", "purple"]
BAD = 3  # the row whose image bytes are corrupt in every format


def png(color: str, size: int = 56) -> bytes:
    b = io.BytesIO()
    img = Image.new("RGB", (size, size), color)
    img.putpixel((3, 5), (1, 2, 3))
    img.save(b, "PNG")
    return b.getvalue()


def samples() -> list[dict]:
    out = []
    for i, c in enumerate(COLORS):
        out.append({"id": f"s{i}", "text": f"what color is shape {i} ?", "answer": c,
                    "png": b"not a png" if i == BAD else png(c)})
    return out


def write_manifest(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples():
        (d / f"{s['id']}.png").write_bytes(s["png"])
        lines.append(json.dumps({"id": s["id"], "image": f"{s['id']}.png", "text": s["text"], "answer": s["answer"]}))
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    return d / "m.jsonl"


def parquet_rows() -> list[dict]:
    return [{"id": s["id"], "image": {"bytes": s["png"], "path": None}, "text": s["text"], "answer": s["answer"]}
            for s in samples()]


def write_parquet(d: Path, rows: list[dict] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    rows = rows or parquet_rows()
    pq.write_table(pa.Table.from_pylist(rows[:3]), d / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[3:]), d / "part-1.parquet", row_group_size=2)
    return d


def write_tars(d: Path, extra: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ss = samples()
    for k, part in enumerate((ss[:2], ss[2:] + (ss[:1] if extra else []))):
        with tarfile.open(d / f"shard-{k}.tar", "w") as t:
            for s in part:
                for name, data in ((f"{s['id']}.png", s["png"]),
                                   (f"{s['id']}.json", json.dumps({"text": s["text"], "answer": s["answer"]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return d


def write_llava(d: Path) -> Path:
    """LLaVA conversation JSON(L): the image placeholder opens the question, then a gpt turn."""
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples():
        (d / f"{s['id']}.png").write_bytes(s["png"])
        conv = [{"from": "human", "value": "<image>" + s["text"]}, {"from": "gpt", "value": s["answer"]}]
        lines.append(json.dumps({"id": s["id"], "image": f"{s['id']}.png", "conversations": conv}))
    (d / "llava.jsonl").write_text("\n".join(lines) + "\n")
    return d / "llava.jsonl"


def extract(tmp: Path, name: str, **data) -> str:
    spec = spec_from_dict(extract_spec(tmp / name, data={"shard_size": 2, "id_field": "id", **data},
                                       extract={"batch_size": 2, "key_dtype": "float32", "layers": [0, 1]}))
    run_job(spec, show_bar=False)
    return spec.output.path


def contents(path: str) -> dict:
    ks = kscale.store.open(path)
    out = {}
    for m in ("text", "image", "special"):
        for layer in ks.layers:
            out[("keys", layer, m)] = ks.keys(layer, m).compute()
        for c, v in ks.tokens(m).items():
            out[("tokens", m, c)] = v
    out["errors"] = sorted(e["sample_id"] for e in ks.errors())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    path = extract(tmp, "manifest", source="manifest", path=str(write_manifest(tmp / "m")))
    got = contents(path)
    assert got["errors"] == [BAD] and got[("keys", 0, "image")].shape[0] > 0
    return got


def test_parquet_with_embedded_png_bytes_gives_the_manifests_keys(tmp_path, reference):
    path = extract(tmp_path, "pq", source="parquet", path=str(write_parquet(tmp_path / "pq")))
    assert_same(contents(path), reference)
    errors = kscale.store.open(path).errors()
    assert "part-1.parquet row 0: corrupt image" in errors[0]["reason"] and errors[0]["source_id"] == "s3"


def test_a_local_dataset_through_load_dataset_gives_the_manifests_keys(tmp_path, reference, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = extract(tmp_path, "hf", source="hf", path=str(write_parquet(tmp_path / "hfdata")))
    assert_same(contents(path), reference)
    assert any((tmp_path / "hf-cache").rglob("*.arrow"))  # went through the datasets cache


def test_webdataset_tars_give_the_manifests_keys(tmp_path, reference):
    path = extract(tmp_path, "wds", source="webdataset", path=str(write_tars(tmp_path / "wds") / "*.tar"), id_field=None)
    assert_same(contents(path), reference)
    assert kscale.store.open(path).errors()[0]["source_id"] == "s3"  # the sample's key


def test_llava_conversations_give_the_manifests_keys(tmp_path, reference):
    path = extract(tmp_path, "llava", source="manifest", path=str(write_llava(tmp_path / "ll")),
                   turns_field="conversations")
    assert_same(contents(path), reference)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "hf"])
def test_a_partial_run_resumes_to_an_identical_store_and_a_changed_file_is_refused(tmp_path, fmt, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "data"
    if fmt == "webdataset":
        write_tars(data)
    else:
        write_parquet(data)
    if fmt == "hf":  # a card declaring its configs, as hub datasets have (datasets then keys its cache by the card)
        (data / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: part-*.parquet\n---\n")
    path = extract(tmp_path, "run", source=fmt, path=str(data))
    before = contents(path)
    for name in ("s000001", "s000002"):  # what a run killed before these commits leaves
        (Path(path) / "shards" / f"{name}.done.json").unlink()
        shutil.rmtree(Path(path) / "shards" / name)
    extract(tmp_path, "run", source=fmt, path=str(data))
    assert_same(contents(path), before)
    if fmt == "webdataset":
        write_tars(data, extra=True)
    else:
        rows = parquet_rows()
        rows[4]["text"] = "what COLOR is shape 4 ?"  # same size
        write_parquet(data, rows)
        from kscale.data import open_source
        from kscale.spec import DataSpec

        assert open_source(DataSpec(source=fmt, path=str(data))).get(4).text == rows[4]["text"]  # not a stale cache
    with pytest.raises(DataChanged, match="changed since this output was written"):
        extract(tmp_path, "run", source=fmt, path=str(data))


def test_several_images_are_placed_where_the_text_names_them(tmp_path):
    """MMMU-style columns image_1, image_2: <image 2> before <image 1> in the text; the store's image tokens
    carry image_index 0 and 1 with the second image's tokens first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mmmu"
    d.mkdir()
    rows = [{"id": "q0", "question": "compare <image 2> with <image 1> .", "answer": "a",
             "image_1": {"bytes": png("red"), "path": None}, "image_2": {"bytes": png("blue", 84), "path": None},
             "image_3": None},
            {"id": "q1", "question": "too many", "answer": "b", "image_1": {"bytes": png("red"), "path": None},
             "image_2": {"bytes": png("red"), "path": None}, "image_3": {"bytes": png("red"), "path": None}}]
    pq.write_table(pa.Table.from_pylist(rows), d / "test.parquet")
    path = extract(tmp_path, "mmmu", source="parquet", path=str(d), text_field="question", max_images=2,
                   image_field=["image_1", "image_2", "image_3"])
    ks = kscale.store.open(path)
    t = ks.tokens("image")
    mine = t["sample_id"] == 0
    order = np.argsort(t["position"][mine])
    idx = t["image_index"][mine][order]
    assert set(idx.tolist()) == {0, 1} and idx[0] == 1 and (np.diff(idx) <= 0).all()  # image 2's tokens first
    assert (idx == 1).sum() > (idx == 0).sum()  # the 84 px image has more tokens than the 56 px one
    assert "3 images, more than data.max_images=2" in ks.errors()[0]["reason"]


@pytest.mark.slow  # ~50 s on a loaded machine: two extractions and a CLI process
def test_a_sigkilled_parquet_run_resumes_to_the_uninterrupted_store(tmp_path):
    """The driver killed mid-shard (SIGKILL, its own PID); the rerun reuses the index beside the output,
    skips the committed shards and ends byte-equal to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.integration.test_extract import stores_equal

    rows = [{"id": f"s{i}", "image": {"bytes": png(COLORS[i % 5], 56 + 28 * (i % 2)), "path": None},
             "text": f"what color is shape {i} ?", "answer": COLORS[i % 5]} for i in range(16)]
    data = write_parquet(tmp_path / "pq", rows)
    over = dict(data={"source": "parquet", "path": str(data), "shard_size": 2, "id_field": "id"},
                extract={"batch_size": 1, "key_dtype": "float16", "layers": [0, 1]})
    ref = spec_from_dict(extract_spec(tmp_path / "ref", **over))
    run_job(ref, show_bar=False)
    d = extract_spec(tmp_path / "killed", **over)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(d))
    store = Path(d["output"]["path"])
    proc = subprocess.Popen([sys.executable, "-m", "kscale.cli", "submit", "--no-progress", str(tmp_path / "job.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "shards").glob("*.done.json"))) < 2:
        time.sleep(0.05)
    while time.time() < deadline and not list((store / "shards").glob(".s??????.tmp-*")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    markers = {p.name for p in (store / "shards").glob("*.done.json")}
    assert 2 <= len(markers) < 8, "the kill must land mid-job"
    index = store.parent / f".{store.name}.data-index"
    assert sorted(p.name.split("-")[0] for p in index.iterdir()) == ["parquet", "parquet"]  # rows and ids
    summary = run_job(spec_from_dict(d), show_bar=False)
    assert summary.shards_skipped == len(markers) and summary.shards_failed == 0
    stores_equal(ref.output.path, str(store))
