"""The benchmark scripts report what they measured: a warm-up before timing, memory in its own pass, and
a goal counts as met only for a variant that ran."""

from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mmd_bench_times_after_a_warm_up_and_traces_memory_in_a_separate_pass() -> None:
    mmd = _bench("mmd")
    calls = []

    def fn():
        calls.append(tracemalloc.is_tracing())
        return bytearray(8 << 20)  # 8 MiB

    out, seconds, peak = mmd.measure(fn)
    assert calls == [False, False, True]  # warm-up, timed (untraced), memory pass
    assert len(out) == 8 << 20 and seconds >= 0 and 8 <= peak < 16
    calls.clear()
    mmd.measure(fn, warmup=lambda: calls.append("warm-up"))
    assert calls == ["warm-up", False, True]


def _round(step_s: float, peak: float) -> dict:
    return {"step_s": step_s, "peak_mib": peak}


def test_malora_bench_goal_of_a_missing_variant_is_not_met() -> None:
    malora = _bench("malora")
    ran = {"lora": [_round(1.0, 100.0)], "malora": [_round(1.02, 101.0), _round(1.01, 102.0)], "malora_align": []}
    summary = malora.summarize(ran)
    assert summary["missing"] == ["malora_align"]
    assert summary["goals_met"] == {"malora_time<=1.03": True, "malora_mem<=1.03": True,
                                    "malora_align_time<=1.05": False, "malora_align_mem<=1.05": False}
    del ran["malora_align"]
    assert not malora.summarize(ran)["goals_met"]["malora_align_time<=1.05"]
    slow = malora.summarize({**ran, "malora_align": [_round(1.2, 100.0)]})
    assert slow["missing"] == [] and slow["goals_met"] == {
        "malora_time<=1.03": True, "malora_mem<=1.03": True,
        "malora_align_time<=1.05": False, "malora_align_mem<=1.05": True}
