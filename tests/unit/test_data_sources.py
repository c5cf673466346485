"""Sources that read only their shard: the manifest's byte-offset index, Parquet row groups, ``load_dataset``,
WebDataset tars; several images per record and conversations (issue 24)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from kscale.data import lineindex, open_source, records
from kscale.data.lineindex import DataIndexStale
from kscale.spec import DataSpec


def write_manifest(path: Path, n: int, **extra) -> list[dict]:
    rows = [{"id": f"r{i}", "text": f"question {i}", "image": None, **extra} for i in range(n)]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    return rows


class CountingFile(io.BufferedReader):
    read_bytes = 0

    def read(self, n=-1):
        out = super().read(n)
        CountingFile.read_bytes += len(out)
        return out


def test_a_worker_reads_only_the_lines_it_asks_for(tmp_path, monkeypatch):
    m = tmp_path / "m.jsonl"
    write_manifest(m, 5000)
    idx = tmp_path / "idx"
    planned = open_source(DataSpec(source="manifest", path=str(m), id_field="id"), idx, plan=True)
    assert len(planned) == 5000 and sorted(p.name.split(".", 1)[1] for p in idx.iterdir()) == \
        ["dups.npy", "json", "rows.npy"]

    def no_scan(*a, **k):
        raise AssertionError("a worker scanned the manifest")

    monkeypatch.setattr(lineindex, "scan", no_scan)
    monkeypatch.setattr(records, "open", lambda p, mode="r": CountingFile(io.FileIO(p, mode)), raising=False)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(AssertionError("whole file read")))
    worker = open_source(DataSpec(source="manifest", path=str(m), id_field="id"), idx)
    CountingFile.read_bytes = 0
    rec = worker.get(4321)
    assert rec.error is None and rec.text == "question 4321" and rec.source_id == "r4321"
    assert CountingFile.read_bytes <= len(json.dumps({"id": "r4321", "text": "question 4321", "image": None})) + 1


def test_a_manifest_changed_after_planning_is_refused_by_workers_and_reindexed_by_the_planner(tmp_path):
    m = tmp_path / "m.jsonl"
    write_manifest(m, 10)
    idx = tmp_path / "idx"
    dspec = DataSpec(source="manifest", path=str(m))
    open_source(dspec, idx, plan=True)
    write_manifest(m, 12)
    with pytest.raises(DataIndexStale, match="changed after this job indexed it"):
        open_source(dspec, idx)
    assert len(open_source(dspec, idx, plan=True)) == 12 and len(open_source(dspec, idx)) == 12
    st = m.stat()
    os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: accepted after planning
    assert len(open_source(dspec, idx, plan=True)) == 12 and len(open_source(dspec, idx)) == 12


def test_blank_lines_crlf_and_bad_rows_keep_their_line_numbers(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"text": "a", "image": null}\r\n\n   \n{not json\n' + b'{"image": null, "text": "caf\xe9"}\n'
                  + b'{"text": "b", "image": null}')
    for idx in (None, tmp_path / "idx"):
        src = open_source(DataSpec(source="manifest", path=str(m)), idx, plan=True)
        assert len(src) == 4
        assert src.get(0).text == "a" and src.get(3).text == "b" and src.get(3).error is None
        assert "invalid JSON" in src.get(1).error and "not UTF-8" in src.get(2).error


def test_duplicate_ids_survive_hash_collisions(tmp_path, monkeypatch):
    """Every id hashes alike: the index must compare the real ids of colliding rows."""
    rows = [{"id": k, "text": "t", "image": None} for k in ("a", "b", "a", "c", "b", "a")]
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, rows)))
    monkeypatch.setattr(lineindex, "hash", lambda s: 7, raising=False)
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), id_field="id"), tmp_path / "i",
                      plan=True)
    errors = [src.get(i).error for i in range(6)]
    assert errors[:2] == [None, None] and errors[3] is None
    assert "duplicate id 'a' (first used by sample 0)" in errors[2] and "(first used by sample 0)" in errors[5]
    assert "duplicate id 'b' (first used by sample 1)" in errors[4]
    assert lineindex.load(tmp_path / "i", tmp_path / "m.jsonl", "id").duplicate_of == {2: 0, 4: 1, 5: 0}


# ----------------------------------------------------------------------------- images and conversations


def _png(tmp_path: Path, name: str, color: str) -> str:
    Image.new("RGB", (8, 8), color).save(tmp_path / name)
    return name


def test_conversations_llava_and_openai_every_assistant_turn_an_answer(tmp_path):
    from kscale.models.inputs import Media, Turn

    a, b = _png(tmp_path, "a.png", "red"), _png(tmp_path, "b.png", "blue")
    rows = [
        {"image": [a, b], "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and <image> ?"}, {"from": "gpt", "value": "blue"}]},
        {"image": [a], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this ?"},
                                         {"type": "image_url", "image_url": {"url": b}}]},
            {"role": "assistant", "content": "red, blue"}]},
        {"image": [a], "conversations": [{"from": "gpt", "value": "x"}]},
        {"image": [a], "conversations": [{"from": "human", "value": "<image> <image>"}]},
        {"image": None, "conversations": [{"from": "robot", "value": "hi"}]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({**r, "messages": r.get("messages", r.get("conversations"))})
                                                for r in rows))
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), turns_field="messages"))
    r = src.get(0)
    assert r.error is None and r.text == "\nwhat is it ?" and r.answer == "red" and r.image is r.images[0]
    assert r.turns == (Turn("system", ("be brief",)), Turn("user", (Media("image", 0), "\nwhat is it ?")),
                       Turn("assistant", ("red",)), Turn("user", ("and ", Media("image", 1), " ?")),
                       Turn("assistant", ("blue",)))
    assert [t.text for t in r.sample().turns if t.role == "assistant"] == ["red", "blue"]
    assert r.sample(with_answer=False).turns == r.turns[:2]
    r = src.get(1)
    assert r.error is None and len(r.images) == 2 and r.images[1].getpixel((0, 0)) == (0, 0, 255)
    assert r.turns[0].content == (Media("image", 0), "and this ?", Media("image", 1)) and r.answer == "red, blue"
    assert "has no user turn" in src.get(2).error
    assert "names <image> number 2 but the record has 1 image(s)" in src.get(3).error
    assert "turn 0 has role 'robot'" in src.get(4).error


def test_unnamed_images_come_first_and_a_single_image_keeps_the_simple_sample(tmp_path):
    from kscale.models.inputs import Media, Sample

    a, b = _png(tmp_path, "a.png", "red"), _png(tmp_path, "b.png", "blue")
    rows = [{"im1": a, "im2": None, "text": "plain", "answer": "x"},
            {"im1": a, "im2": b, "text": "only <image 2> named", "answer": "y"},
            {"im1": a, "im2": None, "text": "see <image 3>", "answer": "z"}]
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, rows)))
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), image_field=["im1", "im2"]))
    r = src.get(0)
    assert r.turns is None and r.sample() == Sample.simple(r.image, "plain", "x")
    r = src.get(1)
    assert r.turns[0].content == (Media("image", 0), "only ", Media("image", 1), " named")
    assert "names <image 3> but the record has 1 image(s)" in src.get(2).error


def test_spec_errors_name_the_data_field(tmp_path):
    from kscale.spec import SpecError, spec_from_dict
    from tests.conftest import extract_spec

    raw = extract_spec(tmp_path, data={"source": "parquet", "path": str(tmp_path / "*.parquet"), "image_field": [],
                                       "max_images": 0})
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw)
    msg = str(e.value)
    assert "data.path: " in msg and "names no .parquet file" in msg
    assert "data.image_field: an empty list names no image field" in msg
    assert "data.max_images: must be >= 1 (got 0)" in msg
    raw = extract_spec(tmp_path, data={"source": "webdataset", "path": str(tmp_path / "nope")})
    with pytest.raises(SpecError, match=r"data.path: .*nope' does not exist"):
        spec_from_dict(raw)


def test_saved_dataset_duplicates_come_from_the_planners_index(tmp_path, monkeypatch):
    from datasets import Dataset

    rows = [{"id": k, "text": "t", "image": None} for k in ("a", "b", "a")]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    dspec = DataSpec(source="hf_disk", path=str(tmp_path / "ds"), id_field="id")
    assert "duplicate id 'a' (first used by sample 0)" in open_source(dspec, tmp_path / "i", plan=True).get(2).error
    monkeypatch.setattr(records, "row_ids", lambda *a: (_ for _ in ()).throw(AssertionError("worker read every id")))
    worker = open_source(dspec, tmp_path / "i")
    assert worker.get(0).error is None and "duplicate id 'a'" in worker.get(2).error


def test_a_llava_conversation_trains_on_every_assistant_turn(tmp_path):
    """Through the family adapter (what the training collate calls): the answer mask holds the tokens of both
    gpt turns and nothing of the human turns; both images are fed, each tagged with its index."""
    from kscale.models import load_model
    from kscale.spec import ModelSpec

    lm = load_model(ModelSpec(path="debug:qwen2_5_vl", dtype="float32"))
    a, b = _png(tmp_path, "a.png", "red"), _png(tmp_path, "b.png", "blue")
    conv = [{"from": "human", "value": "<image> what color ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and <image> ?"}, {"from": "gpt", "value": "blue square"}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": [a, b], "conversations": conv}))
    rec = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), turns_field="conversations")).get(0)
    batch = lm.adapter.batch(lm, [rec.sample()])
    ids = batch.inputs["input_ids"][0]
    answer = lm.tokenizer.decode(ids[batch.answer_mask_BT[0]])
    assert "red" in answer and "blue" in answer and "square" in answer and "color" not in answer, answer
    assert set(batch.image_index_BT[0][batch.image_index_BT[0] >= 0].tolist()) == {0, 1}


def test_parquet_and_tar_indexes_changed_after_planning_are_refused_by_workers(tmp_path):
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(n: int) -> None:
        pq.write_table(pa.Table.from_pylist([{"text": f"t{i}", "image": None} for i in range(n)]),
                       tmp_path / "a.parquet", row_group_size=2)
        with tarfile.open(tmp_path / "a.tar", "w") as t:
            for i in range(n):
                info = tarfile.TarInfo(f"k{i}.txt")
                info.size = 2
                t.addfile(info, io.BytesIO(b"hi"))

    write(5)
    for source, path in (("parquet", "a.parquet"), ("webdataset", "a.tar")):
        dspec = DataSpec(source=source, path=str(tmp_path / path), image_field="nothing")
        assert len(open_source(dspec, tmp_path / "i", plan=True)) == 5
    write(7)
    for source, path in (("parquet", "a.parquet"), ("webdataset", "a.tar")):
        dspec = DataSpec(source=source, path=str(tmp_path / path), image_field="nothing")
        with pytest.raises(DataIndexStale, match="changed after this job indexed it"):
            open_source(dspec, tmp_path / "i")
        assert len(open_source(dspec, tmp_path / "i", plan=True)) == 7 == len(open_source(dspec, tmp_path / "i"))
    (tmp_path / "b.tar.gz").write_bytes(__import__("gzip").compress((tmp_path / "a.tar").read_bytes()))
    with pytest.raises(ValueError, match="is compressed"):
        open_source(DataSpec(source="webdataset", path=str(tmp_path / "b.tar.gz")))
