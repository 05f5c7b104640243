"""Reference simulation: what whole-file sha256 dedup + zstd-3 per object would store.

Owns the design's "0.23×" estimate. For a set of extracted runtime trees: every regular file
(hardlinks once) is hashed; each distinct content is one object, zstd level 3 compressed, kept
raw when that is not smaller. Reports the objects' bytes (apparent, and rounded up to 4 KiB
blocks as one file per object would allocate) against ``du`` of the trees side by side. No index,
no chunking: a lower bound for a file-level store, an upper bound for a chunked one.
``python -m benchmarks.dedupsim [--quick]`` prints it for the series. Cached per version set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

from .measure import du_bytes

BLOCK = 4096


def _files(roots: list[Path]) -> list[str]:
    seen: set[tuple[int, int]] = set()
    out = []
    for root in roots:
        for dirpath, _d, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                if os.path.islink(p) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                out.append(p)
    return out


def _digest(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), len(data)


def simulate(roots: list[Path], level: int = 3) -> dict[str, float]:
    files = _files(roots)
    with ThreadPoolExecutor(os.cpu_count() or 2) as ex:   # hashlib/zstd release the GIL
        digests = list(ex.map(_digest, files))
    first: dict[str, str] = {}
    for path, (dg, _n) in zip(files, digests, strict=True):
        first.setdefault(dg, path)

    def stored(path: str) -> int:
        with open(path, "rb") as f:
            data = f.read()
        return min(len(data), len(zstandard.ZstdCompressor(level=level).compress(data)))

    with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        sizes = list(ex.map(stored, first.values()))
    apparent, allocated = du_bytes(*roots)
    obj = sum(sizes)
    obj_alloc = sum(-(-s // BLOCK) * BLOCK for s in sizes)
    return {"files": len(files), "objects": len(first), "logical": sum(n for _d, n in digests),
            "unique_raw": sum(dict(digests).values()),
            "stored": obj, "stored_alloc": obj_alloc,
            "side_by_side_apparent": apparent, "side_by_side_alloc": allocated,
            "ratio_alloc": obj_alloc / allocated, "ratio_apparent": obj / apparent}


def cached_simulation(cache: Path, versions: list[str], roots: list[Path]) -> dict[str, float]:
    key = cache / f"dedupsim-{'_'.join(versions)}.json"
    if key.is_file():
        return dict(json.loads(key.read_text()))
    r = simulate(roots)
    key.write_text(json.dumps(r, indent=1))
    return r


def main() -> int:
    from .series import ensure_series

    s = ensure_series(quick="--quick" in sys.argv)
    vs = s.versions[:3]
    r = cached_simulation(Path(s.cache), [v.version for v in vs],
                          [Path(v.extracted) for v in vs])
    tars = sum(v.tar_size for v in vs)
    print(f"versions {', '.join(v.version for v in vs)}: {r['files']:.0f} files, "
          f"{r['objects']:.0f} distinct objects")
    print(f"side by side (du): {r['side_by_side_alloc'] / 1e6:.1f} MB allocated, "
          f"{r['side_by_side_apparent'] / 1e6:.1f} MB apparent")
    print(f"unique content raw: {r['unique_raw'] / 1e6:.1f} MB; zstd-3 objects: "
          f"{r['stored'] / 1e6:.1f} MB ({r['stored_alloc'] / 1e6:.1f} MB in 4K blocks)")
    print(f"ratio vs side by side: {r['ratio_alloc']:.3f} (allocated) "
          f"{r['ratio_apparent']:.3f} (apparent); .tar.gz kept: "
          f"{tars / r['side_by_side_alloc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
