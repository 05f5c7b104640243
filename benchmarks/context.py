"""The run context handed to every ``bench_*.run(ctx)``: options, the series, scratch, chart data.

Owns where a benchmark may write (``ctx.scratch(name)``: an empty dir under this run's own
``<cache>/scratch/run-<pid>/``, on the series' filesystem, never in the repo), how many
repetitions a figure gets in quick and full mode, and ``ctx.data``, the named series the
report draws charts from (``"disk"``, ``"import"``, ``"gc"`` ...). The series is built on
first use.
``ctx.installed_store(n)`` is one store per run holding the first ``n`` versions, filled
untimed and shared by benchmarks that only read (mount, run); it raises ``NotAvailable``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .jblcli import Jbl
from .series import DEFAULT_CACHE, Series, ensure_series


@dataclass
class Ctx:
    quick: bool = False
    cache: Path = DEFAULT_CACHE
    data: dict[str, object] = field(default_factory=dict)
    _series: Series | None = None
    _store: Jbl | None = None
    _store_n: int = 0
    _t0: float = field(default_factory=time.monotonic)

    @property
    def series(self) -> Series:
        if self._series is None:
            self._series = ensure_series(self.cache, quick=self.quick)
        return self._series

    def reps(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    @property
    def run_dir(self) -> Path:
        """This run's own scratch root (per pid: a standalone bench run may share the cache)."""
        return self.cache / "scratch" / f"run-{os.getpid()}"

    def scratch(self, name: str) -> Path:
        d = self.run_dir / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def cleanup(self) -> None:
        """Remove this run's scratch, and that of earlier runs whose process is gone."""
        for d in (self.cache / "scratch").glob("run-*"):
            pid = d.name.removeprefix("run-")
            gone = d == self.run_dir or (pid.isdigit() and not Path(f"/proc/{pid}").exists())
            if gone and not any(os.path.ismount(m) for m in d.glob("*/mp")):
                shutil.rmtree(d, ignore_errors=True)

    def installed_store(self, count: int = 1) -> Jbl:
        """The run's shared read-only store with the first ``count`` versions installed."""
        if self._store is None:
            self._store = Jbl(self.scratch("shared-store") / "store")
        vs = self.series.versions
        while self._store_n < min(count, len(vs)):
            v = vs[self._store_n]
            self.log(f"shared store: install {v.spec} (untimed)")
            self._store.add(v.spec, v.tarball, self.series.registry)
            self._store_n += 1
        return self._store

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self._t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
