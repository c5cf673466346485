"""Benchmark: where the pipelined extraction's CPU time goes, per shard, against the plain forward (not a test).

The model, data and batches of ``bench/extract_overhead.py`` (same options). Each round runs one shard of
plain forwards and one pipelined shard (``worker.start_shard``, its commit waited for), and times in CPU
seconds of the thread that runs them (``time.thread_time``):

- the forward thread: per batch the hooked forward (``forward_keys``) minus the plain forward of the same
  batch run right before it (the hooks' cost), ``keep_rows``, the shard's writer setup;
- the drain thread: ``write_host_keys`` (of it: ``ShardWriter.append``) and the commit (of it: the final
  flush, the listing and fsyncs of ``_files``);
- the writer thread: the chunk files (``write_key_shard``, ``write_table_chunk``, the arrays' ``zarr.json``);
- the fsync threads: ``fsync_path``;
- the rest: process CPU time not on any of these (other threads, thread start-up).

Prints medians over rounds in ms per shard and as % of the plain forward's CPU time.

    python bench/extract_breakdown.py [--family qwen3_vl_moe] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_overhead import bench_args, bench_setup  # noqa: E402

ACC: dict[str, float] = defaultdict(float)
_LOCK = threading.Lock()
THREADS: dict[str, float] = defaultdict(float)  # CPU seconds of threads that ended, by name prefix
_run = threading.Thread.run


def _counted_run(self) -> None:
    """``Thread.run`` adding the thread's CPU seconds to ``THREADS`` by its name's prefix when it ends."""
    try:
        _run(self)
    finally:
        with _LOCK:
            THREADS[re.sub(r"-s\d+$", "", self.name.split("_")[0])] += time.thread_time()


threading.Thread.run = _counted_run


def live_thread_cpu() -> dict[str, float]:
    """CPU seconds so far of every live thread but this one, by name."""
    out = {}
    for t in threading.enumerate():
        if t is not threading.current_thread() and t.ident is not None:
            try:
                out[t.name] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):
                pass
    return out


def timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its calling thread's CPU seconds to ``ACC[label]``."""
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            with _LOCK:
                ACC[label] += time.thread_time() - t
    setattr(owner, name, wrapper)


def main() -> None:
    ap_args = bench_args()
    from kscale.data.records import RecordList, Shard
    from kscale.extract import worker
    from kscale.store import chunks, writer

    tmp = Path(tempfile.mkdtemp(prefix="kscale-breakdown-"))
    try:
        spec, state, recs, batches = bench_setup(ap_args, tmp)
        lm = state.loaded
        state.source = RecordList(recs)
        prebuilt = {tuple(r.sample_id for r in recs[a:a + ap_args.batch]): b
                    for b, a in zip(batches, range(0, len(recs), ap_args.batch))}
        worker.build = lambda _s, rs, with_answers=False: prebuilt[tuple(r.sample_id for r in rs)]

        def plain_one(b) -> None:
            with torch.inference_mode():
                lm.model(**{k: v.to(lm.device) for k, v in b.inputs.items()}, **worker.FORWARD_KWARGS)

        # the hooked forward of a batch, paired with a plain forward of the same batch right before it
        forward_keys = worker.forward_keys

        def paired(st, batch, rows_N, key_dtype, kinds=("k",)):
            t = time.thread_time()
            plain_one(batch)
            t1 = time.thread_time()
            out = forward_keys(st, batch, rows_N, key_dtype, kinds)
            ACC["fwd: hooked - plain forward"] += (time.thread_time() - t1) - (t1 - t)
            ACC["_paired plain"] += t1 - t
            return out
        worker.forward_keys = paired
        from kscale.extract import hooks

        hooked = hooks._hooked

        def timed_hooks(modules, hook_for, rotary, on_rotary):
            def timed_for(key):
                fn = hook_for(key)

                def hook(*a):
                    t = time.thread_time()
                    fn(*a)
                    ACC["fwd:   of it hook bodies (k, rotary)"] += time.thread_time() - t
                return hook

            def rot(*a):
                t = time.thread_time()
                fn = on_rotary(*a)
                ACC["fwd:   of it hook bodies (k, rotary)"] += time.thread_time() - t
                return fn
            return hooked(modules, timed_for, rotary, rot)
        hooks._hooked = timed_hooks
        timed(hooks.HostKeys, "wait", "drain:   of it HostKeys.wait")
        timed(worker, "keep_rows", "fwd: keep_rows")
        timed(worker, "_writer", "fwd: ShardWriter() setup")
        timed(worker, "write_host_keys", "drain: write_host_keys")
        timed(writer.ShardWriter, "append", "drain:   of it ShardWriter.append")
        timed(writer.ShardWriter, "commit", "drain: commit")
        timed(writer._ModalityBuffer, "flush", "drain:   of it flush (+ in append)")
        timed(writer.ShardWriter, "_files", "drain:   of it _files (list, crc, fsync)")
        timed(writer._ModalityBuffer, "_write", "writer: chunk files")
        timed(chunks, "write_key_shard", "writer:   of it write_key_shard")
        timed(chunks, "write_table_chunk", "writer:   of it write_table_chunk")
        writer.write_key_shard, writer.write_table_chunk = chunks.write_key_shard, chunks.write_table_chunk
        timed(chunks, "fsync_path", "fsync threads: fsync_path")
        writer.fsync_path = chunks.fsync_path

        shard_no = iter(range(10**6))

        def pipelined() -> None:
            worker.start_shard(spec, Shard(next(shard_no), 0, ap_args.samples), state).result()

        def plain() -> None:
            for b in batches:
                plain_one(b)

        plain()
        pipelined()  # warm-up
        rows: dict[str, list[float]] = defaultdict(list)
        for _ in range(ap_args.repeats):
            c, ru = time.process_time(), resource.getrusage(resource.RUSAGE_THREAD)
            plain()
            rows["plain forward (process CPU)"].append(time.process_time() - c)
            ru1 = resource.getrusage(resource.RUSAGE_THREAD)
            rows["main thread: system CPU (plain)"].append(ru1.ru_stime - ru.ru_stime)
            rows["main thread: page faults /1000 (plain)"].append((ru1.ru_minflt - ru.ru_minflt) / 1e3)
            ACC.clear()
            THREADS.clear()
            live0 = live_thread_cpu()
            c, m, ru = time.process_time(), time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
            pipelined()
            total, main_t = time.process_time() - c, time.thread_time() - m
            ru1 = resource.getrusage(resource.RUSAGE_THREAD)
            rows["main thread: system CPU (pipelined)"].append(ru1.ru_stime - ru.ru_stime)
            rows["main thread: page faults /1000 (pipelined)"].append((ru1.ru_minflt - ru.ru_minflt) / 1e3)
            live1 = live_thread_cpu()
            paired_plain = ACC.pop("_paired plain")
            rows["pipelined - its paired plain (process CPU)"].append(total - paired_plain)
            for k, v in ACC.items():
                rows[k].append(v)
            threads = {"thread main (forwards: minus paired plain)": main_t - paired_plain}
            for name, v in live1.items():  # threads of one pool (kscale-fsync_0, _1, ...) summed
                key = f"thread {name.split('_')[0]}"
                threads[key] = threads.get(key, 0.0) + v - live0.get(name, 0.0)
            for name, v in THREADS.items():
                threads[f"thread {name} (ended)"] = threads.get(f"thread {name} (ended)", 0.0) + v
            for k, v in threads.items():
                rows[k].append(v)
            rows["rest (process - threads)"].append(total - paired_plain - sum(threads.values()))
        base = statistics.median(rows["plain forward (process CPU)"])
        n_tok = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
        print(f"model {ap_args.family}, {ap_args.samples} samples, {n_tok} tokens, batch {ap_args.batch}, "
              f"{len(batches)} batches, torch threads {torch.get_num_threads()}, {ap_args.repeats} rounds; "
              "CPU ms per shard (median), % of the plain forward")
        for k, v in rows.items():
            m = statistics.median(v)
            print(f"  {k:45s} {m * 1e3:9.1f} ms  {m / base:7.1%}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
