"""Native vs the two FUSE engines (raw, pyfuse3) on one store version, interleaved.

    python -m benchmarks.bench_engines --store S --name N --version V --native DIR/isolated
           [--code "import numpy, pandas"] [--rounds 7]

Mounts the store twice (``jbl mount --engine raw`` and ``--engine pyfuse3``) side by side and
times, round-robin within each round (native, raw, pyfuse3, order alternating): warm chroot
python import, warm ``find -printf`` stat sweep, cold sequential read of the largest file
(drop_caches before each), and cold import. Prints medians, quartiles and ratios to native.
Owns nothing else; the series-wide figures are bench_mount.py's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from . import native
from .measure import fmt, interleave

ENGINES = ("raw", "pyfuse3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_engines")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--native", required=True, type=Path, help="the extracted isolated/ dir")
    p.add_argument("--code", default=native.IMPORT_CODE)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cold-rounds", type=int, default=3)
    p.add_argument("--jbl", default=str(Path(sys.executable).with_name("jbl")))
    a = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="jbl-bench-engines-"))
    mps = {e: base / e for e in ENGINES}
    for e, mp in mps.items():
        mp.mkdir()
        subprocess.run([a.jbl, "--store", str(a.store), "mount", "--engine", e, str(mp)],
                       check=True)
    try:
        isos = {"native": a.native,
                **{e: mp / a.name / a.version / "isolated" for e, mp in mps.items()}}
        big = native.largest_file(a.native)
        rel = big.relative_to(a.native)
        rows = []
        for what, steps, n, warm, unit in (
            (f"warm `{a.code}`", {k: native.import_step(v, code=a.code)
                                  for k, v in isos.items()}, a.rounds, 2, "s"),
            ("warm find -printf (stat of every entry)",
             {k: native.find_step(v) for k, v in isos.items()}, a.rounds, 1, "s"),
            (f"cold sequential read of {rel} ({big.stat().st_size / 1e6:.0f} MB)",
             {k: native.cold_read_step(v / rel) for k, v in isos.items()}, a.cold_rounds, 0,
             "MB/s"),
            (f"cold `{a.code}`", {k: native.import_step(v, code=a.code, cold=True)
                                  for k, v in isos.items()}, a.cold_rounds, 0, "s"),
        ):
            r = interleave(steps, n, warmup=warm)
            nat = r["native"].median
            cells = [what]
            for k in ("native", *ENGINES):
                s = r[k]
                ratio = (s.median / nat) if unit == "s" else (s.median / nat)
                cells.append(f"{fmt(s.median, unit)} [{fmt(s.q1, unit)}–{fmt(s.q3, unit)}]"
                             + ("" if k == "native" else f" = {ratio:.2f}×"))
            rows.append(cells)
            print(" | ".join(cells), flush=True)
        print("\n| what | native | raw | pyfuse3 |\n|---|---|---|---|")
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
    finally:
        for mp in mps.values():
            subprocess.run([a.jbl, "--store", str(a.store), "umount", str(mp)], check=False)
            mp.rmdir()
        base.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
