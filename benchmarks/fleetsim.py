"""Fleet simulation: origin bytes and requests when N nodes install M versions of the series.

Owns the issue-16 model over the REAL series (no synthetic data):
- **Objects** (``scan``): every regular file of each version's extracted tree is cut into
  1 MiB chunks named by the sha256 of their bytes, each stored as the store's blobs are
  (``store/blobs.py``: raw under 64 bytes, zstd level 1 when that saves ≥ 5 %, else raw).
  A whole 1 MiB chunk is a *large* object, any shorter one (a small file, a large file's
  tail) *small*, as ``store/caspublish.py`` decides. Entries are taken in ``jbl pack``'s order.
  The version's tree is estimated as its entries (path, mode, size, mtime, chunk digests) in
  JSON, zstd level 9 (the published tree also lists packs and bodies).
- **Publishing** (``publish``): versions in order; a version's objects not published before are
  new; new small objects go, in tree order, into that version's packs of ≤ 4 MiB (the "new since
  the previous version" delta packs), new large objects stay single objects. Every object is
  also served on its own. When a cold install through the packs the version's small objects
  lie in would cost more than ``FULL_TRIGGER`` times packs of its own (bytes plus
  ``REQUEST_COST`` a request), the version also gets a full set: all its small objects in tree
  order, ≤ 4 MiB a pack (``store/casformat.py`` ``needs_full``).
- **A node's fetch** (``fetch_plan``): ``registry.json`` and the tree, then the objects it lacks:
  each large one singly; per pack, the whole pack when it is smaller than the lacked objects
  plus ``REQUEST_COST`` bytes for each request it saves, else those objects singly; through the
  delta packs or through the full set, whichever costs less (the rule of ``store/casformat.py``
  ``plan_fetch``). Objects that came with a pack but are not in the version are not kept.
- **Origin storage** (``simulate``'s ``storage``): tarballs, single objects, delta packs, full
  sets and trees.
- **The fleet** (``simulate``): N identical nodes install version 1 cold and then every later
  version in order, keeping the earlier ones. Origin bytes for (a) tarballs, no cache; (b)
  tarballs behind one shared cache; (c) the content-addressed form, no cache; (d) the same
  behind one cache. A shared cache is ideal: it stores every URL once and forever, and
  ``registry.json`` (short-lived) is counted once per version's rollout. Stock squid stores
  nothing over 4 MB, so with it (b) is (a); packs and objects are all under 4 MiB.
Scans are cached per version in ``<cache>/fleetsim/`` and results per version set.
``python -m benchmarks.fleetsim [--quick] [--cache DIR]`` prints the tables.
Single-threaded except for the scan's hashing pool (hashlib and zstd release the GIL).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from .measure import fmt

MODEL = 4                      # bump when the simulation changes: cached results are keyed by it
SCAN = 2                       # bump when the chunking or the size rule changes (scan cache key)
CHUNK = 1 << 20                # store/schema.py CHUNK_SIZE
ZSTD_LEVEL = 1                 # store/blobs.py ZSTD_LEVEL
MIN_SAVING = 0.05              # store/blobs.py MIN_SAVING
PACK_MAX = 4 << 20             # a pack stays cacheable by stock squid (maximum_object_size 4 MB)
REQUEST_COST = 128 << 10       # bytes one more request costs: store/casformat.py's value
FULL_TRIGGER = 1.05             # store/casformat.py's value
REGISTRY_JSON = 2_000          # bytes of registry.json per request (order of magnitude)
NODES = (1, 10, 100, 1_000, 10_000)


# ---------------------------------------------------------------- objects of one version
@dataclass
class Scan:
    """One version's objects: digest -> (stored bytes, large?), in tree order; its tree size."""

    version: str
    objects: dict[str, tuple[int, bool]]
    tree_bytes: int
    raw_bytes: int

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "tree_bytes": self.tree_bytes,
                "raw_bytes": self.raw_bytes,
                "objects": [[d, s, int(big)] for d, (s, big) in self.objects.items()]}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Scan:
        objs = {str(d): (int(s), bool(b)) for d, s, b in doc["objects"]}  # type: ignore[attr-defined]
        return cls(str(doc["version"]), objs, int(doc["tree_bytes"]),  # type: ignore[call-overload]
                   int(doc["raw_bytes"]))  # type: ignore[call-overload]


def stored_size(data: bytes, cctx: zstandard.ZstdCompressor) -> int:
    """Bytes the store keeps for this chunk (store/blobs.py ``BlobStore.encode``)."""
    if len(data) < 64:
        return len(data)
    c = len(cctx.compress(data))
    return c if c <= len(data) * (1 - MIN_SAVING) else len(data)


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Entries in ``jbl pack``'s order (store/pack.py): runtime.yml first, then depth-first
    with names in byte order; an install records them, and the publisher packs, in it."""
    out = []
    top = root / "runtime.yml"
    if top.is_file():
        out.append(("runtime.yml", top.lstat()))

    def visit(d: Path, rel: str) -> None:
        for raw in sorted(os.fsencode(n) for n in os.listdir(d)):
            arc = f"{rel}/{os.fsdecode(raw)}" if rel else os.fsdecode(raw)
            if arc == "runtime.yml":
                continue
            st = os.lstat(root / arc)
            out.append((arc, st))
            if stat.S_ISDIR(st.st_mode):
                visit(root / arc, arc)

    visit(root, "")
    return out


def _chunks(path: Path, known: dict[str, int]) -> list[tuple[str, int, bool]]:
    """(digest, stored size, a whole chunk?) per chunk; zstd runs on chunks not seen before."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out = []
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            d = hashlib.sha256(data).hexdigest()
            size = known.get(d)
            out.append((d, size if size is not None else stored_size(data, cctx),
                        len(data) == CHUNK))
    return out


def scan(root: Path, version: str, known: dict[str, int]) -> Scan:
    """Chunk every regular file under ``root`` (``known``: sizes from earlier scans)."""
    entries = _walk(root)
    files = [(rel, st) for rel, st in entries if stat.S_ISREG(st.st_mode)]
    with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        chunked = dict(zip((rel for rel, _ in files),
                           ex.map(lambda f: _chunks(root / f[0], known), files), strict=True))
    objects: dict[str, tuple[int, bool]] = {}
    tree = []
    for rel, st in entries:
        cs = chunked.get(rel, [])
        for d, size, whole in cs:
            known[d] = size
            objects.setdefault(d, (size, whole))
        target = os.readlink(root / rel) if stat.S_ISLNK(st.st_mode) else None
        tree.append([rel, st.st_mode, st.st_size, st.st_mtime_ns, target,
                     [d for d, _s, _w in cs]])
    body = json.dumps(tree, separators=(",", ":")).encode()
    return Scan(version, objects, len(zstandard.ZstdCompressor(level=9).compress(body)),
                sum(st.st_size for _, st in files))


def cached_scans(cache: Path, versions: list[tuple[str, Path]], log: object = None
                 ) -> list[Scan]:
    """Scans of ``(version, extracted runtime dir)``, from ``<cache>/fleetsim/`` when there."""
    d = cache / "fleetsim"
    d.mkdir(exist_ok=True)
    known: dict[str, int] = {}
    out = []
    for ver, root in versions:
        f = d / f"scan-s{SCAN}-{ver}.json"
        if f.is_file():
            s = Scan.from_json(json.loads(f.read_text()))
        else:
            if callable(log):
                log(f"fleetsim: chunking {ver} (1 MiB, sha256, zstd-1 sizes; cached after)")
            s = scan(root, ver, known)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(s.to_json()))
            tmp.rename(f)
        known.update((dg, size) for dg, (size, _b) in s.objects.items())
        out.append(s)
    return out


# ---------------------------------------------------------------- publishing and fetching
@dataclass
class Published:
    """What the origin serves: every pack's members and bytes; per version, the pack its tree
    lists for each small object (``loc``: the delta pack it was first published in) and its
    full set (``full``: empty unless the publisher wrote one)."""

    packs: list[list[str]] = field(default_factory=list)
    pack_bytes: list[int] = field(default_factory=list)
    loc: list[dict[str, int]] = field(default_factory=list)
    full: list[list[int]] = field(default_factory=list)
    packs_of_version: list[list[int]] = field(default_factory=list)   # new delta packs


def _pack_all(pub: Published, objs: list[tuple[str, int]]) -> list[int]:
    """``objs`` (digest, stored bytes) in order into new packs of at most PACK_MAX bytes."""
    out: list[int] = []
    cur: list[str] = []
    size = 0
    for d, n in objs:
        if cur and size + n > PACK_MAX:
            out.append(len(pub.packs))
            pub.packs.append(cur)
            pub.pack_bytes.append(size)
            cur, size = [], 0
        cur.append(d)
        size += n
    if cur:
        out.append(len(pub.packs))
        pub.packs.append(cur)
        pub.pack_bytes.append(size)
    return out


def publish(scans: list[Scan]) -> Published:
    """Versions in order (store/caspublish.py): each one's new small objects packed in tree
    order, <= PACK_MAX each (its delta packs); then, when a cold install through those packs
    would cost more than FULL_TRIGGER x its small objects in packs of their own
    (store/casformat.py ``needs_full``), a full set: packs of all its small objects, which
    only its own tree names."""
    pub = Published()
    where: dict[str, int] = {}
    for s in scans:
        small = [(d, n) for d, (n, big) in s.objects.items() if not big]
        fresh = [(d, n) for d, n in small if d not in where]
        mine = _pack_all(pub, fresh)
        for p in mine:
            where.update((d, p) for d in pub.packs[p])
        loc = {d: where[d] for d, _n in small}
        pub.loc.append(loc)
        pub.packs_of_version.append(mine)
        sizes = dict(small)
        via = _greedy(loc, pub, sizes, set(sizes))
        need = sum(sizes.values())
        full_cost = need + REQUEST_COST * -(-need // PACK_MAX)
        write = via[0] + REQUEST_COST * via[1] > FULL_TRIGGER * full_cost
        pub.full.append(_pack_all(pub, small) if write else [])
    return pub


def _greedy(loc: dict[str, int], pub: Published, sizes: dict[str, int],
            want: set[str]) -> tuple[int, int, list[int], list[str]]:
    """plan_fetch's per-pack rule over the packs ``loc`` names for the ``want`` objects:
    (bytes, requests, whole packs, single objects); packs lacking the most bytes first."""
    by_pack: dict[int, list[str]] = {}
    for d in want:
        by_pack.setdefault(loc[d], []).append(d)
    packs, singles, total = [], [], 0
    for p, mine in sorted(by_pack.items(), key=lambda kv: -sum(sizes[d] for d in kv[1])):
        alone = sum(sizes[d] for d in mine)
        if pub.pack_bytes[p] < alone + REQUEST_COST * (len(mine) - 1):
            packs.append(p)
            total += pub.pack_bytes[p]
        else:
            singles += mine
            total += alone
    return total, len(packs) + len(singles), packs, singles


@dataclass
class Plan:
    """What one node fetches for one version: URL -> bytes (URLs name immutable things)."""

    urls: dict[str, int] = field(default_factory=dict)
    lacking: int = 0           # bytes of objects the node lacked
    present: int = 0           # bytes of the version's objects already held

    @property
    def bytes(self) -> int:
        return sum(self.urls.values())

    @property
    def requests(self) -> int:
        return len(self.urls)


def fetch_plan(s: Scan, pub: Published, held: set[str], k: int) -> Plan:
    """Version ``k`` (``s``) on a node holding ``held``: plan_fetch's rule over the tree's
    packs and, when the version has a full set, over it; the cheaper by bytes plus
    REQUEST_COST a request."""
    plan = Plan({f"registry.json@{s.version}": REGISTRY_JSON,   # one cached copy per rollout
                 f"trees/{s.version}": s.tree_bytes})
    sizes: dict[str, int] = {}
    for d, (n, big) in s.objects.items():
        if d in held:
            plan.present += n
            continue
        plan.lacking += n
        if big:
            plan.urls[f"objects/{d}"] = n
        else:
            sizes[d] = n
    best = _greedy(pub.loc[k], pub, sizes, set(sizes))
    if pub.full[k]:
        full_loc = {d: p for p in pub.full[k] for d in pub.packs[p]}
        other = _greedy(full_loc, pub, sizes, set(sizes))
        if other[0] + REQUEST_COST * other[1] < best[0] + REQUEST_COST * best[1]:
            best = other
    plan.urls.update((f"packs/{p}", pub.pack_bytes[p]) for p in best[2])
    plan.urls.update((f"objects/{d}", sizes[d]) for d in best[3])
    return plan


# ---------------------------------------------------------------- the fleet
def _union(plans: Iterable[Plan]) -> tuple[int, int]:
    """Bytes and requests at the origin behind an ideal cache: each URL once."""
    urls: dict[str, int] = {}
    for p in plans:
        urls.update(p.urls)
    return sum(urls.values()), len(urls)


def simulate(scans: list[Scan], tar_sizes: list[int]) -> dict[str, object]:
    """Per version: update and cold plans; per node count: origin bytes/requests (a)-(d)."""
    pub = publish(scans)
    held: set[str] = set()
    updates: list[Plan] = []
    rows: list[dict[str, object]] = []
    for s, tar in zip(scans, tar_sizes, strict=True):
        k = len(rows)
        up = fetch_plan(s, pub, held, k)
        cold = fetch_plan(s, pub, set(), k)
        held |= set(s.objects)
        updates.append(up)
        rows.append({"version": s.version, "tar": tar, "objects": len(s.objects),
                     "stored": sum(n for n, _b in s.objects.values()), "tree": s.tree_bytes,
                     "update_bytes": up.bytes, "update_requests": up.requests,
                     "update_present": up.present, "cold_bytes": cold.bytes,
                     "cold_requests": cold.requests,
                     "packs": len(pub.packs_of_version[k]), "full_packs": len(pub.full[k]),
                     "full_bytes": sum(pub.pack_bytes[p] for p in pub.full[k])})
    once, once_req = _union(updates)
    per_node = sum(p.bytes for p in updates)
    tars, m = sum(tar_sizes), len(scans)
    fleet = [{"nodes": n,
              "a": n * (tars + m * REGISTRY_JSON), "a_req": n * 2 * m,
              "b": tars + m * REGISTRY_JSON, "b_req": 2 * m,
              "c": n * per_node, "c_req": n * sum(p.requests for p in updates),
              "d": once, "d_req": once_req}
             for n in NODES]
    objects: dict[str, int] = {}
    for s in scans:
        objects.update((d, n) for d, (n, _b) in s.objects.items())
    full = {p for f in pub.full for p in f}
    storage = {"tarballs": tars, "objects": sum(objects.values()),
               "delta_packs": sum(n for p, n in enumerate(pub.pack_bytes) if p not in full),
               "full_sets": sum(pub.pack_bytes[p] for p in full),
               "trees": sum(s.tree_bytes for s in scans)}
    return {"model": MODEL, "pack_max": PACK_MAX, "request_cost": REQUEST_COST,
            "full_trigger": FULL_TRIGGER, "versions": rows, "fleet": fleet, "storage": storage}


def rollout(sim: dict[str, object], k: int, nodes: int = 1_000) -> dict[str, int]:
    """Origin bytes when ``nodes`` nodes holding versions < k update to version k."""
    r = sim["versions"][k]  # type: ignore[index]
    return {"a": nodes * r["tar"], "b": r["tar"], "c": nodes * r["update_bytes"],
            "d": r["update_bytes"], "lan_b": nodes * r["tar"],
            "lan_d": nodes * r["update_bytes"]}


def cached_simulation(cache: Path, versions: list[tuple[str, Path, int]],
                      log: object = None) -> dict[str, object]:
    """``simulate`` over ``(version, extracted runtime dir, tarball size)``, cached per set."""
    key = cache / "fleetsim" / f"sim-m{MODEL}-{'_'.join(v for v, _r, _t in versions)}.json"
    if key.is_file():
        return dict(json.loads(key.read_text()))
    scans = cached_scans(cache, [(v, r) for v, r, _t in versions], log)
    sim = simulate(scans, [t for _v, _r, t in versions])
    key.write_text(json.dumps(sim, indent=1))
    return sim


# ---------------------------------------------------------------- presentation
def storage_line(sim: dict[str, object]) -> str:
    """What the origin stores for the series, by kind."""
    st: dict[str, int] = sim["storage"]  # type: ignore[assignment]
    parts = ", ".join(f"{k.replace('_', ' ')} {fmt(v, 'B')}" for k, v in st.items())
    form = sum(v for k, v in st.items() if k != "tarballs")
    return (f"Origin storage: {parts}; the content-addressed form is "
            f"{form / st['tarballs']:.2f}x the tarballs ({st['full_sets'] / st['tarballs']:.2f}x "
            "of it the full sets).")


def version_table(sim: dict[str, object]) -> str:
    rows = ["| version | .tar.gz | objects (stored) | tree | update: fetched | of .tar.gz | "
            "update requests | cold: fetched | of .tar.gz | cold requests | full set |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sim["versions"]:  # type: ignore[attr-defined]
        rows.append(f"| {r['version']} | {fmt(r['tar'], 'B')} | {r['objects']:,} "
                    f"({fmt(r['stored'], 'B')}) | {fmt(r['tree'], 'B')} | "
                    f"{fmt(r['update_bytes'], 'B')} | {r['update_bytes'] / r['tar']:.3f} | "
                    f"{r['update_requests']:,} | {fmt(r['cold_bytes'], 'B')} | "
                    f"{r['cold_bytes'] / r['tar']:.3f} | {r['cold_requests']:,} | "
                    f"{fmt(r['full_bytes'], 'B') if r['full_packs'] else '-'} |")
    return "\n".join(rows)


def fleet_table(sim: dict[str, object]) -> str:
    rows = ["| nodes | (a) tarballs, no cache | (b) tarballs, one cache | "
            "(c) content-addressed, no cache | (d) content-addressed, one cache |",
            "|---|---|---|---|---|"]
    for r in sim["fleet"]:  # type: ignore[attr-defined]
        cells = [f"{fmt(r[k], 'B')} / {r[k + '_req']:,} req" for k in "abcd"]
        rows.append(f"| {r['nodes']:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chart(sim: dict[str, object]) -> str:
    """Origin bytes vs nodes for (a)-(d), log-log: ``benchmarks/charts/fleet.png``."""
    from .report import _plt, _save

    plt = _plt()
    fleet = sim["fleet"]
    xs = [r["nodes"] for r in fleet]  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, style, label in (("a", "o-", "(a) tarballs, no cache"),
                            ("b", "s--", "(b) tarballs, one shared cache"),
                            ("c", "D-", "(c) content-addressed, no cache"),
                            ("d", "^--", "(d) content-addressed, one shared cache")):
        ax.plot(xs, [r[k] / 1e9 for r in fleet], style, label=label)  # type: ignore[attr-defined]
    vs = [r["version"] for r in sim["versions"]]  # type: ignore[attr-defined]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("origin bytes (GB)")
    ax.set_title(f"Rolling out {vs[0]} … {vs[-1]} to every node (simulated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, "fleet.png")


def main(argv: list[str] | None = None) -> int:
    from .series import DEFAULT_CACHE, ensure_series

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleetsim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args(argv)
    s = ensure_series(a.cache, quick=a.quick)
    sim = cached_simulation(a.cache, [(v.version, Path(v.extracted), v.tar_size)
                                      for v in s.versions],
                            lambda m: print(m, file=sys.stderr))
    print(version_table(sim), storage_line(sim), fleet_table(sim), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
