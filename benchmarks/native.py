"""The baselines: the same work done natively, without jbl, as one timed step each.

Owns the commands a user would run instead of jbl (``tar -xzf``, ``gzip -dc``, ``chroot DIR
python3 -c "import numpy, pandas"``, ``find -printf`` over a tree, a sequential read of a large
file, ``bwrap --unshare-all``, ``python3 -c pass``), so that every bench module times jbl and
its baseline with exactly the same step. ``python -m benchmarks.native [--quick]`` prints these
baselines for the series alone (handy while jbl's commands are still being written).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .measure import Stat, Step, drop_caches, fmt, interleave, repeat, time_cmd
from .series import CHROOT, ENV

IMPORT_CODE = "import numpy, pandas"
FIND_PRINTF = "%p %y %s %m %U %G %T@ %l\n"   # %s/%m/%T need a stat of every entry


def chroot_python(isolated: str | Path, code: str = IMPORT_CODE) -> list[str]:
    return [CHROOT, str(isolated), "/usr/bin/python3", "-c", code]


def import_step(isolated: str | Path, *, cold: bool = False, code: str = IMPORT_CODE) -> Step:
    cmd = chroot_python(isolated, code)

    def step() -> float:
        if cold:
            drop_caches()
        return time_cmd(cmd, env=ENV)
    return step


def find_step(root: str | Path) -> Step:
    cmd = ["find", str(root), "-printf", FIND_PRINTF]
    return lambda: time_cmd(cmd)


def largest_file(root: str | Path) -> Path:
    best, size = None, -1
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not os.path.islink(p) and st.st_size > size:
                best, size = p, st.st_size
    assert best is not None
    return Path(best)


def read_all(path: str | Path, bufsize: int = 1 << 20) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(bufsize):
            n += len(b)
    return n


def cold_read_step(path: str | Path) -> Step:
    """Cold sequential read; returns throughput in MB/s (higher is better)."""
    size = os.stat(path).st_size

    def step() -> float:
        drop_caches()
        t0 = time.perf_counter()
        read_all(path)
        return size / 1e6 / (time.perf_counter() - t0)
    return step


def tar_x_step(tarball: str | Path, scratch: Path) -> Step:
    """``tar -xzf`` into a fresh dir (removed and synced before, not timed)."""
    dest = scratch / "tar-x"

    def step() -> float:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        os.sync()
        return time_cmd(["tar", "-xzf", str(tarball), "-C", str(dest)])
    return step


def gunzip_step(tarball: str | Path) -> Step:
    return lambda: time_cmd(["sh", "-c", f"gzip -dc '{tarball}' >/dev/null"])


def bwrap_cmd(isolated: str | Path) -> list[str]:
    return ["bwrap", "--unshare-all", "--ro-bind", str(isolated), "/", "/usr/bin/true"]


def python_pass_cmd(python: str = sys.executable) -> list[str]:
    return [python, "-c", "pass"]


def main(argv: Sequence[str] | None = None) -> int:
    from .series import ensure_series

    ap = argparse.ArgumentParser(prog="python -m benchmarks.native")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=7)
    a = ap.parse_args(argv)
    s = ensure_series(quick=a.quick)
    v = s.versions[0]
    iso = Path(v.extracted) / "isolated"
    scratch = Path(s.cache) / "scratch"
    scratch.mkdir(exist_ok=True)

    def show(name: str, st: Stat, unit: str = "s") -> None:
        print(f"{name:48} median {fmt(st.median, unit):>10}   {st.spread(unit)}")

    r = interleave({"tar": tar_x_step(v.tarball, scratch), "gz": gunzip_step(v.tarball)}, a.n)
    show(f"tar -xzf {Path(v.tarball).name}", r["tar"])
    show("gzip -dc >/dev/null", r["gz"])
    print(f"{'':48} gzip -dc / tar -xzf = {r['gz'].median / r['tar'].median:.2f}")
    shutil.rmtree(scratch / "tar-x", ignore_errors=True)
    show("warm chroot import numpy, pandas", repeat(import_step(iso), a.n, warmup=1))
    show("cold chroot import numpy, pandas", repeat(import_step(iso, cold=True), a.n))
    show("find -printf (stat all), warm", repeat(find_step(iso), a.n, warmup=1))
    big = largest_file(iso)
    show(f"cold read {big.name} ({fmt(big.stat().st_size, 'B')})",
         repeat(cold_read_step(big), a.n), "MB/s")
    r = interleave({"bwrap": lambda: time_cmd(bwrap_cmd(iso)),
                    "py": lambda: time_cmd(python_pass_cmd())}, max(a.n, 20), warmup=2)
    show("bwrap --unshare-all --ro-bind ISO / true", r["bwrap"])
    show(f"{sys.executable} -c pass", r["py"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
