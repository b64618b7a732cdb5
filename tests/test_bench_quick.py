"""The benchmark suite keeps running: ``tools/bench/run.py --quick`` completes and reports every metric.

No timing is asserted: the figures depend on the machine and its load. Only that each of the seven
metrics printed at least one line with a ratio, that the results file and the plot were written,
and that every row that has a target says MET or MISSED.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "tools" / "bench" / "plot.py"
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
    assert png_size(out / "flush-vs-regions-quick.png") == load_plot().SIZE_PX
    # Nothing of the run is left behind in the work directory's parent but the output.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ulog-bench-")]


def test_live_mirrors_metric_reports_its_rows_at_a_tiny_size(tmp_path: Path) -> None:
    """Metric 7 alone with 3 mirrors (a couple of seconds): its six rows, each with a ratio and a
    verdict, whatever the verdicts are (today's daemon misses some of them)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench" / "run.py"), "--quick", "--only", "7",
         "--live-mirrors", "3", "--out", str(out), "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [m for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in rows] == [7] * 6, proc.stdout
    assert all(m.group(3) in ("MET", "MISSED") for m in rows), proc.stdout
    results = json.loads((out / "results-quick.json").read_text())
    assert results["config"]["live_mirrors"] == 3
    names = [row["name"] for row in results["rows"]]
    assert len(names) == 6 and all(row["metric"] == 7 for row in results["rows"])
    assert any("working" in name for name in names) and any("restart" in name for name in names)
    live = results["detail"]["live"]
    # Behaviour, not speed: 3 mirrors fit any daemon started with 1024 descriptors.
    assert live["working"] == 3 and live["restart"]["answered"] == 3, live
    assert live["reconnect"]["answered"] == 3, live["reconnect"]
    assert [p["mirrors"] for p in live["points"]] == [0, 1, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ulog-bench-")]


# --- the plot (tools/bench/plot.py, matplotlib from the bench extra) --------------------------------


def load_plot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_plot", PLOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, after checking the signature and that it is the first chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def synthetic_results(mode: str = "full") -> dict[str, object]:
    """A results dict shaped like run.py's for metric 2 alone, with made-up latencies."""
    sizes = [32 << 10, 1 << 20, 32 << 20]
    rewrite = {size: 0.1 + size / (8 << 20) for size in sizes}  # grows with the bitmap, as measured

    def flat(ms: float) -> dict[str, float]:
        return {str(size): ms * (1 + i / 50) for i, size in enumerate(sizes)}

    return {
        "date": "2026-01-02T03:04:05+00:00", "mode": mode,
        "machine": {"nproc": "2", "state_dir_fs": "ext4 on / (/dev/vda)"},
        "config": {"scale_samples": 40},
        "detail": {"scale": {
            "sizes": sizes, "mark_flush_p50_ms": flat(0.45), "integrated_p50_ms": flat(0.33),
            "lean_flush_p50_ms": flat(0.2), "lean_integrated_p50_ms": flat(0.22),
            "bitmap_rewrite_p50_ms": {str(k): v for k, v in rewrite.items()},
            "bare_lmdb_p50_ms": flat(0.36), "floor_4k_p50_ms": 0.09,
        }},
    }


def test_scale_plot_is_a_png_of_the_expected_size_with_labelled_axes_and_the_floors(tmp_path: Path) -> None:
    plot = load_plot()
    results = synthetic_results()
    path = tmp_path / "scale.png"
    plot.write_scale_plot(path, results)
    assert png_size(path) == plot.SIZE_PX == (1000, 650)
    # Pillow comes with matplotlib: decoding every pixel proves the file is whole.
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        assert image.size == plot.SIZE_PX
        colors = image.getcolors(maxcolors=1 << 16)  # None: more colours than that
        assert colors is None or len(colors) > 20  # drawn, not blank

    fig = plot.scale_figure(results)
    [ax] = fig.axes
    assert "ms" in ax.get_ylabel() and "regions" in ax.get_xlabel()
    assert "2026-01-02 03:04 UTC" in ax.get_title() and "full run" in ax.get_title()
    assert "FLUSH" in fig.get_suptitle()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32K", "1M", "32M"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sum(label.startswith("floor: ") for label in labels) == 3, labels
    assert any(label.startswith("target at 32M") for label in labels), labels
    # Every figure drawn lies inside the axes, the 4 KiB floor (lowest) and the 32M rewrite (highest).
    scale = results["detail"]["scale"]  # type: ignore[index]
    low, high = ax.get_ylim()
    assert low < scale["floor_4k_p50_ms"] and high > max(scale["bitmap_rewrite_p50_ms"].values())


def test_scale_plot_of_a_quick_run_says_the_target_is_not_at_its_size(tmp_path: Path) -> None:
    plot = load_plot()
    results = synthetic_results("quick")
    scale = results["detail"]["scale"]  # type: ignore[index]
    scale["sizes"] = scale["sizes"][:2]  # --quick stops short of 32M
    fig = plot.scale_figure(results)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("rewrite at 1M (the target is set at 32M)" in label for label in labels), labels
    assert "quick run" in fig.axes[0].get_title()


def test_plot_tool_redraws_from_a_results_file_and_refuses_one_without_metric_2(tmp_path: Path) -> None:
    good = tmp_path / "results-quick.json"
    good.write_text(json.dumps(synthetic_results("quick")))
    proc = subprocess.run([sys.executable, str(PLOT), str(good)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "flush-vs-regions-quick.png") == load_plot().SIZE_PX

    bad = tmp_path / "results.json"
    without = synthetic_results()
    del without["detail"]["scale"]  # type: ignore[attr-defined]
    bad.write_text(json.dumps(without))
    for target, why in ((bad, "no metric 2"), (tmp_path / "missing.json", "cannot read")):
        proc = subprocess.run([sys.executable, str(PLOT), str(target)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1
        [line] = proc.stderr.splitlines()
        assert line.startswith("plot.py: ") and why in line, line
    assert not (tmp_path / "flush-vs-regions.png").exists()
