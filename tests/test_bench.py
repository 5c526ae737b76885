"""`python -m bench` runs end to end with tiny numbers and reports every documented figure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("extra", [[], ["--callbacks"]])
def test_a_tiny_benchmark_reports_every_figure_and_no_rate_limited_answer(
    extra: list[str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--rooms", "5", "--tasks", "20", "--cycles", "3",
         "--mean-duration", "120", "--json", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    assert result["callbacks"] is bool(extra)
    assert (result["callbacks_per_second"] > 0) is bool(extra)
    readme = (ROOT / "bench" / "README.md").read_text()
    documented = {key for cell in re.findall(r"^\| (`[^|]+) \|", readme, re.MULTILINE)
                  for key in re.findall(r"`([a-z0-9_]+)`", cell)}
    assert set(result) == documented
    assert result["rate_limited_answers"] == 0
    assert 0 < result["departed_max_in_a_second"] <= result["rate_limit"]
    assert result["cycles"] == 3 and result["rooms"] == 5
    assert result["scrapes"] > 0 and result["series"] > 0
    assert result["requests_per_cycle"] >= 1


def test_the_state_file_benchmark_prints_its_figures() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.store", "--rooms", "50"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(done.stdout)
    assert figures["rooms"] == 50 and figures["live_tasks"] == 250
    assert all(figures[key] > 0 for key in ("first_save_s", "unchanged_save_s",
                                            "callback_save_p50_s", "cycle_save_1pct_s",
                                            "busy_cycle_apply_s", "busy_cycle_save_s"))


def test_the_render_benchmark_prints_its_figures() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.render", "--rooms", "40", "--changes",
                           "3", "--renders", "4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    figures = json.loads(done.stdout)
    assert figures["rooms"] == 40 and figures["changes_per_render"] == 3
    assert figures["gzip_bytes"] < figures["text_bytes"]
    assert all(figures[key] > 0 for key in ("first_render_s", "render_after_changes_p50_s",
                                            "gzip_to_one_member", "peak_rss_mb"))


@pytest.mark.parametrize(("times", "busiest"), [
    ([], 0), ([3.0], 1), ([2.0, 1.0, 0.0], 1),  # a second apart: never in one window (t - 1, t]
    ([0.0, 0.5, 0.99, 1.0, 1.5], 3), ([0.0, 0.0, 0.999], 3)])
def test_the_busiest_sliding_second_counts_as_the_gateway_does(
        times: list[float], busiest: int) -> None:
    from bench.rig import _busiest_second

    assert _busiest_second(times) == busiest
