"""Smoke tests of the benchmark suite (benchmarks/): it runs with tiny sizes and reports its structure.

No timing is asserted anywhere: the figures of the ``tiny`` profile mean nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

from benchmarks import run as bench_run
from benchmarks.common import Result, Target, interleave, render, round_orders
from benchmarks.method_cost import STATISTICS, per_flop, rwp_limit, rwp_name
from benchmarks.stats import point

TARGET_KEYS = {"name", "value", "op", "limit", "low", "high", "rounds", "verdict", "met", "note"}


def test_round_orders_alternate():
    assert round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def test_interleave_times_only_the_timed_rounds_in_alternating_order():
    calls: list[str] = []

    def cand(name):
        def call():
            calls.append(name)
            return len(calls)
        return call

    import torch

    samples = interleave({"a": cand("a"), "b": cand("b")}, rounds=2, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b"]  # warm-up, then reversed, then forward
    assert {k: len(v) for k, v in samples.seconds.items()} == {"a": 2, "b": 2}
    assert samples.returns == {"a": [4, 5], "b": [3, 6]}
    assert all(t >= 0 for v in samples.seconds.values() for t in v)


def test_targets_compare_as_stated():
    assert Target("x", 1.0, "<=", 1.0).met and not Target("x", 1.01, "<=", 1.0).met
    assert Target("x", 2.0, ">=", 2.0).met and not Target("x", 1.99, ">=", 2.0).met
    assert Target("x", 1.2, "<=", 1.25, low=1.1, high=1.3, rounds=5).verdict == "undecided"
    assert Target("x", 1.2, "<=", 1.25, low=1.1, high=1.24, rounds=5).verdict == "met"
    assert Target("x", 1.2, "<=", 1.0, rounds=1).verdict == "undecided"  # sampled once: no spread to go on
    with pytest.raises(ValueError, match="unknown comparison"):
        _ = Target("x", 1.0, "<", 2.0).met


def test_rwp_excess_allows_one_step_per_extra_iteration():
    # 7 K2 iterations: 6 beyond AWP's one step; RWP costs (10 - 4) / 1 = 6 steps more than AWP.
    rounds = {"at-rwp": [10.0, 20.0], "at-awp": [4.0, 8.0], "one-step": [1.0, 2.0]}  # a slower second round
    assert point(rounds, STATISTICS[rwp_name("at-rwp")]) == 6.0 and rwp_limit(7) == 6.0
    assert rwp_limit(1) == 0.0  # one iteration (stopped at once): RWP must not cost more than AWP


def test_time_statistics_over_their_flop_values():
    flops = {"cure": [11.0], "trades": [9.0], "at-rwp-all": [14.0], "at-awp": [5.0], "one-step": [1.0]}
    assert point(flops, STATISTICS["cure/trades"]) == pytest.approx(11 / 9)
    assert point(flops, STATISTICS[rwp_name("at-rwp-all")]) == 9.0
    times = {"cure": [2.2, 2.4], "trades": [2.0, 2.0]}  # per-round ratios 1.1, 1.2
    assert point(times, per_flop(STATISTICS["cure/trades"], 11 / 9)) == pytest.approx(1.15 / (11 / 9))


def test_parse_only_and_exit_code():
    assert bench_run.parse_only(None) == list(bench_run.BENCHMARKS)
    assert bench_run.parse_only(["memory,method_cost"]) == ["method_cost", "memory"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench_run.parse_only(["nope"])
    ok = Result("a", "a", targets=[Target("t", 1, "<=", 2)])
    missed = Result("b", "b", targets=[Target("t", 3, "<=", 2)])
    undecided = Result("u", "u", targets=[Target("t", 1.9, "<=", 2, low=1.8, high=2.1, rounds=5)])
    assert undecided.status == "undecided" and "UNDECIDED (the interval straddles the limit)" in render(undecided)
    assert bench_run.exit_code([ok, Result("s", "s", skipped="why")]) == 0
    assert bench_run.exit_code([ok, undecided]) == 0  # undecided does not fail the run; the summary lists it
    assert bench_run.exit_code([ok, missed, undecided]) == 1
    assert bench_run.exit_code([missed, Result("e", "e", error="boom")]) == 2


def _in_process_worker(module: str, args: dict, timeout: float = 900, env: dict | None = None) -> dict:
    """``run_worker`` without the subprocess (the JSON round trip kept): the suite stays fast."""
    workers = {"benchmarks.instruments": "cka_worker", "benchmarks.memory": "step_worker"}
    return json.loads(json.dumps(getattr(importlib.import_module(module), workers[module])(args)))


def test_worker_runs_in_a_fresh_process():
    from benchmarks.common import run_worker

    out = run_worker("benchmarks.memory", {"method": "trades", "width": 0.0625, "batch": 8, "pgd_steps": 1,
                                           "device": "cpu", "threads": 1})
    assert out["method"] == "trades" and out["step_peak_bytes"] > 0 and out["state_bytes"] >= 0
    assert out["peak_reset"] is (sys.platform == "linux")
    with pytest.raises(RuntimeError, match="worker benchmarks.memory failed"):
        run_worker("benchmarks.memory", {"method": "nope", "width": 0.0625, "batch": 8, "pgd_steps": 1,
                                         "device": "cpu", "threads": 1})


def test_tiny_run_reports_every_benchmark(tmp_path, capsys, monkeypatch):
    from benchmarks import instruments, memory

    monkeypatch.setattr(instruments, "run_worker", _in_process_worker)
    monkeypatch.setattr(memory, "run_worker", _in_process_worker)
    out = tmp_path / "tiny.json"
    names = ["method_cost", "overhead", "hardware", "instruments", "memory"]
    code = bench_run.main(["--profile", "tiny", "--only", ",".join(names), "--threads", "1", "--device", "cpu",
                           "--out", str(out), "--quiet"])
    report = json.loads(out.read_text())
    assert code == report["exit_code"] and code in (0, 1)  # 1 = a target missed: tiny sizes mean nothing
    assert report["profile"] == "tiny" and report["settings"]["batch"] == 8
    assert {"cpu", "cores", "torch", "threads"} <= set(report["machine"]) and report["machine"]["threads"] == 1
    by_name = {b["name"]: b for b in report["benchmarks"]}
    assert list(by_name) == names
    for b in by_name.values():
        assert b["status"] in ("ok", "missed", "undecided") and b["error"] is None, b
        assert b["targets"] and all(set(t) == TARGET_KEYS for t in b["targets"])
    candidates = [r["candidate"] for r in by_name["method_cost"]["table"]]
    assert candidates == ["st", "at", "trades", "mart", "at-awp", "at-rwp", "at-rwp-all", "cure", "one-step"]
    assert all(r["gflop"] > 0 for r in by_name["method_cost"]["table"])
    flop_targets = [t for t in by_name["method_cost"]["targets"] if "measured / FLOP ratio" in t["name"]]
    assert len(flop_targets) == 3 and all(t["limit"] == 1.05 for t in flop_targets)
    # one timed round in the tiny profile: no interval, so no sampled target is decided
    assert all(t["rounds"] == 1 and t["low"] is None and t["verdict"] == "undecided"
               for t in by_name["method_cost"]["targets"])
    rwp_all = by_name["method_cost"]["table"][candidates.index("at-rwp-all")]
    assert rwp_all["k2_steps_taken"] == 10  # c_min = inf: every example qualifies, all K2 steps are taken
    assert {r["candidate"] for r in by_name["overhead"]["table"]} == {"layerlab", "bare"}
    flops = by_name["hardware"]["table"][0]["gflop"]
    assert flops > 0 and by_name["hardware"]["table"][1]["gflop"] == flops
    assert by_name["hardware"]["figures"]["peak_gflop_s"] > 0
    # The workers ran in this process (their resident-set figures are not meaningful here, their live tensors are).
    cka = by_name["instruments"]["table"]
    assert [(r["memory"], r["n"]) for r in cka] == [(m, n) for m in ("tensors", "rss", "rss-fixed-mmap")
                                                    for n in (16, 80)]
    assert all(r["finite"] for r in cka) and all(r["peak_mib"] > 0 for r in cka if r["memory"] == "tensors")
    assert by_name["instruments"]["ratios"]["cka peak memory n=80/n=16 [tensors]"] == pytest.approx(1.0)
    mem = {r["candidate"]: r for r in by_name["memory"]["table"]}
    assert set(mem) == {"cure", "trades"} and all(r["step_peak_live_tensors_mib"] > 0 for r in mem.values())
    text = capsys.readouterr().out
    assert "summary:" in text and "target cure/trades step peak" in text


def test_data_path_skips_without_data(monkeypatch):
    import torch

    from benchmarks import data_path
    from benchmarks.common import PROFILES, Context

    monkeypatch.delenv("LAYERLAB_DATA", raising=False)
    result = data_path.run(Context(PROFILES["tiny"], torch.device("cpu"), 1), log=lambda m: None)
    assert result.status == "skipped" and "LAYERLAB_DATA" in result.skipped
    assert "skipped" in render(result)


@pytest.mark.cifar
@pytest.mark.skipif(not os.environ.get("LAYERLAB_DATA"), reason="needs LAYERLAB_DATA (real CIFAR-10)")
def test_data_path_tiny_on_cifar():
    import torch

    from benchmarks import data_path
    from benchmarks.common import PROFILES, Context

    result = data_path.run(Context(PROFILES["tiny"], torch.device("cpu"), 1), log=lambda m: None)
    assert result.status in ("ok", "missed", "undecided"), result.skipped  # tiny: one round, no interval
    rows = {r["candidate"]: r for r in result.table}
    assert rows["layerlab"]["images"] == rows["torchvision"]["images"] == 2 * 16
    assert result.figures["train_images"] == 50000


def test_gallery_cost_times_every_phase_of_one_epoch_per_method():
    import torch

    from benchmarks import gallery_cost
    from benchmarks.common import PROFILES, Context

    result = gallery_cost.run(Context(PROFILES["tiny"], torch.device("cpu"), 1), log=lambda m: None)
    assert result.status == "ok", result.error
    assert [r["method"] for r in result.table] == list(gallery_cost.METHODS)
    for row in result.table:
        assert all(row[p] > 0 for p in gallery_cost.PHASES[:-1])
        assert sum(row[p] for p in gallery_cost.PHASES) == pytest.approx(row["total_s"])
        assert sum(row[f"{p[:-2]}_share"] for p in gallery_cost.PHASES) == pytest.approx(1.0)
    assert result.figures["sizes"]["train_size"] == 60  # the tiny profile's 600 digits x 0.1


def test_gallery_cost_sums_the_recorded_runs(tmp_path):
    from benchmarks.gallery_cost import recorded
    from layerlab import runs

    records, manifests = tmp_path / "records", tmp_path / "figures"
    for name, method, final in (("AT", "at", 5.0), ("U-23", "at", None), ("OTHER", "at", 1.0)):
        d = records / name
        runs.write_json(d / "summary.json", {"method": method, **({"final_eval_seconds": final} if final else {})})
        for epoch, (train_s, eval_s) in enumerate(((10.0, 1.0), (20.0, None), (12.0, 2.0)), 1):
            runs.append_jsonl(d / "metrics.jsonl", {"epoch": epoch, "seconds": train_s, **(
                {"natural_acc": 1.0, "eval_seconds": eval_s} if eval_s else {})})
        runs.append_jsonl(d / "costs.jsonl", {"what": "cka", "seconds": 3.0})
    (records / "analysis").mkdir()
    runs.append_jsonl(records / "analysis" / "costs.jsonl", {"what": "minpert", "seconds": 7.0})
    runs.write_json(manifests / "01_a" / "manifest.json", {"runs": [{"run": "AT"}, {"run": "U-23"}]})
    rec = recorded(records, manifests)  # OTHER is no gallery run: left out
    assert rec["runs"] == 2 and rec["final_eval_untimed"] == ["U-23"]
    hours = {r["phase"]: r["hours"] * 3600 for r in rec["phases"]}
    assert hours == pytest.approx({"training steps": 84.0, "per-epoch evaluation": 6.0, "final evaluation": 5.0,
                                   "analysis cka": 6.0, "analysis minpert": 7.0})
    assert sum(r["share"] for r in rec["phases"]) == pytest.approx(1.0)
    (at,) = rec["methods"]
    assert at["run"] == "AT" and at["train_s_per_epoch"] == pytest.approx(14.0)
    assert at["epoch_eval_s_per_epoch"] == pytest.approx(1.5)  # over the 2 evaluated epochs
    assert {r["analysis"]: (r["runs"], r["per_run_s"], r["shared_s"]) for r in rec["analyses"]} == {
        "cka": (2, 3.0, None), "minpert": (0, None, 7.0)}
