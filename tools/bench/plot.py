"""The benchmark's figure: metric 2, FLUSH p50 against the log's region count, drawn from results.

    .venv/bin/python tools/bench/plot.py docs/benchmarks/results.json [-o PNG]

``run.py`` draws it at the end of a run; this redraws it from a results file without re-running
anything (default output: ``flush-vs-regions[-quick].png`` beside the results file). matplotlib
comes from the ``bench`` extra; the Agg backend draws without a display.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything else of matplotlib: CI and benchmark hosts have no display

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import human_count  # noqa: E402

PROG = "plot.py"
DPI = 100
#: Inches; at DPI this is the PNG's size in pixels (1000 x 650): wide enough for the legend's
#: two columns under the axes at 9 pt.
FIGSIZE = (10.0, 6.5)
SIZE_PX = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
#: FLUSH <= 0.25 x a whole-bitmap rewrite (what the kernel's disk log and cmirrord pay), judged at
#: 32 M regions, the largest size measured: where that rewrite costs the most.
TARGET_REGIONS = 32 << 20
TARGET_RATIO = 0.25


class PlotError(ValueError):
    """The results cannot be drawn (no metric 2 in them, or its figures are incomplete)."""


def _series(scale: Mapping[str, Any], key: str) -> dict[int, float]:
    # JSON turned the region counts into strings; a run's own dict has ints.
    return {int(k): float(v) for k, v in scale[key].items()}


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _subtitle(results: Mapping[str, Any]) -> str:
    parts = []
    date = results.get("date")
    if date:
        when = datetime.datetime.fromisoformat(str(date))
        parts.append(f"{results.get('mode', '')} run {when:%Y-%m-%d %H:%M} {when.tzname() or ''}".strip())
    machine = results.get("machine") or {}
    if machine.get("nproc"):
        parts.append(f"{machine['nproc']} CPUs")
    if machine.get("state_dir_fs"):
        parts.append(f"state directory on {machine['state_dir_fs']}")
    samples = (results.get("config") or {}).get("scale_samples")
    if samples:
        parts.append(f"{samples} samples per size, floors measured in the same run")
    return "; ".join(parts)


def scale_figure(results: Mapping[str, Any]) -> Figure:
    """The figure of metric 2 from a whole results dict (what run.py writes, or a loaded file)."""
    scale = (results.get("detail") or {}).get("scale")
    if not scale:
        raise PlotError("no metric 2 (scale) figures in it; run.py --only 2 measures them")
    try:
        sizes = sorted(int(x) for x in scale["sizes"])
        measured = [(label, _series(scale, key), marker) for label, key, marker in (
            ("FLUSH after its MARK_REGION, kernel model", "mark_flush_p50_ms", "o"),
            ("FLUSH carrying its marks (integrated_flush), kernel model", "integrated_p50_ms", "s"),
            ("FLUSH after its MARK_REGION, lean client", "lean_flush_p50_ms", "^"),
            ("FLUSH carrying its marks, lean client", "lean_integrated_p50_ms", "D"),
        ) if key in scale]  # older results files lack the lean-client series
        rewrite = _series(scale, "bitmap_rewrite_p50_ms")
        bare = _series(scale, "bare_lmdb_p50_ms")
        floor_4k = float(scale["floor_4k_p50_ms"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlotError(f"metric 2 figures are incomplete ({type(exc).__name__}: {exc})") from None
    if not sizes or any(size not in values for _, values, _ in measured for size in sizes):
        raise PlotError("metric 2 figures do not cover every region count in 'sizes'")
    big = sizes[-1]

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.suptitle("dm-ulogd: durable FLUSH round trip (p50) against the log's region count",
                 fontsize=13, fontweight="bold")
    ax.set_title(_subtitle(results), fontsize=9, color="0.3")

    for label, values, marker in measured:
        ax.plot(sizes, [values[s] for s in sizes], marker=marker, linewidth=2, markersize=6, label=label)
    # Floors: reference lines in greys, so the eye separates them from the daemon's own figures.
    ax.plot(sizes, [rewrite[s] for s in sizes], color="black", linestyle="--", marker="x", linewidth=1.5,
            label="floor: whole-bitmap rewrite + fdatasync (disk log, cmirrord)")
    for s in sizes:
        ax.annotate(f"{_bytes(s // 8)} bitmap", (s, rewrite[s]), textcoords="offset points", xytext=(6, -12),
                    fontsize=8, color="0.25", bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none"})
    ax.plot(sizes, [bare[s] for s in sizes], color="0.45", linestyle="-.", linewidth=1.5,
            label="floor: bare py-lmdb commit (meta + 1 chunk, no daemon)")
    ax.axhline(floor_4k, color="0.55", linestyle=":", linewidth=1.8,
               label="floor: 4 KiB pwrite + fdatasync")
    target = TARGET_RATIO * rewrite[big]
    label = (f"target at 32M: FLUSH ≤ {TARGET_RATIO:g} × rewrite" if big == TARGET_REGIONS
             else f"{TARGET_RATIO:g} × rewrite at {human_count(big)} (the target is set at 32M)")
    ax.plot([big], [target], linestyle="none", marker="v", markersize=11, color="crimson", label=label)

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: human_count(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(sizes[0] / 1.6, big * 2.2)  # room right of the last point for its bitmap size
    ax.set_xlabel("region count of the log (regions, log scale)")

    values = [v for _, series, _ in measured for v in series.values()]
    values += [*rewrite.values(), *bare.values(), floor_4k, target]
    ax.set_yscale("log")
    ax.set_ylim(min(values) / 1.5, max(values) * 1.5)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("latency p50 (ms, log scale)")
    ax.grid(True, which="major", color="0.9")
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    return fig


def write_scale_plot(path: Path, results: Mapping[str, Any]) -> None:
    fig = scale_figure(results)
    # No "Software" text chunk: a redraw with another matplotlib gives the same kind of file.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results[-quick].json written by run.py")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="the PNG to write (default: flush-vs-regions[-quick].png beside the results)")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{PROG}: cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"{PROG}: {args.results} is not JSON: {exc}", file=sys.stderr)
        return 1
    if not isinstance(results, dict):
        print(f"{PROG}: {args.results} is not a results file (not a JSON object)", file=sys.stderr)
        return 1
    suffix = "-quick" if results.get("mode") == "quick" else ""
    out = args.out or args.results.parent / f"flush-vs-regions{suffix}.png"
    try:
        write_scale_plot(out, results)
    except PlotError as exc:
        print(f"{PROG}: {args.results}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    print(f"plot written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
