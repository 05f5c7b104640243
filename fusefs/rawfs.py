"""The raw FUSE engine: the store's read-only tree served by reading /dev/fuse directly.

The same tree and rules as the pyfuse3 engine (``core.py`` over ``tree.py``: lookups and
negative entries, listings and their offsets, read plans, statfs, index polling; same errno
rules, docs/mount.md), but speaking the kernel protocol itself
(``kernel.py``) so it can use what pyfuse3 hides:

* **no-open / no-opendir**: OPEN and OPENDIR answer ENOSYS once; from then on the kernel
  opens files and directories without asking (every request carries its nodeid, so READ
  and READDIR need no handle) and gives each such file ``FOPEN_KEEP_CACHE`` and each such
  directory ``FOPEN_CACHE_DIR`` (fs/fuse/file.c ``fuse_file_open``): page cache kept AND
  directory listings cached in the kernel. No RELEASE/RELEASEDIR follow either.
* long entry/attr timeouts and cached negative lookups below a version (immutable content);
  1 s for the top two levels, which are also invalidated when the index changes
  (INVAL_ENTRY for names that came or went, INVAL_INODE for the listing that changed).
* READs up to 1 MiB (``max_pages`` 256), READDIRPLUS (attributes with the names),
  cached symlinks.

Structure: ONE request thread (``serve_forever``) reads requests and runs every handler
synchronously: SQLite (``View``'s connection) and the inode table live on it, no locks.
Handlers return the reply payload, raise ``Errno`` for an expected error, or return
``DEFERRED`` when someone else will reply: a READ that must wait for the disk or decode a
big chunk goes to the read pool (its worker writes the reply), a LOOKUP/READDIRPLUS that
hands out a version's top directory waits for the lease worker. Writing a reply is one
``writev`` on /dev/fuse, which is atomic, so any thread may do it. Notifications go through
their own thread: written from the request thread they could deadlock (the kernel takes the
parent directory's lock, which a LOOKUP waiting for this very thread may hold).

Errors: nothing escapes a handler: ``Errno`` is answered as is, anything else through
``errnos.logged_errno`` (store errors by table, IntegrityError = EIO + a log line naming the
blob, surprises = EIO + traceback); every modifying opcode is EROFS, unknown ones ENOSYS.

Counters: ``stats`` (requests per opcode) and ``busy_ns`` (nanoseconds per opcode on the
request thread, and in the read pool as "read_thread"), logged on ``kill -USR1``.

Thread-safety: see above; ``View.read_piece`` is the only thing the read pool runs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from jbl.store.view import ChunkRef, Piece, View

from . import kernel as K
from .core import Core, Negative
from .errnos import Errno, logged_errno
from .inodes import ENTRY, ROOT_INODE, Node, entry_key
from .leases import ThreadLeaseKeeper
from .tree import WATCH_PERIOD, TopChange

log = logging.getLogger("jbl.fusefs")

READ_THREADS = 4
PREFETCH_THREADS = 2  # read-ahead at LOOKUP, beside the read pool (which serves real READs)
PREFETCH_SLOTS = 8    # read-aheads in flight at most: beyond, a lookup is not read ahead
NEXT_OFF_MAX = 1024   # files whose last READ end is remembered (sequential read-ahead)
BUFSIZE = (K.MAX_PAGES_WANTED << 12) + 65536  # the largest request (a WRITE) + headers
DEFERRED = None     # a handler's "the reply is on its way from another thread"
_HDR = K.IN_HEADER.size


def _attr(ino: int, kind: int, mode: int, nlink: int, uid: int, gid: int, size: int,
          mtime_ns: int) -> tuple[int, ...]:
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    sec &= (1 << 64) - 1  # before 1970: the kernel reads the u64 back as s64
    return (ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
            kind | (mode & 0o7777), nlink, uid, gid, 0, 4096, 0)


def _replies(ino: int, kind: int, mode: int, nlink: int, uid: int, gid: int, size: int,
             mtime_ns: int, attr_timeout: int, entry_timeout: int) -> tuple[bytes, bytes]:
    """The tree's ``AttrMaker`` for this engine: (fuse_entry_out, fuse_attr_out), packed
    once per node."""
    attr = _attr(ino, kind, mode, nlink, uid, gid, size, mtime_ns)
    return (K.ENTRY_OUT.pack(attr[0], 0, entry_timeout, attr_timeout, 0, 0, *attr),
            K.ATTR_OUT.pack(attr_timeout, 0, 0, *attr))


def _entry_out(node: Node) -> bytes:
    return node.attr[0]  # type: ignore[index,no-any-return]


def _attr_out(node: Node) -> bytes:
    return node.attr[1]  # type: ignore[index,no-any-return]


def _negative(timeout: int) -> bytes:
    return K.ENTRY_OUT.pack(0, 0, timeout, 0, 0, 0, *([0] * 16))


class RawFS:
    def __init__(self, view: View, fd: int, leases: ThreadLeaseKeeper | None = None,
                 read_threads: int = READ_THREADS) -> None:
        self.view = view
        self.fd = fd
        self.leases = leases
        self.core = Core(view, _replies, self._on_change)
        self.tree = self.core.tree
        self.table = self.core.table
        self.pool = ThreadPoolExecutor(read_threads, thread_name_prefix="jbl-read")
        self.stats: dict[str, int] = {}     # requests per opcode (+ "read_thread")
        # nanoseconds spent per opcode on the request thread, and by the read pool
        # ("read_thread": disk waits included): where a slow import's time goes (USR1 logs it)
        self.busy_ns: dict[str, int] = {}
        self._busy_lock = threading.Lock()  # the read pool adds to busy_ns too
        self.stopping = False
        self.tick: Callable[[], None] | None = None  # extra periodic work (parent watch)
        self.requester = (0, 0)  # (uid, pid) of the request being handled: noted on leases
        self._notes: queue.Queue[bytes | None] = queue.Queue()
        self._notifier = threading.Thread(target=self._notify_loop, name="jbl-notify",
                                          daemon=True)
        h = self._handlers = {
            K.INIT: self.op_init, K.LOOKUP: self.op_lookup, K.FORGET: self.op_forget,
            K.BATCH_FORGET: self.op_batch_forget, K.GETATTR: self.op_getattr,
            K.READLINK: self.op_readlink, K.READ: self.op_read, K.READDIR: self.op_readdir,
            K.READDIRPLUS: self.op_readdirplus, K.STATFS: self.op_statfs,
            K.RELEASE: self.op_ok, K.RELEASEDIR: self.op_ok, K.INTERRUPT: self.op_interrupt,
            K.DESTROY: self.op_destroy,
        }
        # ENOSYS makes the kernel stop sending these: OPEN/OPENDIR (no-open: see the module
        # docstring), FLUSH, FSYNC, GETXATTR/LISTXATTR (EOPNOTSUPP to callers), ACCESS
        # (default_permissions decides), LSEEK, STATX... -- the default for unknown opcodes.
        for op in K.MODIFYING:
            h[op] = self.op_erofs
        # Answered at once without a handler: IOCTL reaches us for every isatty() on a file
        # (Python's open() asks), and the kernel never caches its ENOSYS (fs/fuse/ioctl.c
        # turns it into ENOTTY per call), so it gets the cheapest path there is.
        self._quick = {K.IOCTL: errno.ENOTTY, K.OPEN: errno.ENOSYS, K.OPENDIR: errno.ENOSYS}
        self._names = K.OPCODE_NAMES
        self.prefetch_pool = ThreadPoolExecutor(PREFETCH_THREADS,
                                                thread_name_prefix="jbl-prefetch")
        self._prefetch_slots = threading.BoundedSemaphore(PREFETCH_SLOTS)
        self._warming: set[bytes] = set()  # digests queued to the prefetch pool
        self._next_off: dict[int, int] = {}  # inode -> where its last READ ended

    # --- the request loop ---------------------------------------------------------------
    def serve_forever(self, wakeup_fd: int | None = None) -> None:
        """Serve until unmounted (ENODEV), DESTROY, or ``stopping`` (checked between
        requests and when ``wakeup_fd`` — a signal wakeup pipe — becomes readable)."""
        os.set_blocking(self.fd, False)
        self._notifier.start()
        buf = bytearray(BUFSIZE)
        mv = memoryview(buf)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if wakeup_fd is not None:
            poller.register(wakeup_fd, select.POLLIN)
        next_tick = time.monotonic() + WATCH_PERIOD
        try:
            while not self.stopping:
                try:
                    n = os.readv(self.fd, [buf])
                except BlockingIOError:
                    left = next_tick - time.monotonic()
                    if left > 0:
                        for fd, _ev in poller.poll(left * 1000):
                            if fd == wakeup_fd:
                                os.read(wakeup_fd, 512)
                    n = 0
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:  # the request was interrupted and is gone
                        continue
                    if e.errno == errno.ENODEV:  # unmounted
                        log.info("the kernel closed the connection (unmounted)")
                        return
                    raise
                if n:
                    self.dispatch(mv[:n])
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + WATCH_PERIOD
                    self._tick()
        finally:
            self._notes.put(None)
            self.prefetch_pool.shutdown(wait=True, cancel_futures=True)
            self.pool.shutdown(wait=True, cancel_futures=False)

    def dispatch(self, req: memoryview) -> None:
        length, op, unique, nodeid, uid, _gid, pid, _ext, _pad = K.IN_HEADER.unpack_from(req)
        self.requester = (uid, pid)
        name = self._names.get(op, str(op))
        self.stats[name] = self.stats.get(name, 0) + 1
        quick = self._quick.get(op)
        if quick is not None:
            self._write([K.OUT_HEADER.pack(K.OUT_HEADER.size, -quick, unique)])
            return
        t0 = time.perf_counter_ns()
        try:
            self._handle(op, name, unique, nodeid, req[_HDR:length])
        finally:
            self._busy(name, t0)

    def _handle(self, op: int, name: str, unique: int, nodeid: int, body: memoryview
                ) -> None:
        handler = self._handlers.get(op)
        try:
            if handler is None:
                if op in K.NO_REPLY:
                    return
                raise Errno(errno.ENOSYS)
            out = handler(unique, nodeid, body)
        except Errno as e:
            self.reply_error(unique, e.code)
            return
        except Exception as e:
            self.reply_error(unique, logged_errno(e, name))
            return
        if out is not None:
            self.reply(unique, out)

    def _busy(self, name: str, t0: int) -> None:
        ns = time.perf_counter_ns() - t0
        with self._busy_lock:
            self.busy_ns[name] = self.busy_ns.get(name, 0) + ns

    def reply(self, unique: int, *parts: bytes) -> None:
        size = K.OUT_HEADER.size + sum(len(p) for p in parts)
        self._write([K.OUT_HEADER.pack(size, 0, unique), *parts])

    def reply_error(self, unique: int, code: int) -> None:
        self._write([K.OUT_HEADER.pack(K.OUT_HEADER.size, -code, unique)])

    def _write(self, iov: list[bytes]) -> None:
        try:
            os.writev(self.fd, iov)
        except OSError as e:
            # ENOENT: the request was interrupted/aborted meanwhile; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("writing a reply to /dev/fuse: %s", e)

    def _tick(self) -> None:
        try:
            self.core.poll()
        except Exception as e:
            log.warning("checking the index for changes: %s", e)
        if self.tick is not None:
            self.tick()

    # --- notifications (own thread: see the module docstring) ---------------------------
    def _notify_loop(self) -> None:
        while (msg := self._notes.get()) is not None:
            try:
                os.write(self.fd, msg)
            except OSError as e:  # ENOENT: the kernel had nothing cached under that name
                if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                    log.warning("notifying the kernel: %s", e)

    def _inval_entry(self, parent: int, name: str) -> None:
        raw = name.encode("utf-8", "surrogateescape")
        body = K.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(raw), 0) + raw + b"\0"
        self._notes.put(K.OUT_HEADER.pack(K.OUT_HEADER.size + len(body),
                                          K.NOTIFY_INVAL_ENTRY, 0) + body)

    def _inval_inode(self, ino: int) -> None:
        body = K.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0)  # attrs + every cached page/listing
        self._notes.put(K.OUT_HEADER.pack(K.OUT_HEADER.size + len(body),
                                          K.NOTIFY_INVAL_INODE, 0) + body)

    # --- the top two levels -------------------------------------------------------------
    def _on_change(self, change: TopChange) -> None:
        """The index changed (``Core.poll``): invalidate what moved: the names
        (INVAL_ENTRY) and the cached listing of each directory that changed
        (INVAL_INODE)."""
        if change.names:
            self._inval_inode(ROOT_INODE)
        for name in change.names:
            self._inval_entry(ROOT_INODE, name)
        for ino, moved in change.moved.items():
            for ver in moved:
                self._inval_entry(ino, ver)
            self._inval_inode(ino)

    # --- leases: a version's top directory held by the kernel -------------------------
    def _needs_lease(self, node: Node) -> int | None:
        """The version id to lease before handing ``node`` out (``Core.hands_out``)."""
        return None if self.leases is None else self.core.hands_out(node)

    def _dropped(self, node: Node | None) -> None:
        vid = self.core.forgotten(node)
        if vid is not None and self.leases is not None:
            self.leases.release(vid)

    def _after_leases(self, unique: int, vids: list[int], payload: bytes) -> None:
        """Reply ``payload`` once the lease worker holds every version in ``vids``."""
        assert self.leases is not None
        for vid in vids[:-1]:
            self.leases.acquire(vid, lambda: None, self.requester)
        self.leases.acquire(vids[-1], lambda: self.reply(unique, payload), self.requester)

    # --- handlers -----------------------------------------------------------------------
    def op_init(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        major, minor, readahead, flags, flags2 = K.INIT_IN.unpack_from(body)
        if major != K.KERNEL_VERSION:
            # A newer major: answer with ours and the kernel retries (or gives up).
            log.warning("kernel speaks FUSE %d.%d; we speak %d", major, minor, K.KERNEL_VERSION)
            return K.INIT_OUT.pack(K.KERNEL_VERSION, K.OUR_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                   *([0] * 7))
        offered = flags | ((flags2 << 32) if flags & K.INIT_EXT else 0)
        ours = offered & K.WANTED
        if offered & K.INIT_EXT:
            ours |= K.INIT_EXT
        missing = K.WANTED & ~offered
        log.info("kernel FUSE %d.%d (we speak 7.%d), max_readahead %d, flags %#x; granted "
                 "%#x%s", major, minor, K.OUR_MINOR, readahead, offered, ours,
                 f", kernel lacks {missing:#x}" if missing else "")
        self.core.live = True
        return K.INIT_OUT.pack(K.KERNEL_VERSION, min(minor, K.OUR_MINOR), readahead,
                               ours & 0xFFFFFFFF, 64, 48, 128 << 10, 1, K.MAX_PAGES_WANTED,
                               0, ours >> 32, *([0] * 7))

    def op_lookup(self, unique: int, nodeid: int, body: memoryview) -> bytes | None:
        name = bytes(body[:len(body) - 1]) if body[-1] == 0 else bytes(body)
        node = self.core.lookup(nodeid, name)
        if isinstance(node, Negative):
            return _negative(node.timeout)
        vid = self._needs_lease(node)
        if vid is not None:
            self._after_leases(unique, [vid], _entry_out(node))
            return DEFERRED
        if node.kind == stat.S_IFREG:
            self._read_ahead(node)
        return _entry_out(node)

    # --- read-ahead: at LOOKUP, and of the next chunk (docs/mount.md, "Read-ahead") -----
    def _read_ahead(self, node: Node) -> None:
        """A regular file was looked up: most are opened and read next (Python stats, then
        opens), so ready its first chunk in the background while the kernel answers the
        round trips in between (open, ioctl). Skipped when ``PREFETCH_SLOTS`` are in flight
        or the chunk is cached already."""
        try:
            refs = self.tree.refs(node)  # the READ needs them too; loaded once per node
        except Exception:
            return  # rows that do not add up: the READ reports it (EIO/ENOENT, logged)
        if refs:
            self._warm_soon(refs[0], "prefetch")

    def _read_ahead_next(self, node: Node, off: int, end: int) -> None:
        """A READ of ``[off, end)``: if it carries on where the last READ of this file ended
        (or starts the file), ready the chunk after the one it ends in. One chunk ahead, not
        more: measured, deeper did not read faster on 2 cores (docs/mount.md)."""
        sequential = off == 0 or self._next_off.get(node.inode) == off
        if len(self._next_off) >= NEXT_OFF_MAX:
            self._next_off.clear()  # many files read at once: forget, at worst a miss
        self._next_off[node.inode] = end
        refs = node.refs  # loaded by the read plan
        nxt = (end - 1) // self.view.chunk_size + 1
        if sequential and refs is not None and nxt < len(refs):
            self._warm_soon(refs[nxt], "prefetch_next")

    def _warm_soon(self, ref: ChunkRef, counter: str) -> None:
        """Queue ``ref`` to the prefetch pool unless cached, already queued, or every slot
        is taken."""
        if ref.digest in self._warming or self.view.cache.peek(ref.digest):
            return
        if not self._prefetch_slots.acquire(blocking=False):
            return
        self._warming.add(ref.digest)
        try:
            self.prefetch_pool.submit(self._prefetch, ref)
        except RuntimeError:  # shut down (the loop is ending): a read-ahead is never needed
            self._warming.discard(ref.digest)
            self._prefetch_slots.release()
            return
        self.stats[counter] = self.stats.get(counter, 0) + 1

    def _prefetch(self, ref: ChunkRef) -> None:
        """Prefetch pool. A missing or corrupt blob is not cached and not logged here: the
        READ that follows meets it again and answers EIO with the log line."""
        try:
            with contextlib.suppress(Exception):
                self.view.warm(ref)
        finally:
            self._warming.discard(ref.digest)  # a set's add/discard are atomic (GIL)
            self._prefetch_slots.release()

    def op_forget(self, unique: int, nodeid: int, body: memoryview) -> None:
        (n,) = K.FORGET_IN.unpack_from(body)
        self._dropped(self.table.forget(nodeid, n))

    def op_batch_forget(self, unique: int, nodeid: int, body: memoryview) -> None:
        (count, _) = K.BATCH_FORGET_IN.unpack_from(body)
        off = K.BATCH_FORGET_IN.size
        for _ in range(count):
            ino, n = K.FORGET_ONE.unpack_from(body, off)
            off += K.FORGET_ONE.size
            self._dropped(self.table.forget(ino, n))

    def op_getattr(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        return _attr_out(self.tree.node(nodeid))

    def op_readlink(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        return self.core.readlink(nodeid)

    def op_statfs(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        s = self.core.statfs()
        return K.KSTATFS.pack(s.blocks, 0, 0, s.files, 0, s.bsize, s.namemax, s.bsize, 0,
                              *([0] * 6))

    def op_ok(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        return b""

    def op_erofs(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        raise Errno(errno.EROFS)

    def op_interrupt(self, unique: int, nodeid: int, body: memoryview) -> None:
        return None  # every request finishes promptly; the kernel waits for its reply

    def op_destroy(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        self.stopping = True
        return b""

    # --- files --------------------------------------------------------------------------
    def op_read(self, unique: int, nodeid: int, body: memoryview) -> bytes | None:
        _fh, off, size, *_ = K.READ_IN.unpack_from(body)
        node = self.core.node(nodeid)
        pieces = self.core.read_plan(node, off, size)
        if pieces:
            self._read_ahead_next(node, off, off + sum(p.end - p.start for p in pieces))
        out: list[bytes | None] = [self.view.read_piece_nowait(p) for p in pieces]
        if None not in out:
            self.reply(unique, *out)  # type: ignore[arg-type]
            return DEFERRED  # (already answered, without joining the pieces)
        self.stats["read_thread"] = self.stats.get("read_thread", 0) + 1
        self.pool.submit(self._read_slow, unique, pieces, out)
        return DEFERRED

    def _read_slow(self, unique: int, pieces: list[Piece], got: list[bytes | None]) -> None:
        """Read pool: the pieces the request thread could not have without waiting."""
        t0 = time.perf_counter_ns()
        try:
            data = [g if g is not None else self.view.read_piece(p)
                    for p, g in zip(pieces, got, strict=True)]
        except Exception as e:
            self.reply_error(unique, logged_errno(e, "read"))
            return
        finally:
            self._busy("read_thread", t0)
        self.reply(unique, *data)

    # --- directories --------------------------------------------------------------------
    def op_readdir(self, unique: int, nodeid: int, body: memoryview) -> bytes | None:
        return self._readdir(unique, nodeid, body, plus=False)

    def op_readdirplus(self, unique: int, nodeid: int, body: memoryview) -> bytes | None:
        return self._readdir(unique, nodeid, body, plus=True)

    def _readdir(self, unique: int, nodeid: int, body: memoryview, plus: bool
                 ) -> bytes | None:
        _fh, off, size, *_ = K.READ_IN.unpack_from(body)
        node = self.core.directory(nodeid)
        out: list[bytes] = []
        room = size
        vids: list[int] = []

        def add(name: bytes, child: Node | None, kind: int, ino: int, next_off: int) -> bool:
            nonlocal room
            need = K.dirent_size(len(name), plus)
            if need > room:
                if child is not None:
                    self.table.maybe_drop(child)
                return False
            room -= need
            pad = b"\0" * (-(K.DIRENT.size + len(name)) % 8)
            if plus:
                assert child is not None
                child.nlookup += 1  # the kernel now holds a reference (it will FORGET it)
                vid = self._needs_lease(child)
                if vid is not None:
                    vids.append(vid)
                out.append(_entry_out(child))
            out.append(K.DIRENT.pack(ino, next_off, len(name), kind >> 12) + name + pad)
            return True

        if node.role == ENTRY:
            # about as many rows as fit in the reply, per fetch
            for e in self.core.entries(node, off, room // K.dirent_size(16, plus) + 2):
                if plus:
                    child: Node | None = self.tree.entry_node(e)
                    ino = child.inode  # type: ignore[union-attr]
                else:
                    child, ino = None, self.table.peek(entry_key(e))
                if not add(e.name, child, e.kind, ino, e.id):
                    break
        else:
            for name, top, next_off in self.core.top_page(self.core.top_listing(node), off):
                if not add(name, top if plus else None, top.kind, top.inode, next_off):
                    break
                if not plus:
                    self.table.maybe_drop(top)
        payload = b"".join(out)
        if vids:
            self._after_leases(unique, vids, payload)
            return DEFERRED
        return payload
