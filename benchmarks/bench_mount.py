"""Mount figures (issue 3): the FUSE view of a version vs the same tarball extracted natively.

Owns, each as jbl / native in the same run (steps interleaved round by round):
- warm ``chroot MP/NAME/VERSION/isolated python3 -c "import numpy, pandas"`` vs chroot of the
  tar-extracted tree (target ≤ 1.1×); the same cold, caches dropped before every run (≤ 1.5×);
- ``find -printf`` with a stat of every entry of the whole runtime, warm (≤ 1.5×);
- cold sequential read throughput of the runtime's largest file (≥ 0.5×);
- the cold import and the cold read again, each run through a freshly started daemon
  (reference lines: above, the daemon's own chunk cache survives the drop_caches);
- the mount daemon's peak resident memory over all of the above (reference).
The run's shared store (``ctx.installed_store``) holds the first version, installed untimed;
if that or ``jbl mount`` fails, the native side is still measured and jbl's is "not measured".
Chart data: ``ctx.data["import"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import native, profiles
from .context import Ctx
from .jblcli import Jbl, NotAvailable
from .measure import Figure, PeakRSS, Stat, Step, interleave, repeat

TARGETS = {"warm": "<=1.1", "cold": "<=1.5", "find": "<=1.5", "read": ">=0.5"}


def _names(spec: str, big: str) -> dict[str, str]:
    return {"warm": f"warm import numpy, pandas ({spec}, chroot)",
            "cold": f"cold import numpy, pandas ({spec}, chroot, caches dropped)",
            "find": "find + stat of the whole runtime, warm",
            "read": f"cold sequential read of {big}"}


def _native_only(ctx: Ctx, iso: Path, big: Path) -> dict[str, Stat]:
    return {"warm": repeat(native.import_step(iso), ctx.reps(5, 10), warmup=1),
            "cold": repeat(native.import_step(iso, cold=True), ctx.reps(3, 5)),
            "find": repeat(native.find_step(iso), ctx.reps(5, 7), warmup=1),
            "read": repeat(native.cold_read_step(big), ctx.reps(3, 5))}


def _both(ctx: Ctx, iso: Path, big: Path, jiso: Path, jbig: Path) -> dict[str, Stat]:
    out: dict[str, Stat] = {}
    pairs = {"warm": (native.import_step(iso), native.import_step(jiso), ctx.reps(5, 10), 2),
             "cold": (native.import_step(iso, cold=True), native.import_step(jiso, cold=True),
                      ctx.reps(3, 5), 0),
             "find": (native.find_step(iso), native.find_step(jiso), ctx.reps(5, 7), 1),
             "read": (native.cold_read_step(big), native.cold_read_step(jbig), ctx.reps(3, 5), 0)}
    for key, (nat, mine, n, warm) in pairs.items():
        ctx.log(f"mount: {key}, {n} rounds")
        r = interleave({"native": nat, "jbl": mine}, n, warmup=warm)
        out[key], out["jbl-" + key] = r["native"], r["jbl"]
    return out


def _profile_missed(ctx: Ctx, pid: int, stats: dict[str, Stat], jiso: Path) -> dict[str, str]:
    """py-spy of the daemon while the jbl side of each missed warm figure runs 3 more times."""
    out = {}
    for key, step in (("warm", native.import_step(jiso)), ("find", native.find_step(jiso))):
        probe = Figure("", stats["jbl-" + key], stats[key], target=TARGETS[key])
        if probe.status == "MISSED":
            ctx.log(f"mount: profiling the daemon during {key} (py-spy)")
            def work(s: Step = step) -> None:
                for _ in range(3):
                    s()
            out[key] = "py-spy of the mount daemon during 3 runs:\n" + profiles.pyspy_during(
                pid, work)
    return out


def _fresh(ctx: Ctx, jbl: Jbl, jiso_of: Callable[[Path], Path], iso: Path, big: Path,
           mp: Path) -> dict[str, Stat]:
    """Cold import and cold read, jbl's side each through a daemon started for that run only
    (so nothing is cached in it either), native's interleaved with it."""
    xs: dict[str, list[float]] = {k: [] for k in ("cold", "jbl-cold", "read", "jbl-read")}
    for i in range(ctx.reps(3, 5)):
        for key, nat in (("cold", native.import_step(iso, cold=True)),
                         ("read", native.cold_read_step(big))):
            def mine(key: str = key) -> float:
                with jbl.mounted(mp):
                    jiso = jiso_of(mp)
                    step = (native.import_step(jiso, cold=True) if key == "cold" else
                            native.cold_read_step(jiso / big.relative_to(iso)))
                    return step()
            for k, step in ((key, nat), ("jbl-" + key, mine))[::1 if i % 2 else -1]:
                xs[k].append(step())
    return {k: Stat.of(v) for k, v in xs.items()}


def run(ctx: Ctx) -> list[Figure]:
    v = ctx.series.versions[0]
    iso = Path(v.extracted) / "isolated"
    if not iso.is_dir():                               # the tarball's single top dir
        iso = next(Path(v.extracted).glob("*/isolated"))
    big = native.largest_file(iso)
    names = _names(v.spec, f"{big.name} ({big.stat().st_size / 1e6:.0f} MB)")
    scratch = ctx.scratch("mount")
    mp = scratch / "mp"
    figs: list[Figure] = []
    reason = None
    stats: dict[str, Stat] = {}
    prof: dict[str, str] = {}
    fresh: dict[str, Stat] = {}
    peak = None

    def jiso_of(m: Path) -> Path:
        return m / v.name / v.version / "isolated"
    try:
        jbl = ctx.installed_store(1)
        with jbl.mounted(mp):
            jiso = jiso_of(mp)
            if not jiso.is_dir():
                raise NotAvailable(f"{jiso.relative_to(mp)} missing in the mount")
            pid = jbl.daemon_pid(mp)
            jbig = jiso / big.relative_to(iso)
            if pid is None:
                stats = _both(ctx, iso, big, jiso, jbig)
            else:
                with PeakRSS(pid) as m:
                    stats = _both(ctx, iso, big, jiso, jbig)
                peak = m.peak
                prof = _profile_missed(ctx, pid, stats, jiso)
        ctx.log("mount: cold import and read through a fresh daemon each run")
        fresh = _fresh(ctx, jbl, jiso_of, iso, big, scratch / "mp-fresh")
    except NotAvailable as e:
        reason = str(e)
    if reason:
        ctx.log(f"mount: jbl side not measured ({reason}); native only")
        stats = _native_only(ctx, iso, big)
    units = {"warm": "s", "cold": "s", "find": "s", "read": "MB/s"}
    for key in ("warm", "cold", "find", "read"):
        kw: dict[str, Any] = {"target": TARGETS[key], "unit": units[key], "group": "mount",
                              "baseline_label": "native"}
        if reason:
            figs.append(Figure.missing(names[key], stats[key], reason, **kw))
        else:
            figs.append(Figure(names[key], stats["jbl-" + key], stats[key],
                               profile=prof.get(key, ""), **kw))
    for key, what in (("cold", names["cold"]), ("read", names["read"])):
        if fresh:
            figs.append(Figure(f"{what}, a freshly started daemon each run",
                               fresh["jbl-" + key], fresh[key], unit=units[key],
                               group="mount", baseline_label="native"))
    if peak is not None:
        figs.append(Figure("mount daemon peak RSS (1 version, during the figures above)",
                           Stat.of([peak]), None, unit="B", group="reference"))
    ctx.data["import"] = {k: (stats[k].median, stats["jbl-" + k].median if not reason else None)
                          for k in ("warm", "cold")}
    return figs
