"""Cost of a bias job on the demo model: samples per second with every measure on vs the plain forward.

Runs the worker in-process (no executor overhead) on the tiny Qwen2.5-VL and generated data, one torch
thread, and times: the plain forward of the same samples (real image, answer scored once), each
measure alone, and everything. The cost is in forward passes per batch:

    conditions x candidates           (5 conditions; 1 candidate, 2 on conflict records)
  + 1 ranking forward (if an attended order is on) + 1 undropped + orders x fractions  (dropping)

so it grows linearly with the number of counterfactual conditions and with orders x fractions.

    python bench/bias.py [n_samples] [repeats]

Every case runs ``repeats`` times (default 5) after one warm-up of the plain forward; the table shows the
median time (and the spread min-max), so one slow run on a shared machine does not set the ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(n: int = 48, repeats: int = 5) -> None:
    import statistics

    import torch

    from kscale.bias.plan import BiasShard
    from kscale.bias.variants import Variant
    from kscale.bias.worker import score_records, setup
    from kscale.spec import spec_from_dict

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()

    def spec(**bias):
        return spec_from_dict({
            "kind": "bias", "model": {"path": "debug:qwen2_5_vl", "dtype": "float32"},
            "data": {"source": "generated", "shard_size": n,
                     "generated": {"n_samples": n, "image_size": 112,
                                   "tasks": ["color", "shape", "count", "position", "conflict"]}},
            "bias": {"batch_size": 8, **bias}, "output": {"path": tmp}, "resources": {"executor": "local"}})

    full = spec()
    state = setup(full)
    recs = [state.source.get(i) for i in range(n)]
    shard = BiasShard(Variant("base", "base"), 0, 0, n)
    lm = state.loaded

    def plain() -> None:
        for a in range(0, n, 8):
            chunk = recs[a:a + 8]
            b = lm.adapter.build_batch(lm, [r.image for r in chunk], [r.text for r in chunk], [r.answer for r in chunk])
            state.score(b.inputs, b.answer_mask_BT)

    cases = [("plain forward (real image, answer)", None, plain)]
    no_drop = {"dropping": {"enabled": False}}
    for conds in (["real"], ["real", "blank"], ["real", "blank", "noise", "swapped"],
                  ["real", "blank", "noise", "swapped", "none"]):
        cases.append((f"conditions {len(conds)} ({', '.join(conds)}), no dropping",
                      spec(conditions=conds, claim_field=None, **no_drop), None))
    cases.append(("+ evidence conflict candidates (5 conditions)", spec(**no_drop), None))
    cases.append(("dropping only (4 orders x 4 fractions)", spec(conditions=["real"], claim_field=None), None))
    cases.append(("everything (demo_bias.yaml)", full, None))
    plain()  # warm-up
    base = None
    print(f"{n} samples, tiny Qwen2.5-VL, 112 px images (16 image tokens), 1 thread, median of {repeats} runs")
    print(f"{'case':58s} {'samples/s':>10s} {'x plain':>8s} {'tokens/s':>9s} {'min-max s':>13s}")
    for name, s, fn in cases:
        times = []
        for _ in range(repeats):
            state.tokens_scored = 0
            t0 = time.perf_counter()
            fn() if fn else score_records(s, state, shard, recs)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        base = base or dt
        print(f"{name:58s} {n / dt:10.1f} {dt / base:8.1f} {state.tokens_scored / times[-1]:9.0f} "
              f"{min(times):6.2f}-{max(times):<6.2f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
