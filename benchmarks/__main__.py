"""``python -m benchmarks [--quick] [--only NAME…] [--setup-only]``: run every benchmark.

Owns discovery and the run: every ``benchmarks/bench_<name>.py`` defining ``run(ctx) ->
list[Figure]`` is a benchmark named ``<name>``, run in name order with one shared ``Ctx``
(series built first if missing). A benchmark that crashes is reported as "not measured
(crashed: …)" and the others still run. Results go to ``BENCHMARKS.md`` at the repo root (or
``--output``), charts to ``benchmarks/charts/``, raw numbers to ``<cache>/results.json``.
``--setup-only`` builds (or checks) the series and measures nothing. A series that cannot be
built is one line on stderr and exit 1, before anything is measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .context import Ctx
from .measure import Figure
from .report import ROOT, write
from .series import DEFAULT_CACHE, SetupError

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """``bench_<name>.py`` files defining ``def run(`` (standalone-only scripts are skipped)."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py")
                  if "\ndef run(" in p.read_text())


def _run_all(ctx: Ctx, names: list[str]) -> list[Figure]:
    figs: list[Figure] = []
    for name in names:
        ctx.log(f"== {name}")
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            got = mod.run(ctx)
        except Exception as e:
            traceback.print_exc()
            got = [Figure.missing(f"{name}: every figure", None,
                                  f"benchmark crashed: {type(e).__name__}: {e}", group=name)]
        for f in got:
            ctx.log(f"   {f.name}: {f.status}" + (f" ({f.ratio:.2f}×)" if f.ratio else ""))
        figs += got
    return figs


def main(argv: list[str] | None = None) -> int:
    names = discover()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 versions, fewer repetitions (< 5 min once the data is cached)")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=names,
                    help=f"run only these ({', '.join(names)})")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="data dir (%(default)s)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--setup-only", action="store_true",
                    help="build (or check) the series in the cache, measure nothing")
    a = ap.parse_args(argv)
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    ctx = Ctx(quick=a.quick, cache=a.cache)
    ctx.log(f"series in {a.cache} ({'quick' if a.quick else 'full'})")
    ctx.cleanup()                          # scratch left by earlier runs that died
    try:
        series = ctx.series
    except (SetupError, subprocess.CalledProcessError) as e:
        print(f"benchmarks: error: series set-up failed: {e}", file=sys.stderr)
        return 1
    if a.setup_only:
        ctx.log(f"series ready: {len(series.versions)} versions, registry "
                f"{series.registry}/registry.json")
        return 0
    try:
        figs = _run_all(ctx, a.only or names)
    finally:
        ctx.cleanup()
    cmd = " ".join(["python -m benchmarks",
                    *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    write(a.output, figs, ctx.data, series, cmd, started, time.monotonic() - t0, load_start)
    raw = {"command": cmd, "started": started.isoformat(), "data": ctx.data,
           "figures": [{"name": f.name, "group": f.group, "unit": f.unit, "ratio": f.ratio,
                        "target": f.target, "status": f.status,
                        "jbl": list(f.jbl.samples) if f.jbl else None,
                        "baseline": list(f.baseline.samples) if f.baseline else None}
                       for f in figs]}
    (a.cache / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    ctx.log(f"wrote {a.output} and {a.cache / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
