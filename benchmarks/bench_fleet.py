"""Fleet figures (issue 16): the content-addressed registry form against tarballs.

Owns:
- the simulation over the real series (``fleetsim``): bytes an update fetches on a node holding
  the earlier versions, as a fraction of the version's tarball; requests for a cold install
  against the version's file count; what a 1,000-node rollout of the mostly shared version
  moves from the origin, content-addressed behind one cache vs tarballs (reference lines;
  the fleet table and chart from ``ctx.data["fleet"]``).
Chart data: ``ctx.data["fleet"]`` (``{"sim": …, "versions_table": …, "fleet_table": …}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import fleetsim
from .context import Ctx
from .measure import Figure, Stat


def _simulation(ctx: Ctx) -> list[Figure]:
    vs = ctx.series.versions
    ctx.log("fleet: simulation over the series (1 MiB chunks, zstd-1, packs; cached)")
    sim = fleetsim.cached_simulation(
        Path(ctx.series.cache), [(v.version, Path(v.extracted), v.tar_size) for v in vs],
        ctx.log)
    ctx.data["fleet"] = {"sim": sim, "versions_table": fleetsim.version_table(sim),
                         "fleet_table": fleetsim.fleet_table(sim)}
    rows: list[dict[str, Any]] = sim["versions"]  # type: ignore[assignment]
    kw: dict[str, Any] = {"group": "reference", "unit": "B"}
    figs = [Figure(f"simulated: fetch to update to {r['version']} on a node holding the "
                   "earlier versions vs its .tar.gz", Stat.of([r["update_bytes"]]),
                   Stat.of([r["tar"]]), baseline_label=".tar.gz", **kw) for r in rows[1:]]
    files = vs[0].files
    figs.append(Figure(f"simulated: requests for a cold install of {rows[0]['version']} vs "
                       "its files", Stat.of([rows[0]["cold_requests"]]), Stat.of([files]),
                       group="reference", unit="", baseline_label="files"))
    if len(rows) > 1:
        k = 1
        out = fleetsim.rollout(sim, k)
        name = f"simulated 1,000-node rollout of {rows[k]['version']}: origin bytes"
        figs += [Figure(f"{name}, content-addressed + one cache vs tarballs, no cache",
                        Stat.of([out["d"]]), Stat.of([out["a"]]),
                        baseline_label="tarballs", **kw),
                 Figure(f"{name}, content-addressed + one cache vs tarballs + one cache",
                        Stat.of([out["d"]]), Stat.of([out["b"]]),
                        baseline_label="tarballs + cache", **kw),
                 Figure(f"simulated 1,000-node rollout of {rows[k]['version']}: bytes the "
                        "nodes receive, content-addressed vs tarballs",
                        Stat.of([out["lan_d"]]), Stat.of([out["lan_b"]]),
                        baseline_label="tarballs", **kw)]
    return figs


def run(ctx: Ctx) -> list[Figure]:
    return _simulation(ctx)
