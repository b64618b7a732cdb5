"""Markdown tables from a results file of ``run.py`` (for docs/benchmarks.md).

    .venv/bin/python tools/bench/report.py docs/benchmarks/results.json
    .venv/bin/python tools/bench/report.py docs/benchmarks/results.json --plot PNG   # redraw metric 2's plot
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TITLES = {
    1: "1. Durable FLUSH round trip (1 M regions, one region marked per flush)",
    2: "2. Scale: FLUSH p50 against region count",
    3: "3. Non-durable request rate",
    4: "4. Restart cost (kill -9, then the kernel's state is gone)",
    5: "5. Resume and memory",
    6: "6. Many mirrors",
    7: "7. Live mirrors on one daemon (soft limit of 1024 descriptors)",
}


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def table(rows: list[dict]) -> str:
    out = ["| measurement | value | floor | ratio | target | |", "|---|---:|---|---:|---|---|"]
    for r in rows:
        verdict = {True: "**met**", False: "**missed**", None: "info"}[r["met"]]
        floor = f"{fmt(r['floor'])} {r['unit']} ({r['floor_name']})" if r["floor"] is not None else "–"
        name = r["name"] + (f" — {r['note']}" if r["note"] else "")
        out.append(f"| {name} | {fmt(r['value'])} {r['unit']} | {floor} | {fmt(r['ratio'])}× | "
                   f"{r['target'] or '–'} | {verdict} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--plot", type=Path, metavar="PNG", help="also redraw the plot of metric 2 into PNG")
    args = p.parse_args()
    res = json.loads(args.results.read_text())
    if args.plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run import plot_scale  # noqa: PLC0415

        plot_scale(args.plot, res["detail"]["scale"])
    print(f"Command: `{res['command']}`  \nDate: {res['date']}  \n"
          f"Load average before: {res['load_before']} ({res.get('busy_before', '?')}); after: "
          f"{res['load_after']}; by metric: {res['load_by_metric']}\n")
    for metric in sorted({r["metric"] for r in res["rows"]}):
        print(f"### {TITLES.get(metric, metric)}\n")
        print(table([r for r in res["rows"] if r["metric"] == metric]))
        print()


if __name__ == "__main__":
    main()
