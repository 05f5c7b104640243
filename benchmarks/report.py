"""The report: ``BENCHMARKS.md`` (tables, machine, command, date) and PNG charts.

Owns the presentation only: figures come in as ``measure.Figure`` objects and chart data as
``ctx.data``. A missed target reads **MISSED**; a figure whose jbl side did not run reads
"not measured (reason)". Charts go to ``benchmarks/charts/`` and are linked relatively; a chart
whose data no benchmark produced is listed as not drawn, with the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .measure import Figure, fmt, markdown_table
from .series import Series

ROOT = Path(__file__).resolve().parent.parent
CHARTS = Path(__file__).resolve().parent / "charts"
GROUP_ORDER = ["store", "mount", "run", "gc"]          # the order a user meets the features


def _sh(cmd: str) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return r.stdout.strip()


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    cg = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1 (or hybrid)"
    return {"CPU": f"{cpu}, {os.cpu_count()} logical CPUs (nproc {_sh('nproc')})",
            "memory": fmt(mem, "B"),
            "kernel": f"{platform.release()} ({platform.machine()})",
            "cgroup": cg,
            "OS": _sh(". /etc/os-release && echo $PRETTY_NAME"),
            "filesystem of the data": _sh("df -T /var/tmp | awk 'NR==2 {print $2, $1}'"),
            "python": f"{platform.python_version()} (harness); runtime: host /usr/bin/python3.11",
            "jbl": _sh(f"cd {ROOT} && git rev-parse --short HEAD 2>/dev/null") or "uncommitted"}


# ---------------------------------------------------------------- charts
def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chart_disk(data: dict[str, object]) -> str:
    plt = _plt()
    xs = list(data["versions"])  # type: ignore[call-overload]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [b / 1e9 for b in data["side_by_side"]], "o-",  # type: ignore[attr-defined]
            label="extracted side by side (du)")
    ax.plot(xs, [b / 1e9 for b in data["tarballs"]], "s--",  # type: ignore[attr-defined]
            label=".tar.gz kept")
    ours = list(data.get("jbl") or [])  # type: ignore[call-overload]
    if ours:
        ax.plot(xs[:len(ours)], [b / 1e9 for b in ours], "D-", lw=2, label="jbl store (du)")
    else:
        ax.text(0.5, 0.5, "jbl store: not measured", transform=ax.transAxes, ha="center")
    sim = data.get("sim3")
    if sim:
        ax.plot([3], [float(sim) / 1e9], "*", ms=12,  # type: ignore[arg-type]
                label="simulated sha256 + zstd-3 (3 versions)")
    ax.set_xlabel("versions installed")
    ax.set_ylabel("disk (GB, allocated)")
    ax.set_title("Disk per version count: python-3.11-ml series")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, "disk.png")


def chart_import(data: dict[str, tuple[float, float | None]]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = [k for k in ("warm", "cold") if k in data]
    for i, k in enumerate(keys):
        nat, mine = data[k]
        ax.bar(i - 0.2, nat * 1000, 0.4, color="tab:blue",
               label="native chroot" if i == 0 else None)
        if mine is not None:
            ax.bar(i + 0.2, mine * 1000, 0.4, color="tab:orange",
                   label="jbl mount chroot" if i == 0 else None)
            ax.text(i + 0.2, mine * 1000, f"{mine / nat:.2f}×", ha="center", va="bottom")
        else:
            ax.text(i + 0.2, nat * 100, "jbl:\nnot\nmeasured", ha="center", fontsize=8)
    ax.set_xticks(range(len(keys)), [f"{k} import numpy, pandas" for k in keys])
    ax.set_ylabel("wall time, median (ms)")
    ax.set_title("Import time: jbl mount vs native")
    ax.legend()
    return _save(fig, "import.png")


def chart_gc(results: list[dict[str, float]]) -> str:
    """``ctx.data["gc"]``: one dict per store size (bench_gc): versions, gc_*_s, verify*_s."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["versions"] for r in results]
    for key, label in (("gc_half_s", "gc removing half the versions"),
                       ("gc_noop_s", "gc, nothing to remove"),
                       ("verify_s", "verify"), ("verify_data_s", "verify --data")):
        ys = [r.get(key) for r in results]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("versions in store (10k files each)")
    ax.set_ylabel("seconds")
    ax.axhline(10, color="red", ls=":", label="gc target at 100 versions")
    ax.set_title("gc / verify time vs store size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, "gc.png")


def _save(fig: object, name: str) -> str:
    CHARTS.mkdir(exist_ok=True)
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(CHARTS / name, dpi=110)  # type: ignore[attr-defined]
    _plt().close(fig)
    return f"benchmarks/charts/{name}"


def chart_fleet(data: dict[str, Any]) -> str:
    from .fleetsim import chart  # fleetsim imports this module's _plt/_save
    return chart(data["sim"])


def charts(data: dict[str, object]) -> list[tuple[str, str | None, str]]:
    """(title, path or None, why not drawn)."""
    out: list[tuple[str, str | None, str]] = []
    for title, key, fn in (("Disk per version count", "disk", chart_disk),
                           ("Import time, warm and cold", "import", chart_import),
                           ("gc / verify time vs store size", "gc", chart_gc),
                           ("Fleet: origin bytes vs nodes (simulated)", "fleet", chart_fleet)):
        if key in data:
            try:
                out.append((title, fn(data[key]), ""))  # type: ignore[arg-type]
            except Exception as e:  # a chart must not lose the tables
                out.append((title, None, f"chart failed: {type(e).__name__}: {e}"))
        else:
            out.append((title, None, "no benchmark produced this data in this run"))
    return out


# ---------------------------------------------------------------- the page
def series_table(s: Series) -> str:
    rows = ["| version | numpy | pandas | scipy | scikit-learn | .tar.gz | files | bytes |",
            "|---|---|---|---|---|---|---|---|"]
    for v in s.versions:
        p = v.packages
        rows.append(f"| {v.version} | {p['numpy']} | {p['pandas']} | {p['scipy']} | "
                    f"{p['scikit-learn']} | {fmt(v.tar_size, 'B')} | {v.files:,} | "
                    f"{fmt(v.bytes, 'B')} |")
    return "\n".join(rows) + "\n"


def _disk_table(disk: dict[str, list[float]]) -> str:
    rows = ["| versions | side by side (du) | .tar.gz kept | jbl store (du) | jbl / side by side |",
            "|---|---|---|---|---|"]
    ours = disk.get("jbl") or []
    for i, k in enumerate(disk["versions"]):
        mine = ours[i] if i < len(ours) else None
        ratio = f"{mine / disk['side_by_side'][i]:.3f}×" if mine else "—"
        rows.append(f"| {k:.0f} | {fmt(disk['side_by_side'][i], 'B')} | "
                    f"{fmt(disk['tarballs'][i], 'B')} | {fmt(mine, 'B')} | {ratio} |")
    return "\n".join(rows)


def write(path: Path, figs: list[Figure], data: dict[str, object], series: Series | None,
          command: str, started: dt.datetime, elapsed: float, load_start: str = "") -> None:
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    figs = sorted(figs, key=lambda f: order.get(f.group, len(order)))   # stable within a group
    main = [f for f in figs if f.group != "reference"]
    ref = [f for f in figs if f.group == "reference"]
    missed = [f for f in main if f.status == "MISSED"]
    unmeasured = [f for f in main if not f.measured]
    b = ["# jbl benchmarks",
         f"Generated {started:%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} min by "
         "(`make bench` = `python -m benchmarks`, `make bench QUICK=1` adds `--quick`):",
         f"```\n{command}\n```",
         "Every figure is a ratio jbl / baseline measured in the same run, the two interleaved "
         "round by round (medians; the spread column gives the interquartile range, or min–max "
         "below 4 samples). Cold figures drop the page, dentry and inode caches before every "
         "run. How each figure is measured: [docs/benchmarks.md](docs/benchmarks.md).",
         "## Summary"]
    lines = [f"- {len(main) - len(unmeasured)} of {len(main)} figures measured; "
             f"{len(missed)} MISSED their target; {len(unmeasured)} not measured yet."]
    for f in missed:
        tgt = (f.target or "").replace("<=", "≤ ").replace(">=", "≥ ")
        where = " (profile below)" if f.profile else " (no profile captured in this run)"
        lines.append(f"- **MISSED**: {f.name}: {f.ratio:.2f}× against a target of {tgt}×{where}.")
    for f in unmeasured:
        lines.append(f"- {f.name}: {f.note}.")
    b += ["\n".join(lines), "## Figures", markdown_table(main) if main else "(none)",
          "## Reference measurements (no target)", markdown_table(ref) if ref else "(none)"]
    sim = data.get("dedupsim")
    if isinstance(sim, dict):
        b.append(f"Simulation detail (3 versions): {sim['files']:,.0f} files, "
                 f"{sim['objects']:,.0f} distinct contents, unique content "
                 f"{fmt(sim['unique_raw'], 'B')} raw → {fmt(sim['stored'], 'B')} zstd-3 "
                 f"({fmt(sim['stored_alloc'], 'B')} in 4 KiB blocks) vs "
                 f"{fmt(sim['side_by_side_alloc'], 'B')} side by side: "
                 f"{sim['ratio_alloc']:.3f}× allocated, {sim['ratio_apparent']:.3f}× apparent.")
    disk = data.get("disk")
    if isinstance(disk, dict):
        b += ["## Disk per version count", _disk_table(disk)]
        if disk.get("df"):
            b += ["`jbl store df --json` after the last version:",
                  f"```json\n{json.dumps(disk['df'], indent=1)[:3000]}\n```"]
    fleet = data.get("fleet")
    if isinstance(fleet, dict):           # bench_fleet: the simulation's tables
        b += ["## Fleet simulation (benchmarks/fleetsim.py)", fleet["versions_table"],
              "Origin bytes / requests, every node installing every version in order:",
              fleet["fleet_table"]]
    profiled = [f for f in figs if f.profile]
    if profiled:
        b.append("## Where the time goes (missed figures)")
        for f in profiled:
            b += [f"### {f.name}", f"```\n{f.profile.rstrip()}\n```"]
    b.append("## Charts")
    for title, p, why in charts(data):
        b += [f"### {title}", f"![{title}]({p})" if p else f"Not drawn: {why}."]
    if series is not None:
        b += ["## Data: the realistic runtime series",
              f"Built by `benchmarks/series.py` in `{series.cache}` from the host's "
              "/usr/bin/python3.11, its stdlib and shared libraries, and real manylinux wheels "
              f"(pip). Packed with `{series.packer}`; registry `{series.registry}/registry.json`.",
              series_table(series).rstrip()]
    mach = [f"- {k}: {v}" for k, v in machine().items()]
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    mach.append(f"- load average (1/5/15 min) at start: {load_start or '?'}; at end: {load_end} "
                "(other work shares this machine; hence the interleaving)")
    b += ["## Machine", "\n".join(mach)]
    path.write_text("\n\n".join(x.rstrip("\n") for x in b) + "\n")
