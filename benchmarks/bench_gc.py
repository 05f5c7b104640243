"""gc and verify time on synthetic stores of 10 / 100 / 1,000 versions x 10,000 files.

Owns the synthetic store generator: rows inserted through store/rows.py and small blobs
written by BlobStore (no tarballs, no ingest: generating 10M entries through ingest would take
longer than everything measured). Each version has ``FILES`` files in 10 directories;
consecutive versions differ in ``CHURN`` of them (a 10% release), so a store of V versions
holds ``FILES + (V-1)*CHURN`` contents/blobs and ``V*FILES`` entries — the dedup shape of a
real runtime series.

Measured per size, one run each on the same store (gc is destructive):
  * ``jbl store gc`` with nothing to do (the mark cost alone);
  * ``jbl store gc --keep-latest V/2`` — half the versions removed, their blobs swept
    (DESIGN target: < 10 s at 100 versions x 10k files);
  * ``jbl store verify`` and ``jbl store verify --data`` on what remains.
Times include the CLI's start (~0.2 s), as cron would see them.

``python -m benchmarks.bench_gc [--sizes 10 100 1000]`` prints a markdown table alone;
``run(ctx)`` is the harness entry (1,000 versions only without ``--quick``). Single-threaded.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from jbl.store import rows
from jbl.store.blobs import CODEC_RAW
from jbl.store.store import Store

from .measure import Figure, Stat

FILES = 10_000
CHURN = 1_000
DIRS = 10
GC_BUDGET_S = 10.0
JBL = str(Path(sys.executable).with_name("jbl"))


def build_store(store_dir: Path, versions: int, files: int = FILES, churn: int = CHURN) -> None:
    """A store of ``versions`` x ``files`` (see the module docstring)."""
    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store.open(store_dir, create=True)
    db = store.db
    now = time.time()
    cur: list[int] = [0] * files
    next_content = 1

    def new_content(key: bytes) -> int:
        nonlocal next_content
        body = hashlib.sha256(key).hexdigest().encode() * 4  # 256 bytes, stored raw
        d = hashlib.sha256(body).digest()
        store.blobs.write(d, body)
        cid = next_content
        next_content += 1
        # One blob per content, so both share the id.
        rows.insert_blobs(db, [rows.BlobRow(cid, d, len(body), len(body), CODEC_RAW, now)])
        rows.insert_contents(db, [rows.ContentRow(cid, d, len(body), 1)],
                             [rows.ChunkRow(cid, 0, cid)])
        return cid

    eid = 0
    for v in range(versions):
        with db.write():
            if v == 0:
                cur = [new_content(b"f%d" % j) for j in range(files)]
            else:
                start = (v * churn) % files
                for j in range(start, min(start + churn, files)):
                    cur[j] = new_content(b"f%d-v%d" % (j, v))
            eid += 1
            root = eid
            entries = [rows.EntryRow(root, None, b"", stat.S_IFDIR, 0o755)]
            dir_ids = []
            for d in range(DIRS):
                eid += 1
                dir_ids.append(eid)
                entries.append(rows.EntryRow(eid, root, b"d%d" % d, stat.S_IFDIR, 0o755))
            for j in range(files):
                eid += 1
                entries.append(rows.EntryRow(eid, dir_ids[j % DIRS], b"file%d.py" % j,
                                             stat.S_IFREG, 0o644, size=256, content_id=cur[j]))
            rows.insert_version_tree(db, rows.VersionRow(
                "synth", f"1.{v}.0", "", now - (versions - v) * 3600, source="synthetic",
                file_count=files, logical_size=files * 256, id=v + 1), entries)
    store.blobs.sync()
    store.close()


def _timed(*args: str) -> float:
    t0 = time.monotonic()
    p = subprocess.run([JBL, *args], capture_output=True, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"jbl {' '.join(args)} failed: {p.stderr.strip()}")
    return dt


def measure(scratch: Path, versions: int, log: object = print) -> dict[str, float]:
    d = scratch / f"store-{versions}"
    t0 = time.monotonic()
    build_store(d, versions)
    built = time.monotonic() - t0
    log(f"gc: built {versions} x {FILES} in {built:.1f}s")  # type: ignore[operator]
    s = ["--store", str(d), "store"]
    out = {"versions": float(versions), "build_s": built,
           "gc_noop_s": _timed(*s, "gc"),
           "gc_half_s": _timed(*s, "gc", "--keep-latest", str(max(1, versions // 2))),
           "verify_s": _timed(*s, "verify"),
           "verify_data_s": _timed(*s, "verify", "--data")}
    shutil.rmtree(d, ignore_errors=True)
    return out


def figures(results: list[dict[str, float]]) -> list[Figure]:
    figs = []
    budget = Stat.of([GC_BUDGET_S])
    for r in results:
        n = int(r["versions"])
        tag = f"{n} versions × {FILES // 1000}k files"
        gc = Figure(f"gc removing {n // 2} of {tag}", Stat.of([r["gc_half_s"]]),
                    budget if n == 100 else None, target="<=1" if n == 100 else None,
                    baseline_label="10 s budget" if n == 100 else "", group="gc")
        figs += [gc,
                 Figure(f"gc, nothing to remove, {tag}", Stat.of([r["gc_noop_s"]]), None,
                        group="gc"),
                 Figure(f"verify, {tag} (after gc)", Stat.of([r["verify_s"]]), None,
                        group="gc"),
                 Figure(f"verify --data, {tag} (after gc)", Stat.of([r["verify_data_s"]]),
                        None, group="gc")]
    return figs


def run(ctx: object) -> list[Figure]:
    sizes = [10, 100] if getattr(ctx, "quick", False) else [10, 100, 1000]
    scratch: Path = ctx.scratch("gc")  # type: ignore[attr-defined]
    results = [measure(scratch, n, ctx.log) for n in sizes]  # type: ignore[attr-defined]
    ctx.data["gc"] = results  # type: ignore[attr-defined]
    return figures(results)


def table(results: list[dict[str, float]]) -> str:
    rows = ["| versions × files | build | gc (no-op) | gc (remove half) | verify | verify --data |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {int(r['versions'])} × {FILES} | {r['build_s']:.1f} s | "
                    f"{r['gc_noop_s']:.2f} s | {r['gc_half_s']:.2f} s | {r['verify_s']:.2f} s | "
                    f"{r['verify_data_s']:.2f} s |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gc")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--scratch", type=Path, default=Path("/var/tmp/jbl-bench/scratch/gc"))
    a = ap.parse_args(argv)
    a.scratch.mkdir(parents=True, exist_ok=True)
    results = [measure(a.scratch, n) for n in a.sizes]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
