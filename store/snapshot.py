"""The published summary: what users who may not open the index read instead.

Only those who may write a store open its index (root, its admin group, a private store's
owner; ``access.may_open_index``). Anyone who can open a file can lock it, and SQLite's
writers need the index's locks, so an index readable by everyone lets anyone stall every
install, gc and mount lease (issue 10). Everyone else reads a summary that writers publish:

    STORE/public/               (store dir mode & 2070) | 0755: readable by everyone
    STORE/public/summary.json   0644, replaced atomically (temp file + rename); never locked
    STORE/publish.lock          0660: refreshes take it EXCLUSIVE; only admins can open it

The summary holds per-version figures only (name, version, description, file/dir/symlink
counts, logical/stored/unique bytes, installed/last used, pinned, source, checksum, and
runtime.yml when other users could read it through the mount) and the ``df`` figures. It
has no per-file rows, so it shows no name, size or digest of a file a user could not list
through the mount. It is refreshed when a Store that changed the index closes (install,
import, rm, gc, pin, verify --repair; not leases) and by ``jbl setup --system``; one refresh
is a read transaction (two scans of the index's entries), a JSON encode and a rename, and
rewrites nothing when the content is unchanged.

Why a lock: a refresh that read the index before another writer's commit must not replace
the summary after that writer's refresh. Refreshes run after the writer's own locks are
released, so no install or gc ever waits for one; a refresh waits at most ``LOCK_WAIT``
for another and otherwise leaves the summary to it (with a warning).

Readers (``load``) open the store dir, ``public`` and the summary relative to directory fds
with O_NOFOLLOW | O_NONBLOCK, check with fstat that it is a regular file no other user may
write, and read at most ``MAX_BYTES``. Writers open everything the same way (an admin-group
member may plant links in ``public``; root's refresh never follows them).

Thread-safety: ``publish`` uses the Store's connection (same thread rule); ``load`` is pure
file reading, safe anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report
from .errors import NotInstalled, PermissionDenied, StoreError
from .store import Store
from .versions import Spec, parse_spec, select

FORMAT = 1
PUBLIC_DIR = "public"
SUMMARY_NAME = "summary.json"
LOCK_NAME = "publish.lock"
MAX_BYTES = 64 << 20  # ~10k versions with their runtime.yml; far above any real store
LOCK_WAIT = 10.0      # seconds a refresh waits for another refresh before leaving it be
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


# --- building (writers) ----------------------------------------------------------------------
def _hidden_manifests(store: Store) -> set[int]:
    """Versions whose runtime.yml other users could not read through the mount (the version
    directory not searchable, or runtime.yml not a regular file readable by others)."""
    hidden: set[int] = set()
    for vid, root_mode, yml_kind, yml_mode in store.db.query(
            "SELECT v.id, r.mode, y.kind, y.mode FROM versions v "
            "LEFT JOIN entries r ON r.id = v.root_id "
            "LEFT JOIN entries y ON y.parent_id = v.root_id AND y.name = ?",
            (b"runtime.yml",)):
        if (root_mode is None or not root_mode & stat.S_IXOTH or yml_kind != stat.S_IFREG
                or not yml_mode & stat.S_IROTH):
            hidden.add(vid)
    return hidden


# What a version's summary computes once and then carries from one summary to the next: a
# version's tree and runtime.yml never change, so only these are worth keeping (parsing each
# runtime.yml again would cost ~4 ms a version per refresh).
_IMMUTABLE = ("description", "mounts", "environment", "manifest_extra", "manifest",
              "manifest_hidden", "files", "directories", "symlinks", "logical_bytes",
              "stored_bytes", "source", "checksum")


def _key(d: dict[str, Any]) -> tuple[Any, ...]:
    """Identifies one install of a version (a reinstall has a new ``installed_at``)."""
    return (d.get("name"), d.get("version"), d.get("installed_at"))


def build(store: Store, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary document, from one consistent read of the index. ``previous`` (the last
    summary, if any) supplies the per-version facts that cannot have changed."""
    old: dict[tuple[Any, ...], dict[str, Any]] = {}
    if (isinstance(previous, dict) and previous.get("format") == FORMAT
            and isinstance(previous.get("versions"), list)):
        old = {_key(d): d for d in previous["versions"] if isinstance(d, dict)
               and all(k in d for k in _IMMUTABLE)}
    db = store.db
    own_txn = db.conn.getautocommit()
    if own_txn:  # one WAL read snapshot for every query below
        db.execute("BEGIN")
    try:
        share = report.sharing(store)
        hidden = _hidden_manifests(store)
        versions = []
        for v in store.versions():
            mutable = {"unique_bytes": share.by_version.get(v.id, 0), "pinned": v.pinned,
                       "last_used_at": v.last_used_at,
                       "in_use_by": None,  # live holders (pids) are for admins only
                       "owners": None}     # recorded uid:gid counts (report), for admins
            known = old.get((v.name, v.version, v.installed_at))
            if known is not None:
                d = {"name": v.name, "version": v.version, "installed_at": v.installed_at,
                     **{k: known[k] for k in _IMMUTABLE}, **mutable}
                versions.append(d)
                continue
            d = report.version_facts(v, kinds=report.entry_kinds(store, v.id).get(v.id, {}),
                                     stored=report.stored_sizes(store, v.id).get(v.id, 0),
                                     unique=0, missing=report.missing_sources(store, v))
            d.update(mutable, manifest_hidden=v.id in hidden)
            if v.id in hidden:
                d.update(manifest=None, mounts=[], environment={}, manifest_extra={})
            versions.append(d)
        df = report.disk_usage(store, share)
        df.pop("removed_held", None)  # who holds a removed version (pids): for admins only
    finally:
        if own_txn:
            db.execute("COMMIT")
    return {"format": FORMAT, "versions": versions, "df": df}


def _open_dir(parent: int | None, name: str | os.PathLike[str], *, create_mode: int | None = None
              ) -> int:
    if create_mode is not None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            create_mode = None
        else:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            os.fchmod(fd, create_mode)  # exact, whatever the umask; setgid kept from the store
            return fd
    return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _lock(store_fd: int) -> int | None:
    """The refresh lock, held (fd), or None if another refresh held it for LOCK_WAIT."""
    fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_CREAT | _FILE_FLAGS, 0o660, dir_fd=store_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{LOCK_NAME} in the store is not a regular file")
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o660:
            os.fchmod(fd, 0o660)  # whatever the umask: every admin opens it, nobody else
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)  # flock has no timeout; refreshes last milliseconds
    except BaseException:
        os.close(fd)
        raise


def publish(store: Store) -> bool:
    """Refresh ``STORE/public/summary.json``; True if its content changed."""
    store_fd = os.open(store.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lock = _lock(store_fd)
        if lock is None:
            raise StoreError(f"another refresh held {store.dir / LOCK_NAME} for "
                             f"{LOCK_WAIT:.0f} s")
        try:
            mode = (os.fstat(store_fd).st_mode & 0o2070) | 0o755
            pub = _open_dir(store_fd, PUBLIC_DIR, create_mode=mode)
            try:
                try:
                    current = _read_summary(pub)[0]
                    previous = None if current is None else json.loads(current)
                except (OSError, StoreError, ValueError, RecursionError):  # planted or broken
                    current = previous = None
                doc = build(store, previous)
                if previous is not None and _stable(previous) == _stable(doc):
                    return False
                _replace(pub, json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                         default=str).encode())
                return True
            finally:
                os.close(pub)
        finally:
            os.close(lock)
    finally:
        os.close(store_fd)


# df figures that move with every checkpoint of the index's WAL: a summary that differs only
# in these is not rewritten (so `jbl setup --system` run twice changes nothing).
_VOLATILE_DF = ("index_bytes", "physical_bytes", "ratio", "saved_bytes")


def _stable(doc: Any) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get("df"), dict):
        return doc
    df = {k: v for k, v in doc["df"].items() if k not in _VOLATILE_DF}
    return json.loads(json.dumps({**doc, "df": df}, default=str))  # as it reads back


def _replace(pub: int, data: bytes) -> None:
    tmp = f".{SUMMARY_NAME}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644, dir_fd=pub)
    try:
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # rename after the data is down: never an empty summary after a crash
        finally:
            os.close(fd)
        os.rename(tmp, SUMMARY_NAME, src_dir_fd=pub, dst_dir_fd=pub)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=pub)
        raise


# --- reading (everyone) ----------------------------------------------------------------------
def _read_summary(pub: int) -> tuple[bytes | None, float]:
    """(bytes, mtime) of the summary in the open ``public`` dir; (None, 0) if there is none."""
    try:
        fd = os.open(SUMMARY_NAME, os.O_RDONLY | _FILE_FLAGS, dir_fd=pub)
    except FileNotFoundError:
        return None, 0.0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IWOTH:
            raise StoreError("it is not a regular file that only the store's admins may "
                             "write; not reading it")
        if st.st_size > MAX_BYTES:
            raise StoreError(f"it is {st.st_size} bytes, over the {MAX_BYTES >> 20} MiB limit")
        chunks, left = [], MAX_BYTES + 1
        while left > 0 and (b := os.read(fd, min(left, 1 << 20))):
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks), st.st_mtime
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Summary:
    """A loaded summary: the installed versions (``info`` dicts) and the ``df`` figures."""

    path: Path
    refreshed_at: float
    versions: list[dict[str, Any]] = field(default_factory=list)
    df: dict[str, Any] = field(default_factory=dict)

    def list_rows(self) -> list[dict[str, Any]]:
        return [{k: v[k] for k in report.LIST_KEYS} for v in self.versions]

    def resolve(self, spec: str | Spec) -> dict[str, Any]:
        """The version ``spec`` names (``NAME``, ``NAME@latest``, ``NAME@1.3``), as info."""
        s = parse_spec(spec) if isinstance(spec, str) else spec
        mine = {v["version"]: v for v in self.versions if v["name"] == s.name}
        hint = f"install it with: jbl store install {s}"
        if not mine:
            raise NotInstalled(f"runtime {s} is not installed", hint=hint)
        try:
            return mine[select(s, mine, where="installed")]
        except NotInstalled:
            raise
        except Exception as e:
            raise NotInstalled(str(e), hint=hint) from None


def _unusable(path: Path, why: str) -> StoreError:
    return StoreError(f"cannot read the store's public summary {path}: {why}",
                      hint="an admin can rebuild it with any store change or "
                           "`jbl setup --system`")


def load(store_dir: Path | str) -> Summary:
    """Read the published summary of ``store_dir`` (no locks, no index)."""
    store_dir = Path(store_dir)
    path = store_dir / PUBLIC_DIR / SUMMARY_NAME
    if not (store_dir / "index.db").exists():
        raise StoreError(f"no jbl store at {store_dir} (install a runtime first, or pass --store)")
    try:
        store_fd = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pub = os.open(PUBLIC_DIR, _DIR_FLAGS, dir_fd=store_fd)
        finally:
            os.close(store_fd)
        try:
            data, mtime = _read_summary(pub)
        except StoreError as e:
            raise _unusable(path, e.message) from None
        finally:
            os.close(pub)
    except FileNotFoundError:
        data, mtime = None, 0.0
    except PermissionError as e:
        raise PermissionDenied(f"cannot read {path}: {e.strerror}",
                               hint="ask an admin to run `jbl setup --system`") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unusable(path, "it is not a plain directory and file") from None
        raise _unusable(path, e.strerror or str(e)) from None
    if data is None:
        raise _unusable(path, "it does not exist yet (only root and the store's admin group "
                        "may open the index itself)")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise _unusable(path, f"not valid JSON ({str(e)[:80]})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or fmt != FORMAT:
        raise _unusable(path, f"unknown format {fmt!r} (written by another jbl version?)")
    versions, df = doc.get("versions"), doc.get("df")
    if not isinstance(versions, list) or not isinstance(df, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str)
            and isinstance(v.get("version"), str) for v in versions):
        raise _unusable(path, "malformed")
    return Summary(path, mtime, versions, df)
