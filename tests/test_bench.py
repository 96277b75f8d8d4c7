"""scripts/bench.py runs end to end on a small load and reports every figure it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .legacy_env import py3_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
BENCH = os.path.join(ROOT, "scripts", "bench.py")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bench_prints_figures_and_ratios_for_every_engine() -> None:
    proc = subprocess.run([sys.executable, BENCH, "--rounds", "2", "--requests", "300",
                           "--memory-requests", "12000"], cwd=ROOT, env=py3_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"ours", "floor", "transport", "ratios"}
    for name in ("ours", "floor", "transport"):
        for key in ("execute_w1_per_s", "execute_w64_per_s", "latency_w1_p50_us",
                    "latency_w1_p99_us"):
            assert result[name][key] > 0, (name, key)
    for name in ("ours", "floor"):  # both serve apply and echo the data back intact
        for key in ("apply_tiny_w64_per_s", "echo_1MB_MB_per_s", "echo_1MB_again_MB_per_s",
                    "echo_100MB_MB_per_s", "echo_100MB_again_MB_per_s"):
            assert result[name][key] > 0, (name, key)
        assert result[name]["echo_100MB_peak_rss_MB"] > 100  # the payload was in memory
    ours = result["ours"]
    assert 0 < ours["idle_rss_MB"] < ours["rss_after_12k_MB"]
    assert ours["rss_growth_MB"] == pytest.approx(
        ours["rss_after_12k_MB"] - ours["rss_after_10k_MB"], abs=0.15)
    assert set(result["ratios"]) == {"ours/floor", "ours/transport"}
    rounds = ours["rounds"]["execute_w1_per_s"]  # each round's figure beside the median
    assert len(rounds) == 2 and ours["execute_w1_per_s"] == pytest.approx(sum(rounds) / 2)
    assert result["ratios"]["ours/floor"]["echo_100MB_again_MB_per_s"] > 0
