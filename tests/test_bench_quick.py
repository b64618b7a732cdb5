"""The benchmark suite keeps running: ``tools/bench/run.py --quick`` completes and reports every metric.

No timing is asserted: the figures depend on the machine and its load. Only that each of the seven
metrics printed at least one line with a ratio, that the results file and the plot were written,
and that every row that has a target says MET or MISSED.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\[(\d)\] .+\| ratio (\S+)x \|.* (MET|MISSED|INFO)(  \[.*\])?$")


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench" / "run.py"), "--quick", "--out", str(out),
         "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [m for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert {int(m.group(1)) for m in rows} == {1, 2, 3, 4, 5, 6, 7}, proc.stdout
    for m in rows:
        float(m.group(2))  # every row carries a numeric ratio
    results = json.loads((out / "results-quick.json").read_text())
    assert len(results["rows"]) == len(rows)
    for row in results["rows"]:
        assert row["ratio"] is not None
        assert (row["met"] is None) == (row["target"] == ""), row
    assert (out / "flush-vs-regions-quick.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Nothing of the run is left behind in the work directory's parent but the output.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ulog-bench-")]


def test_live_mirrors_metric_reports_its_rows_at_a_tiny_size(tmp_path: Path) -> None:
    """Metric 7 alone with 3 mirrors (a couple of seconds): its five rows, each with a ratio and a
    verdict, whatever the verdicts are (today's daemon misses some of them)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench" / "run.py"), "--quick", "--only", "7",
         "--live-mirrors", "3", "--out", str(out), "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [m for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in rows] == [7] * 5, proc.stdout
    assert all(m.group(3) in ("MET", "MISSED") for m in rows), proc.stdout
    results = json.loads((out / "results-quick.json").read_text())
    assert results["config"]["live_mirrors"] == 3
    names = [row["name"] for row in results["rows"]]
    assert len(names) == 5 and all(row["metric"] == 7 for row in results["rows"])
    assert any("working" in name for name in names) and any("restart" in name for name in names)
    live = results["detail"]["live"]
    # Behaviour, not speed: 3 mirrors fit any daemon started with 1024 descriptors.
    assert live["working"] == 3 and live["restart"]["answered"] == 3, live
    assert [p["mirrors"] for p in live["points"]] == [0, 1, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ulog-bench-")]
