"""Issue 11 findings 7-9 and issue 12 item 5: inputs that cannot exhaust a machine, record errors that stay
the record's, and every bad spec reported in one pass with a named error, exit 2 and no traceback.

Memory and time are measured on a real child process (``resource.getrusage(RUSAGE_CHILDREN)``), never by
patching: the child loads the real file with the real code. Timings are on a shared 2-core machine: the
bounds (1 s, 100 MB) are an order of magnitude above what the fixed code needs.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import yaml

from kscale.data import open_source, plan_shards
from kscale.spec import DataSpec, SpecError, load_spec, spec_from_dict
from tests.conftest import extract_spec

REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20


PEAK_RSS = """
def peak_rss_mb():
    # VmHWM: this program's peak resident memory. getrusage(RUSAGE_SELF/CHILDREN).ru_maxrss would also count
    # the pytest process the child was forked from (Linux carries the pre-exec peak across execve).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def run_child(code: str, timeout: float = 60) -> tuple[dict, float]:
    """Run ``code`` in a fresh Python (1 GB address-space cap, so a regression cannot take the machine);
    returns (the JSON it printed last, the child's peak RSS in MB, imports included)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = "import json, time\n" + PEAK_RSS + textwrap.dedent(code) + "\nprint(json.dumps(peak_rss_mb()))\n"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=cap)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, result, peak = proc.stdout.strip().splitlines()
    return json.loads(result), json.loads(peak)


# ----------------------------------------------------------------------------- finding 7: bounded inputs


ALIAS_BOMB = """\
kind: extract
a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
model: {path: "debug:qwen2_5_vl"}
data: {source: generated}
extract: {layers: *i}
output: {path: /tmp/never}
"""


def test_alias_bomb_is_refused_fast_and_small(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert bomb.stat().st_size < 1024  # 1 KB that expands to 10^9 values
    out, rss_mb = run_child(f"""
        from kscale.spec import SpecError, load_spec
        t = time.perf_counter()
        try:
            load_spec({str(bomb)!r}, check_model=False)
            msg = "accepted"
        except SpecError as e:
            msg = str(e)
        print(json.dumps({{"s": time.perf_counter() - t, "msg": msg}}))
    """, timeout=30)
    assert "refused YAML" in out["msg"] and "aliases" in out["msg"], out["msg"]
    assert out["s"] < 1.0, out
    assert rss_mb < 100, rss_mb


def test_yaml_limits_keep_normal_aliases_and_refuse_huge_or_recursive_files(tmp_path):
    raw = extract_spec(tmp_path)
    raw["extract"]["layers"], raw["extract"]["heads"] = "LAYERS", "HEADS"
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(raw).replace("HEADS", "&sel [0, 1]").replace("LAYERS", "*sel"))
    spec = load_spec(ok, check_model=False)  # a few ordinary aliases still load
    assert spec.extract.layers == spec.extract.heads == [0, 1]
    rec = tmp_path / "rec.yaml"
    rec.write_text("kind: extract\nx: &x [*x]\n")
    with pytest.raises(SpecError, match="recursive|refused"):
        load_spec(rec, check_model=False)
    huge = tmp_path / "huge.yaml"
    huge.write_text("kind: extract\n# " + "x" * (2 * MB) + "\n")
    with pytest.raises(SpecError, match="larger than"):
        load_spec(huge, check_model=False)


def test_a_trillion_samples_validate_fast_and_the_plan_is_lazy(tmp_path):
    raw = extract_spec(tmp_path, data={"generated": {"n_samples": 10**12, "image_size": 56}})
    t = time.perf_counter()
    spec = spec_from_dict(raw, check_model=False)
    assert time.perf_counter() - t < 1.0
    # in a 1 GB child: a plan that lists its shards fails there, not on this machine
    out, _ = run_child("""
        from kscale.data import open_source, plan_shards
        from kscale.spec import DataSpec, GeneratedDataSpec
        t = time.perf_counter()
        plan = plan_shards(len(open_source(DataSpec(generated=GeneratedDataSpec(n_samples=10**12)))), 4)
        print(json.dumps({"s": time.perf_counter() - t, "n": len(plan), "last": plan[-1].stop,
                          "s123": plan[123].start}))
    """)
    assert out["n"] == 10**12 // 4 and out["last"] == 10**12 and out["s123"] == 492 and out["s"] < 1.0, out
    assert spec.data.generated.n_samples == 10**12
    assert plan_shards(50, 4)[3].start == 12 and list(plan_shards(10, 4)) == plan_shards(10, 4)[:]
    # YAML 1.1 reads 1e12 as a string: named, not a crash
    raw["data"]["generated"]["n_samples"] = "1e12"
    with pytest.raises(SpecError, match="data.generated.n_samples: expected an integer"):
        spec_from_dict(raw, check_model=False)


def write_big_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height white-on-black zeros, written row by row (tiny file, huge image)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_12000_square_png_is_recorded_too_large_without_decoding(tmp_path):
    write_big_png(tmp_path / "big.png", 12000, 12000)
    assert (tmp_path / "big.png").stat().st_size < 40_000  # ~17 KB; 432 MB once decoded to RGB
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "big.png", "text": "what is it ?"}) + "\n")
    out, rss_mb = run_child(f"""
        from kscale.data import open_source
        from kscale.spec import DataSpec
        src = open_source(DataSpec(source="manifest", path={str(tmp_path / "m.jsonl")!r}))
        t = time.perf_counter()
        rec = src.get(0)
        print(json.dumps({{"s": time.perf_counter() - t, "error": rec.error, "image": rec.image is not None}}))
    """)
    assert out["error"] and "larger than data.max_image_pixels=50000000" in out["error"], out
    assert "12000x12000" in out["error"] and not out["image"]
    assert out["s"] < 1.0, out
    assert rss_mb < 100, rss_mb  # decoding alone would take 18 MB (1 bit) + 432 MB (RGB)


def test_the_pixel_limit_is_a_spec_field(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "text": "t"}) + "\n")
    small = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), max_image_pixels=1000)).get(0)
    assert "1200 pixels is larger than data.max_image_pixels=1000" in small.error
    assert open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"))).get(0).image.size == (40, 30)


def test_records_are_read_and_decoded_one_batch_at_a_time():
    """The extract worker reads a shard's records as their batch comes: a shard never holds more than one
    batch of decoded images, and the batches are the usable records in order (the same as reading all)."""
    from kscale.data import Record, Shard
    from kscale.extract.worker import usable_batches

    class Counting:  # a plain source that says how many records have been read so far
        def __init__(self):
            self.read = 0

        def get(self, i: int) -> Record:
            self.read += 1
            return Record(i, str(i), None, "t", error="bad" if i % 3 == 0 else None)

    src, errors = Counting(), []
    batches = usable_batches(src, Shard(0, 0, 20), 4, errors)
    first = next(batches)
    assert [r.sample_id for r in first] == [1, 2, 4, 5] and src.read == 6  # not 20
    rest = list(batches)
    assert [[r.sample_id for r in b] for b in rest] == [[7, 8, 10, 11], [13, 14, 16, 17], [19]]
    assert [e["sample_id"] for e in errors] == [0, 3, 6, 9, 12, 15, 18]


# ----------------------------------------------------------------------------- finding 9: record errors


def test_a_non_utf8_row_is_that_rows_error(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(json.dumps({"image": None, "text": "fine"}).encode() + b"\n"
                  + b'{"image": null, "text": "caf\xe9"}\n' + json.dumps({"image": None, "text": "ok"}).encode())
    src = open_source(DataSpec(source="manifest", path=str(m)))
    assert len(src) == 3
    assert src.get(0).error is None and src.get(2).error is None
    assert "m.jsonl line 2: not UTF-8 (byte 28: b'\\xe9')" in src.get(1).error


def test_devices_and_fifos_are_not_regular_files(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"image": p, "text": "t"}) for p in
                                                ("/dev/zero", "pipe.png", "gone.png")))
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl")))
    assert "'/dev/zero' is not a regular file" in src.get(0).error
    assert "pipe.png' is not a regular file" in src.get(1).error  # returns at once: the FIFO is never opened
    assert "missing image file" in src.get(2).error


def test_duplicate_ids_are_recorded_on_the_later_rows(tmp_path):
    rows = [{"id": "a", "text": "1", "image": None}, {"id": "b", "text": "2", "image": None},
            {"id": "a", "text": "3", "image": None}]
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, rows)))
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), id_field="id"))
    assert src.get(0).error is None and src.get(1).error is None
    assert "duplicate id 'a' (first used by sample 0)" in src.get(2).error
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    hf = open_source(DataSpec(source="hf_disk", path=str(tmp_path / "ds"), id_field="id"))
    assert hf.get(0).error is None and "duplicate id 'a'" in hf.get(2).error


def test_a_full_disk_while_writing_progress_warns_once_and_the_job_goes_on(tmp_path):
    """RLIMIT_FSIZE makes every write past 1 byte fail with EFBIG, as a full disk would (real writes)."""
    out, _ = run_child(f"""
        import resource, signal, sys, io
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from kscale.executors.progress import Progress
        err = io.StringIO(); sys.stderr = err
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))
        p = Progress({str(tmp_path)!r}, "j", "extract", total=3, skipped=0, show_bar=False)
        for _ in range(3):
            p.shard_done({{"n_samples_ok": 2}})
        snap = p.finish()
        sys.stderr = sys.__stderr__
        print(json.dumps({{"state": snap["state"], "done": snap["shards_done"], "warn": err.getvalue()}}))
    """)
    assert out["state"] == "succeeded" and out["done"] == 3
    assert out["warn"].count("cannot write") == 1, out["warn"]
    assert not list(tmp_path.glob(".*tmp*"))  # no partial temp files left behind


# ----------------------------------------------------------------------------- one pass, named, exit 2


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kscale.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_every_problem_in_one_pass_with_suggestions_exit_2_and_no_traceback(tmp_path):
    raw = extract_spec(tmp_path, extract={"layers": [0, 40], "key_dtype": "float32"},
                       data={"source": "manifset"},
                       resources={"executor": "local", "torch_threads": -3, "cpus_per_worker": float("nan"),
                                  "gpus_per_worker": float("inf")})
    raw["model"]["dtyp"] = raw["model"].pop("dtype")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    proc = cli("validate", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr
    assert "model.dtyp: unknown key (did you mean 'dtype'?)" in err
    assert "data.source: 'manifset' is not one of 'generated', 'manifest', 'hf_disk', 'parquet', 'hf', 'webdataset' (did you mean 'manifest'?)" in err
    assert "extract.layers" in err and "40" in err  # the model-dependent range, with the rest
    assert "resources.torch_threads: must be >= 1 (got -3)" in err
    assert "resources.cpus_per_worker: must be a finite number (got nan)" in err
    assert "resources.gpus_per_worker: must be a finite number (got inf)" in err
    assert "6 problem(s)" in err


def test_enum_suggestion_for_kind_and_a_huge_value_is_cut(tmp_path):
    (tmp_path / "k.yaml").write_text("kind: analyse\noutput: {path: x}\n")
    proc = cli("validate", str(tmp_path / "k.yaml"))
    assert proc.returncode == 2 and "did you mean 'analyze'?" in proc.stderr and "Traceback" not in proc.stderr
    raw = extract_spec(tmp_path)
    raw["model"]["dtype"] = "HUGE"
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(raw).replace("HUGE", "x" * (100 * MB)))
    assert (tmp_path / "big.yaml").stat().st_size > MB  # refused by size, before parsing
    proc = cli("validate", str(tmp_path / "big.yaml"))
    assert proc.returncode == 2 and len(proc.stderr) < 1000 and "larger than" in proc.stderr
    raw["model"]["dtype"] = "y" * MB
    with pytest.raises(SpecError) as e:  # a value that passed the size cap is still cut in the message
        spec_from_dict(raw, check_model=False)
    assert len(str(e.value)) < 1000 and f"({MB} chars)" in str(e.value)


def test_an_analysis_of_a_missing_store_fails_validation_with_the_other_problems(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({
        "kind": "analyze", "output": {"path": str(tmp_path / "run")},
        "analyze": {"stores": [str(tmp_path / "nope"), str(tmp_path)], "exact_subsample": 1}}))
    for cmd in ("validate", "submit"):
        proc = cli(cmd, str(tmp_path / "a.yaml"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "nope' does not exist" in proc.stderr and "is not a kscale key store" in proc.stderr
        assert "analyze.exact_subsample: must be >= 4 (got 1)" in proc.stderr


def test_explain_shows_list_defaults_as_values():
    from kscale.spec import explain

    rows = {name: default for name, _, default, _ in explain()}
    assert rows["data.generated.tasks"] == repr(["caption", "color", "shape", "count", "position"])
    assert rows["data.generated"] == "(see below)"  # a nested section's fields follow it
    assert rows["data.max_image_pixels"] == "50000000"


def _crafted_rows(tmp_path) -> Path:
    """A manifest whose rows 1 and 2 break Python's JSON reader: a number of more than 4,300 digits
    (``ValueError``, not a ``JSONDecodeError``) and nesting deeper than the interpreter recurses."""
    good = [json.dumps({"id": f"g{k}", "image": None, "text": f"fine {k}"}) for k in range(2)]
    huge = '{"id": ' + "9" * 5000 + ', "image": null, "text": "t"}'
    deep = '{"id": "d", "image": null, "text": "t", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([good[0], huge, deep, good[1]]) + "\n")
    return m


@pytest.mark.parametrize("id_field", [None, "id"])
def test_a_crafted_row_is_that_rows_error_with_or_without_id_field(tmp_path, id_field):
    """Issue 21 item 11: before, ``get`` raised for the crafted rows, and with ``id_field`` for every row."""
    src = open_source(DataSpec(source="manifest", path=str(_crafted_rows(tmp_path)), id_field=id_field))
    recs = [src.get(i) for i in range(len(src))]
    assert [r.error for r in (recs[0], recs[3])] == [None, None]
    assert [r.text for r in (recs[0], recs[3])] == ["fine 0", "fine 1"]
    assert "m.jsonl line 2: unreadable JSON (ValueError" in recs[1].error
    assert "m.jsonl line 3: unreadable JSON (RecursionError" in recs[2].error
    if id_field:
        assert [r.source_id for r in (recs[0], recs[3])] == ["g0", "g1"]


def test_any_exception_while_building_a_record_is_that_rows_error():
    """A row that parses but cannot be turned into a record (an id that cannot be printed: ``str`` of an
    int of 5,000 digits raises ``ValueError``) is recorded, whatever the source (the guard is in ``_record``)."""
    from kscale.data import records

    dspec = DataSpec(source="manifest", path="unused.jsonl", id_field="id")
    row = {"id": 10**5000, "image": None, "text": "t"}
    rec = records._record(4, row, dspec, None, "src row 4", {})
    assert rec.sample_id == 4 and rec.error.startswith("src row 4: unreadable row (ValueError")


def test_deeply_nested_yaml_is_a_spec_error_naming_the_file_exit_2(tmp_path):
    """Issue 21 item 14: 5,000 nested lists gave a ``RecursionError`` traceback and exit 1."""
    from kscale.spec import MAX_YAML_DEPTH, parse_yaml

    deep = tmp_path / "deep.yaml"
    deep.write_text("kind: extract\nx: " + "[" * 5000 + "1" + "]" * 5000 + "\n")
    proc = cli("validate", str(deep))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(deep) in proc.stderr and "nested" in proc.stderr, proc.stderr
    # the bound, at the boundary: each list (or mapping) is one level
    assert parse_yaml("[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH) is not None
    with pytest.raises(ValueError, match=f"nested more than {MAX_YAML_DEPTH}"):
        parse_yaml("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
