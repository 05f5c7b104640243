"""The measuring harness every benchmark shares: repeat, summarise, cold caches, disk, memory.

Owns: ``Stat`` (median + IQR + min/max of repeated samples), ``time_cmd``/``time_fn`` and
``interleave`` (baseline and jbl alternated run by run, so drift on a noisy machine hits both),
``drop_caches``, ``du_bytes``, ``PeakRSS`` (peak resident memory of a process tree), and the
result model ``Figure`` with its markdown table. A figure is a *ratio* jbl / baseline measured in
the same run; one whose jbl side cannot run yet is ``Figure.missing(...)`` and is printed as
"not measured (reason)", never estimated. Single-threaded except for the ``PeakRSS`` sampler.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEVNULL = subprocess.DEVNULL


# ---------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """Summary of repeated samples of one quantity (seconds, bytes, MB/s ...)."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, xs: Sequence[float]) -> Stat:
        if not xs:
            raise ValueError("no samples")
        return cls(tuple(float(x) for x in xs))

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return self._quart()[0]

    @property
    def q3(self) -> float:
        return self._quart()[1]

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def _quart(self) -> tuple[float, float]:
        if self.n < 4:
            return self.min, self.max
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]

    def spread(self, unit: str) -> str:
        """IQR with n >= 4, else min–max; as text like ``1.21–1.34 s (n=7)``."""
        if self.n == 1:
            return "n=1"
        what = "IQR " if self.n >= 4 else "min–max "
        return f"{what}{fmt(self.q1, unit)}–{fmt(self.q3, unit)} (n={self.n})"


def fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "—"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "B":
        for u, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(x) >= k:
                return f"{x / k:.1f} {u}"
        return f"{x:.0f} B"
    if unit == "MB/s":
        return f"{x:.0f} MB/s"
    if unit == "":
        return f"{x:,.0f}"
    return f"{x:.3g} {unit}"


# ---------------------------------------------------------------- timing
def time_cmd(cmd: Sequence[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None) -> float:
    """Wall seconds of one run of ``cmd`` (output discarded); raises if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(list(cmd), env=env, cwd=cwd, stdout=DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise subprocess.CalledProcessError(r.returncode, list(cmd),
                                            stderr=err[-1] if err else "")
    return dt


Step = Callable[[], float]          # one timed repetition, returns seconds (or another value)


def repeat(step: Step, n: int, *, setup: Callable[[], object] | None = None,
           warmup: int = 0) -> Stat:
    for _ in range(warmup):
        if setup:
            setup()
        step()
    xs = []
    for _ in range(n):
        if setup:
            setup()
        xs.append(step())
    return Stat.of(xs)


def interleave(steps: dict[str, Step], n: int, *, setup: Callable[[], object] | None = None,
               warmup: int = 0) -> dict[str, Stat]:
    """Run every step once per round, ``n`` rounds (+ ``warmup`` untimed), order alternating."""
    names = list(steps)
    for _ in range(warmup):
        for k in names:
            if setup:
                setup()
            steps[k]()
    xs: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        for k in (names if i % 2 == 0 else names[::-1]):
            if setup:
                setup()
            xs[k].append(steps[k]())
    return {k: Stat.of(v) for k, v in xs.items()}


def drop_caches() -> None:
    """Really cold: write back dirty pages, then drop page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---------------------------------------------------------------- disk
def du_bytes(*paths: str | Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of ``paths`` together, hardlinks counted once (GNU du)."""
    def du(*opts: str) -> int:
        out = subprocess.run(["du", "-s", "-c", *opts, *map(str, paths)], check=True,
                             capture_output=True, text=True).stdout
        return int(out.strip().splitlines()[-1].split()[0])
    return du("-b"), du("-B1")



# ---------------------------------------------------------------- memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRSS:
    """Sample the summed VmRSS of ``pid`` and its descendants every ``interval`` seconds.

    ``with PeakRSS(pid) as m: ...`` then ``m.peak`` (bytes): the largest sum seen, or the sum
    of each process's own high-water mark (VmHWM) if that is larger (short spikes).
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._hwm: dict[int, int] = {}
        self._t = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        pids = tree_pids(self.pid)
        self.peak = max(self.peak, 1024 * sum(_status_kb(p, "VmRSS") for p in pids))
        for p in pids:
            self._hwm[p] = max(self._hwm.get(p, 0), _status_kb(p, "VmHWM"))
        self.peak = max(self.peak, 1024 * sum(self._hwm.values()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


# ---------------------------------------------------------------- results
@dataclass
class Figure:
    """One line of the report: jbl vs its baseline, measured in the same run.

    ``ratio`` is jbl.median / baseline.median unless given. ``target`` is ``"<=1.25"`` or
    ``">=0.5"`` (on the ratio) or None for a reference line. ``note`` starting with
    ``"not measured"`` marks a figure whose jbl side could not run; it has no ratio.
    """

    name: str
    jbl: Stat | None
    baseline: Stat | None
    ratio: float | None = None
    target: str | None = None
    unit: str = "s"
    spread: str = ""
    baseline_label: str = ""
    note: str = ""
    group: str = ""
    profile: str = ""      # where the time goes (top of a cProfile), for a missed figure

    def __post_init__(self) -> None:
        if (self.ratio is None and self.jbl is not None and self.baseline is not None
                and self.baseline.median):
            self.ratio = self.jbl.median / self.baseline.median
        if not self.spread:
            parts = []
            if self.jbl is not None and self.jbl.n > 1:
                parts.append(f"jbl {self.jbl.spread(self.unit)}")
            if self.baseline is not None and self.baseline.n > 1:
                parts.append(f"base {self.baseline.spread(self.unit)}")
            self.spread = "; ".join(parts)

    @classmethod
    def missing(cls, name: str, baseline: Stat | None, reason: str, **kw: object) -> Figure:
        return cls(name, None, baseline, note=f"not measured ({reason})", **kw)  # type: ignore[arg-type]

    @property
    def measured(self) -> bool:
        return not self.note.startswith("not measured")

    @property
    def status(self) -> str:
        if not self.measured:
            return self.note
        if self.target is None or self.ratio is None:
            return "reference"
        op, val = self.target[:2], float(self.target[2:])
        ok = self.ratio <= val if op == "<=" else self.ratio >= val
        return "met" if ok else "MISSED"


def _target_text(t: str | None) -> str:
    return "—" if t is None else t.replace("<=", "≤ ").replace(">=", "≥ ") + "×"


def markdown_table(figs: list[Figure]) -> str:
    rows = ["| figure | jbl (median) | baseline (median) | ratio | target | status | spread |",
            "|---|---|---|---|---|---|---|"]
    for f in figs:
        base = fmt(f.baseline.median if f.baseline else None, f.unit)
        if f.baseline_label:
            base += f" ({f.baseline_label})"
        ratio = "—" if f.ratio is None else f"{f.ratio:.2f}×"
        status = f"**{f.status}**" if f.status == "MISSED" else f.status
        rows.append(f"| {f.name} | {fmt(f.jbl.median if f.jbl else None, f.unit)} | {base} | "
                    f"{ratio} | {_target_text(f.target)} | {status} | {f.spread or '—'} |")
    return "\n".join(rows) + "\n"


@dataclass
class Collected:
    """What a run produced: figures, plus named data series for the charts."""

    figures: list[Figure] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)
