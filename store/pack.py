"""Publishing: a runtime directory -> a deterministic tarball; tarballs -> ``registry.json``.

``pack(DIR, OUT)`` writes a pax tar (gzip, zstd or none) that is byte-for-byte the same for
the same directory: ``runtime.yml`` first (so a reader learns name@version before any file
body), then every other entry depth-first in byte order of names; numeric owners as in the
directory (no user/group names), nanosecond mtimes in pax ``mtime`` records (whole seconds
in the ustar field for old readers), hardlinks as links to the first name in that order,
gzip header mtime 0 and no file name. The directory itself is not a member (its entry in the
store is implied: mode 0755, root-owned). Sockets, devices and FIFOs are left out with a
warning (ingest would drop them anyway); non-UTF-8 names are refused (ingest would too).

``registry_add(DIR, TARBALLS)`` writes or updates ``DIR/registry.json`` in Joblet's format,
checking each tarball exactly as ingest would (``ingest.inspect``) so nothing unusable is
ever published; tarballs outside DIR are copied in, ``download_url`` is relative to the
registry (or under ``base_url``). Each version is also published in content-addressed form
(store/caspublish.py: objects, packs, its tree; registry.json's ``tree`` key names it),
written before registry.json, which is written last. The document is built and checked by
store/regformat.py, the model the installer reads it with. Every file is written to a temp
name and renamed; registry.json is fsync'd after one syncfs of everything before it.

Pure apart from the files it reads and writes; not meant for concurrent use on one DIR.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import zstandard

from .caspublish import Publisher
from .digest import file_checksum
from .errors import UnsafeArchive, UsageError
from .ingest import inspect
from .manifest import MANIFEST_NAME, ROOTFS_DIR, Manifest, parse_manifest
from .regformat import INDEX_NAME, dump_registry, entry_doc, host_platforms, parse_registry
from .transport import DirTarget, Fetcher
from .versions import sort_versions

COMPRESSIONS = {"gz": ".tar.gz", "zst": ".tar.zst", "none": ".tar"}
GZIP_LEVEL = 6
ZSTD_PACK_LEVEL = 9
REGISTRY_FILE = INDEX_NAME
_PLATFORM_RE = re.compile(r"[a-z0-9][a-z0-9._]*-[a-z0-9_]+")  # always fullmatch (no "\n")


@dataclass
class PackResult:
    path: Path
    manifest: Manifest
    checksum: str
    size: int
    entries: int
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ atomic files
@contextmanager
def atomic_write(dest: Path) -> Iterator[IO[bytes]]:
    """Write ``dest`` via a temp file in its directory: fsync, rename, fsync the directory."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    f = open(tmp, "xb")  # noqa: SIM115 - closed before the rename, or on failure
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, dest)
        dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ pack
def _walk(root: Path, warnings: list[str]) -> Iterator[tuple[str, Path]]:
    """(archive name, path) depth-first, names in byte order; runtime.yml first."""
    yield MANIFEST_NAME, root / MANIFEST_NAME

    def visit(d: Path, rel: str) -> Iterator[tuple[str, Path]]:
        with os.scandir(d) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        for raw in names:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                shown = raw.decode("utf-8", "backslashreplace")
                raise UsageError(f"{d / shown}: file name is not UTF-8 (jbl refuses such "
                                 "names in a runtime)") from None
            arc = f"{rel}/{name}" if rel else name
            if arc == MANIFEST_NAME:
                continue
            p = d / name
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                yield arc, p
                yield from visit(p, arc)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield arc, p
            else:
                warnings.append(f"left out (not a file, directory or symlink): {arc!r}")

    yield from visit(root, "")


def _mtime(ti: tarfile.TarInfo, ns: int) -> None:
    ti.mtime = ns // 1_000_000_000
    if ns % 1_000_000_000 or ns < 0:
        sign, a = ("-", -ns) if ns < 0 else ("", ns)
        # typeshed declares pax_headers a read-only Mapping: replace it rather than index it
        ti.pax_headers = {**ti.pax_headers,
                          "mtime": f"{sign}{a // 1_000_000_000}.{a % 1_000_000_000:09d}"}


def pack(src: Path, out: Path, compress: str = "gz") -> PackResult:
    src = Path(src)
    if compress not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compress!r}: use gz, zst or none")
    if not src.is_dir():
        raise UsageError(f"{src} is not a runtime directory")
    mpath = src / MANIFEST_NAME
    if not mpath.is_file() or mpath.is_symlink():
        raise UsageError(f"{src} has no {MANIFEST_NAME} (a runtime directory holds "
                         f"{MANIFEST_NAME} and {ROOTFS_DIR}/)")
    text = mpath.read_bytes()
    try:
        manifest = parse_manifest(text, source=str(mpath))
    except UnsafeArchive as e:
        raise UsageError(e.reason + (f": {e.member!r}" if e.member else "")) from None
    if not (src / ROOTFS_DIR).is_dir():
        raise UsageError(f"{src} has no {ROOTFS_DIR}/ directory (the runtime's root filesystem)")
    out = Path(out)
    if out.resolve().is_relative_to(src.resolve()):
        raise UsageError(f"the output {out} must not be inside the runtime directory {src}")
    warnings: list[str] = []
    entries = 0
    with atomic_write(out) as raw:
        comp: Any
        if compress == "gz":
            comp = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                 compresslevel=GZIP_LEVEL)
        elif compress == "zst":
            comp = zstandard.ZstdCompressor(level=ZSTD_PACK_LEVEL, write_checksum=True) \
                .stream_writer(raw, closefd=False)
        else:
            comp = raw
        with tarfile.open(fileobj=comp, mode="w", format=tarfile.PAX_FORMAT,
                          dereference=False) as tar:
            for arc, path in _walk(src, warnings):
                ti = tar.gettarinfo(str(path), arcname=arc)
                st = path.lstat()
                ti.uname = ti.gname = ""
                _mtime(ti, st.st_mtime_ns)
                if ti.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
                entries += 1
        if comp is not raw:
            comp.close()
    checksum, size = file_checksum(out)
    return PackResult(out, manifest, checksum, size, entries, warnings)


# ------------------------------------------------------------------------------ registry
def _load_registry(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": "1", "updated_at": "", "runtimes": {}}
    data = path.read_bytes()
    parse_registry(data, path.resolve().as_uri())  # the installer's checks, nothing else
    doc: dict[str, Any] = json.loads(data)
    return doc


def _url_in(doc: dict[str, Any], url: str, but: tuple[str, str]) -> str | None:
    for name, vers in doc["runtimes"].items():
        for ver, e in vers.items():
            if (name, ver) != but and isinstance(e, dict) and e.get("download_url") == url:
                return f"{name}@{ver}"
    return None


def _add_tarballs(pub: Publisher, doc: dict[str, Any], reg_dir: Path, tarballs: list[Path],
                  plats: list[str], base_url: str | None) -> list[dict[str, Any]]:
    """Copy each tarball into the registry, publish its content-addressed form and set its
    entry in ``doc``; return the entries."""
    added: list[dict[str, Any]] = []
    for tb in tarballs:
        tb = Path(tb)
        if not tb.is_file():
            raise UsageError(f"no such tarball: {tb}")
        info = inspect(tb)
        name, ver = info.manifest.name, info.manifest.version
        fname = tb.name
        url = f"{base_url.rstrip('/')}/{quote(fname)}" if base_url else quote(fname)
        dest = reg_dir / fname
        if tb.resolve() != dest.resolve():
            if dest.exists() and file_checksum(dest)[0] != info.checksum and \
                    (other := _url_in(doc, url, (name, ver))):
                raise UsageError(f"{dest} already exists and is {other}'s download; rename "
                                 f"{tb.name} before adding it")
            with open(tb, "rb") as fin, atomic_write(dest) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        before = dict(pub.written)
        entry = entry_doc(ver, info.manifest.description, url, info.checksum, info.size,
                          plats, pub.publish(dest))
        doc["runtimes"].setdefault(name, {})[ver] = entry
        added.append({"name": name, **entry,
                      "published": {k: v - before[k] for k, v in pub.written.items()}})
    return added


def checked_platforms(platforms: list[str] | None) -> list[str]:
    """``--platform`` values (default: this host's), each DISTRO-ARCH, else UsageError."""
    plats = platforms or host_platforms()
    for p in plats:
        if not _PLATFORM_RE.fullmatch(p):
            raise UsageError(f"invalid platform {p!r}: expected DISTRO-ARCH, e.g. ubuntu-amd64")
    return plats


def finish_doc(doc: dict[str, Any]) -> None:
    """Stamp ``doc`` (a registry.json being written) and sort its names and versions."""
    doc["version"] = "1"
    doc["updated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds") \
        .replace("+00:00", "Z")
    doc["runtimes"] = {n: {v: doc["runtimes"][n][v] for v in sort_versions(doc["runtimes"][n])}
                       for n in sorted(doc["runtimes"])}


def registry_add(reg_dir: Path, tarballs: list[Path], *, platforms: list[str] | None = None,
                 base_url: str | None = None) -> list[dict[str, Any]]:
    """Add (or replace) each tarball's entry in ``reg_dir/registry.json``; return the entries.
    (An S3 bucket: store/bucketpublish.py.)"""
    reg_dir = Path(reg_dir)
    plats = checked_platforms(platforms)
    if reg_dir.exists() and not reg_dir.is_dir():
        raise UsageError(f"--registry {reg_dir} must be a directory")
    reg_dir.mkdir(parents=True, exist_ok=True)
    reg_path = reg_dir / REGISTRY_FILE
    doc = _load_registry(reg_path)
    with Fetcher([str(reg_dir.resolve())]) as published, \
            Publisher(DirTarget(str(reg_dir)), published) as pub:
        pub.learn(doc)
        added = _add_tarballs(pub, doc, reg_dir, tarballs, plats, base_url)
        pub.target.sync()  # objects, packs and trees are durable before registry.json names them
    finish_doc(doc)
    data = dump_registry(doc, reg_path.resolve().as_uri())  # refused here, not at install
    with atomic_write(reg_path) as f:
        f.write(data)
    return added
