"""``run.py`` of several trees, interleaved on the same machine: each repetition runs every tree once
(in reverse order every other repetition), and the key figures of each run, then their median and
spread per tree, are printed. Comparing two commits this way keeps a machine whose load and disk
change from minute to minute from passing for a difference between them.

    .venv/bin/python tools/bench/interleave.py --only 1,3,6,7 --reps 3 \\
        before=/path/to/worktree,PY=/path/to/its/venv/bin/python after=/path/to/other/worktree

Each tree is ``name=path[,VAR=value...]``: its own ``tools/bench/run.py`` runs there with
``PYTHONPATH=path`` (so its daemon and clients are that tree's), by ``PY`` if given (a tree of
another package layout needs a virtual environment whose entry points are its own), else by this
interpreter; other ``VAR=value`` go to its environment. Results go to ``--out/<tag>-<name>-<rep>/``
and one JSON line per run to ``--out/runs-<tag>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def key_figures(results: dict) -> dict[str, float]:
    """The figures compared, from one results file."""
    out: dict[str, float] = {}
    for row in results["rows"]:
        name, metric = row["name"], row["metric"]
        if metric == 1 and name.startswith("FLUSH p50, one request carrying its marks"):
            out["m1 FLUSH+marks /floor"] = row["ratio"]
            out["m1 floor ms"] = row["floor"]
            out["m1 FLUSH+marks ms"] = row["value"]
        elif metric == 1 and name.startswith("MARK_REGION + FLUSH p50 (both"):
            out["m1 MARK+FLUSH /floor"] = row["ratio"]
        elif metric == 1 and name.startswith("IN_SYNC round trip p50, lean"):
            out["m1 no-disk rtt ms"] = row["value"]
            out["m1 no-disk rtt /floor"] = row["ratio"]
        elif metric == 3 and row["target"]:
            out[f"m3 {name.split()[0]} /echo"] = row["ratio"]
        elif metric == 6 and row["target"] and "aggregate" in name:
            out["m6 8 mirrors /one"] = row["ratio"]
        elif metric == 6 and name.startswith("daemon CPU per FLUSH"):
            out["m6 CPU us/FLUSH"] = row["value"]
        elif metric == 7 and name.startswith("daemon threads, most seen"):
            out["m7 threads"] = row["value"]
        elif metric == 7 and name.startswith("daemon open descriptors, most seen"):
            out["m7 descriptors"] = row["value"]
        elif metric == 7 and name.startswith("kill -9 + restart until all") and "reconnecting" in name:
            out["m7 restart, all reconnected s"] = row["value"]
            out["m7 empty start s"] = row["floor"]
        elif metric == 7 and name.startswith("kill -9 + restart until all"):
            out["m7 restart, FLUSH only s"] = row["value"]
    if "m1 FLUSH+marks /floor" in out and "m1 no-disk rtt /floor" in out:
        # What a FLUSH costs beyond one round trip that needs no disk, in floors: 1.0 is a
        # daemon whose FLUSH adds nothing to the sync but that round trip.
        out["m1 (FLUSH - rtt) /floor"] = out["m1 FLUSH+marks /floor"] - out["m1 no-disk rtt /floor"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="1", help="run.py's --only")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tag", default=time.strftime("%H%M%S"))
    p.add_argument("--out", type=Path, default=Path("/var/tmp/ulog-interleave"))
    p.add_argument("trees", nargs="+", metavar="name=path[,VAR=value...]")
    a = p.parse_args()
    trees: list[tuple[str, Path, dict[str, str]]] = []
    for spec in a.trees:
        name, rest = spec.split("=", 1)
        path, *pairs = rest.split(",")
        trees.append((name, Path(path), dict(x.split("=", 1) for x in pairs)))
    a.out.mkdir(parents=True, exist_ok=True)
    runs = a.out / f"runs-{a.tag}.jsonl"
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in trees}
    status = 0
    for rep in range(a.reps):
        for name, path, env in trees if rep % 2 == 0 else trees[::-1]:
            extra = dict(env)
            python = extra.pop("PY", sys.executable)
            out = a.out / f"{a.tag}-{name}-{rep}"
            load = os.getloadavg()[0]
            cmd = [python, "tools/bench/run.py", "--only", a.only, "--out", str(out)]
            proc = subprocess.run(cmd, cwd=path, env={**os.environ, "PYTHONPATH": str(path), **extra},
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{name} rep {rep} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", flush=True)
                status = 1
                continue
            figures = key_figures(json.loads(next(out.glob("results*.json")).read_text()))
            results[name].append(figures)
            with runs.open("a") as f:
                f.write(json.dumps({"tree": name, "rep": rep, "load": load, **figures}) + "\n")
            print(f"rep {rep} {name} load {load:.1f}: "
                  + "  ".join(f"{k.split(' ', 1)[1]}={v:.3g}" for k, v in figures.items()), flush=True)
    print("\nmedian [min-max] per tree")
    for key in sorted({k for rs in results.values() for r in rs for k in r}):
        cells = []
        for name, _, _ in trees:
            values = [r[key] for r in results[name] if key in r]
            if values:
                cells.append(f"{name} {statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]")
        print(f"  {key:34s} " + "   ".join(cells))
    return status


if __name__ == "__main__":
    sys.exit(main())
