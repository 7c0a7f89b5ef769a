"""Render stage benchmark: seconds per character and per view, and incremental vs full runs.

    .venv/bin/python benchmarks/bench_render.py [--resolutions 256 512] [--workers 2]

Renders the bundled samples (data/assets) and, where present, the shared CC0 assets (../shared/assets)
into a temporary folder with the params.yaml render settings, and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chibisplat.params import section  # noqa: E402
from chibisplat.render.stage import discover_assets, run_render_stage  # noqa: E402


def run(params: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    report = run_render_stage(params, log=lambda *_: None)
    return time.perf_counter() - t0, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    base = section("render", REPO / "params.yaml")
    groups = {"samples": discover_assets(REPO / "data" / "assets")}
    shared = REPO.parent / "shared" / "assets"
    if shared.is_dir():
        groups["shared assets"] = discover_assets(shared)
    print(f"# render benchmark: {os.cpu_count()} CPU cores, {args.workers} workers, {base['samples']} samples, Cycles CPU")
    print("| set | res | chars | full run (s) | s/char (worker) | s/view (worker) | chars/min | incremental run (s) | incremental/full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in args.resolutions:
        for name, assets in groups.items():
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                (tmp / "assets").mkdir()
                for a in assets:
                    shutil.copy(a, tmp / "assets" / a.name)
                params = {**base, "assets_dir": str(tmp / "assets"), "out_dir": str(tmp / "renders"),
                          "report": str(tmp / "report.json"), "resolution": res, "workers": args.workers}
                full, report = run(params)
                secs = [e["seconds"] for e in report["characters"] if e["status"] == "rendered"]
                # Incremental: change one asset's bytes (a copy of another file under that name).
                victim = tmp / "assets" / assets[0].name
                donor = next((a for a in assets[1:] if a.suffix == victim.suffix), None)
                if donor is not None:
                    shutil.copy(donor, victim)
                else:  # same bytes plus a change the importers ignore is format-specific: re-render by removal
                    shutil.rmtree(tmp / "renders" / report["characters"][0]["uid"])
                incr, incr_report = run(params)
                rendered = incr_report["counts"]["rendered"]
                med = statistics.median(secs) if secs else float("nan")
                print(f"| {name} | {res} | {len(secs)} | {full:.1f} | {med:.2f} | {med / 40:.3f} | {60 * len(secs) / full:.1f} "
                      f"| {incr:.1f} ({rendered} re-rendered) | {incr / full:.3f} |")


if __name__ == "__main__":
    main()
