"""Store figures (issue 2): install time vs ``tar -xzf``, disk per version count, dedup.

Owns, each measured against its baseline in the same run:
- install of a new runtime vs ``tar -xzf`` of the same tarball into a fresh dir (target ≤ 1.25×),
  and of a second version sharing most files with one already stored vs ``tar -xzf`` of that
  second tarball (≤ 1.0×). The tarballs sit in a local registry and in the page cache
  (download excluded). jbl's fsyncs count; tar's writeback does not (the design's baseline).
  ``gzip -dc`` alone is reported beside ``tar -xzf`` as a reference.
- disk after installing 1..N versions (``du`` of the store dir: blobs + index) vs the same
  versions extracted side by side (``du``, allocated) and vs keeping their ``.tar.gz``
  (≤ 0.25× of side by side at 3 versions, less than the tarballs); ``jbl store df --json`` as
  jbl reports it.
- the cold pass (``jbl store gc --recompress --min-age 0s``, level 19) on a store of the first
  3 versions: disk after it vs side by side (≤ 0.22×) and vs before it, how long it takes
  (vs installing those versions), and what it does to cold reads through the mount (cold
  ``import numpy, pandas`` and a cold read of every file of the first version, after
  ``drop_caches``, alternating between mounts of the store after the pass and of a copy made
  before it).
- the reference simulation (whole-file sha256 + zstd-3 per object, ``dedupsim``).
Chart data: ``ctx.data["disk"]``, ``ctx.data["recompress"]``.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import native
from .context import Ctx
from .dedupsim import cached_simulation
from .jblcli import Jbl, NotAvailable
from .measure import Figure, Stat, drop_caches, du_bytes, interleave
from .series import Version


def _rounds(ctx: Ctx, jbl: Jbl, vs: list[Version], reg: str, scratch: Path) -> list[Figure]:
    """Each round: an empty store, v1 installed (timed: new), v2 (timed: shared), ``du`` after
    each; ``tar -xzf`` of v1 and of v2 and ``gzip -dc`` of v1; jbl first on even rounds.
    After the last round the same store takes the remaining versions for the disk figure."""
    n = ctx.reps(3, 5)
    v1, v2 = vs[0], vs[1]
    for v in vs:                             # download excluded: the tarballs are local and warm
        native.read_all(v.tarball)
    tar1, tar2 = native.tar_x_step(v1.tarball, scratch), native.tar_x_step(v2.tarball, scratch)
    gz = native.gunzip_step(v1.tarball)
    t: dict[str, list[float]] = {k: [] for k in ("new", "shared", "tar1", "tar2", "gz")}
    ours: list[int] = []
    reason = None

    def jbl_side() -> None:
        nonlocal reason, ours
        if reason:
            return
        try:
            jbl.reset()
            t["new"].append(jbl.add(v1.spec, v1.tarball, reg))
            ours = [du_bytes(jbl.store)[1]]
            os.sync()
            t["shared"].append(jbl.add(v2.spec, v2.tarball, reg))
            ours.append(du_bytes(jbl.store)[1])
        except NotAvailable as e:
            reason = str(e)

    def base_side() -> None:
        t["tar1"].append(tar1())
        t["tar2"].append(tar2())
        t["gz"].append(gz())

    for i in range(n):
        ctx.log(f"store: round {i + 1}/{n}: install {v1.version}, {v2.version} vs tar -xzf")
        for side in ((jbl_side, base_side) if i % 2 == 0 else (base_side, jbl_side)):
            side()
    shutil.rmtree(scratch / "tar-x", ignore_errors=True)
    for k, v in enumerate(vs[2:], 3):
        if reason is None:
            try:
                ctx.log(f"store: disk: install {v.spec} ({k}/{len(vs)})")
                jbl.add(v.spec, v.tarball, reg)
                ours.append(du_bytes(jbl.store)[1])
            except NotAvailable as e:
                reason = str(e)
    df: dict[str, object] = {}
    if reason is None:
        try:
            df = jbl.df()
        except NotAvailable as e:
            df = {"error": str(e)}
    st = {k: Stat.of(x) for k, x in t.items() if x}
    figs = _install_figs(jbl, vs, st, reason)
    if figs[0].status == "MISSED":
        ctx.log("store: profiling the missed install once (cProfile)")
        jbl.reset()
        words = ("store", "install", v1.spec, "--registry", reg) if jbl.via == "store install" \
            else ("store", "import", v1.tarball)
        figs[0].profile = ("cProfile of one run, main thread only (time in worker threads "
                           "shows as lock waits):\n" + jbl.profile(*words))
    return figs + _disk_figs(ctx, vs, ours, reason, df)


def _install_figs(jbl: Jbl, vs: list[Version], st: dict[str, Stat],
                  reason: str | None) -> list[Figure]:
    v1, v2 = vs[0], vs[1]
    via = f" (via {jbl.via})" if jbl.via != "store install" else ""
    name1 = f"install {v1.spec}, new runtime{via}"
    name2 = f"install {v2.spec} after {v1.version} (shares most files){via}"
    kw: dict[str, Any] = {"group": "store", "baseline_label": "tar -xzf"}
    ref = Figure("gzip -dc alone vs tar -xzf (same tarball)", st["gz"], st["tar1"],
                 group="reference", baseline_label="tar -xzf")
    if reason or "shared" not in st:
        why = reason or "no jbl sample"
        return [Figure.missing(name1, st["tar1"], why, target="<=1.25", **kw),
                Figure.missing(name2, st["tar2"], why, target="<=1.0", **kw), ref]
    return [Figure(name1, st["new"], st["tar1"], target="<=1.25", **kw),
            Figure(name2, st["shared"], st["tar2"], target="<=1.0", **kw), ref]


def _disk_figs(ctx: Ctx, vs: list[Version], ours: list[int], reason: str | None,
               df: dict[str, object]) -> list[Figure]:
    side = [du_bytes(*[x.extracted for x in vs[:k]])[1] for k in range(1, len(vs) + 1)]
    tars = [sum(x.tar_size for x in vs[:k]) for k in range(1, len(vs) + 1)]
    ctx.data["disk"] = {"versions": list(range(1, len(vs) + 1)), "side_by_side": side,
                        "tarballs": tars, "jbl": ours, "df": df}
    figs = []
    for k in sorted({3, len(vs)}):
        base, tgz = Stat.of([side[k - 1]]), Stat.of([tars[k - 1]])
        kw: dict[str, Any] = {"unit": "B", "group": "store"}
        t_side, t_tgz = ("<=0.25", "<=1.0") if k == 3 else (None, None)
        n_side = f"disk, {k} versions: jbl store vs extracted side by side"
        n_tgz = f"disk, {k} versions: jbl store vs keeping the .tar.gz"
        if len(ours) >= k:
            mine = Stat.of([ours[k - 1]])
            figs += [Figure(n_side, mine, base, target=t_side, baseline_label="du", **kw),
                     Figure(n_tgz, mine, tgz, target=t_tgz, baseline_label="tar.gz", **kw)]
        else:
            why = reason or "not installed"
            figs += [Figure.missing(n_side, base, why, target=t_side, baseline_label="du", **kw),
                     Figure.missing(n_tgz, tgz, why, target=t_tgz, baseline_label="tar.gz",
                                    **kw)]
        figs.append(Figure(f"{k} .tar.gz kept vs extracted side by side", tgz, base,
                           unit="B", group="reference", baseline_label="du"))
    return figs


def _simulation(ctx: Ctx, vs: list[Version]) -> list[Figure]:
    three = vs[:3]
    ctx.log("simulation: whole-file sha256 + zstd-3 over 3 versions (cached)")
    r = cached_simulation(Path(ctx.series.cache), [v.version for v in three],
                          [Path(v.extracted) for v in three])
    ctx.data["dedupsim"] = r
    if isinstance(ctx.data.get("disk"), dict):
        ctx.data["disk"]["sim3"] = r["stored_alloc"]  # type: ignore[index]
    return [Figure("simulated whole-file sha256 + zstd-3 per object, 3 versions, vs side by side",
                   Stat.of([r["stored_alloc"]]), Stat.of([r["side_by_side_alloc"]]), unit="B",
                   group="reference", baseline_label="du")]


def _read_every_file(root: Path) -> float:
    drop_caches()
    t0 = time.perf_counter()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                native.read_all(path)
    return time.perf_counter() - t0


def _cold_reads(ctx: Ctx, before: Jbl, after: Jbl, v: Version,
                scratch: Path) -> dict[str, Stat]:
    """Cold ``import numpy, pandas`` (chroot) and a cold read of every file of ``v``, each
    after ``drop_caches``, through mounts of the store before and after the pass, alternating."""
    with before.mounted(scratch / "mp-before") as mp0, after.mounted(scratch / "mp-after") as mp1:
        iso = {k: mp / v.name / v.version / "isolated"
               for k, mp in (("before", mp0), ("after", mp1))}
        steps = {f"{what} {k}": (native.import_step(p, cold=True) if what == "import" else
                                 functools.partial(_read_every_file, p))
                 for k, p in iso.items() for what in ("import", "read")}
        return interleave(steps, ctx.reps(3, 5))


def _recompress(ctx: Ctx, vs: list[Version], reg: str, scratch: Path) -> list[Figure]:
    """The cold pass on a store of the first 3 versions (a copy kept as it was before, for
    the cold reads): disk, time, cold-read impact."""
    three = vs[:3]
    jbl, before = Jbl(scratch / "store3"), Jbl(scratch / "store3-before")
    name = "disk, 3 versions after `jbl store gc --recompress`: jbl store vs side by side"
    side = Stat.of([du_bytes(*[x.extracted for x in three])[1]])
    kw: dict[str, Any] = {"group": "store"}
    try:
        jbl.reset()
        installs = [jbl.add(v.spec, v.tarball, reg) for v in three]
        size0 = du_bytes(jbl.store)[1]
        shutil.copytree(jbl.store, before.store, symlinks=True)
        ctx.log("store: gc --recompress of 3 versions (zstd level 19; minutes on 2 cores)")
        took = jbl.timed("store", "gc", "--recompress", "--min-age", "0s", "--max-time", "2h")
        size1 = du_bytes(jbl.store)[1]
        ctx.log("store: cold reads through mounts of the store before and after the pass")
        cold = _cold_reads(ctx, before, jbl, three[0], scratch)
    except NotAvailable as e:
        return [Figure.missing(name, side, str(e), target="<=0.22", unit="B",
                               baseline_label="du", **kw)]
    ctx.data["recompress"] = {"before": size0, "after": size1, "seconds": took,
                              "side_by_side": side.median}
    ref: dict[str, Any] = {"group": "reference", "baseline_label": "before"}
    return [
        Figure(name, Stat.of([size1]), side, target="<=0.22", unit="B", baseline_label="du",
               **kw),
        Figure("disk, 3 versions: after `gc --recompress` vs before", Stat.of([size1]),
               Stat.of([size0]), unit="B", **ref),
        Figure("`gc --recompress` of 3 versions vs installing them", Stat.of([took]),
               Stat.of([sum(installs)]), group="reference", baseline_label="3 installs"),
        Figure(f"cold `{native.IMPORT_CODE}` through the mount, after `gc --recompress` vs "
               "before", cold["import after"], cold["import before"], **ref),
        Figure(f"cold read of every file of {three[0].spec} through the mount, after "
               "`gc --recompress` vs before", cold["read after"], cold["read before"], **ref),
    ]


def run(ctx: Ctx) -> list[Figure]:
    s = ctx.series
    scratch = ctx.scratch("store")
    jbl = Jbl(scratch / "store")
    try:
        figs = _rounds(ctx, jbl, s.versions, s.registry, scratch)
        shutil.rmtree(jbl.store, ignore_errors=True)  # disk for the next store
        figs += _recompress(ctx, s.versions, s.registry, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figs + _simulation(ctx, s.versions)
