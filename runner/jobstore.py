"""Job records and logs: one SQLite database (apsw, WAL) per user, ``jobs.db`` in that user's
state directory.

Where (``state_dir``): an ordinary user's ``~/.local/state/jbl`` (from the password database,
not ``$HOME``); root's ``/var/lib/jbl-jobs`` (outside the store: the store's ``run/`` is
group-writable). The directory is made ``0700`` and the database ``0600``; both are opened
without following links and must be the user's own, writable by nobody else
(``fusefs/trust.owned_dir``), or the command stops with one line.

Who writes: the supervisor of a job (``begin``/``finish``), and for a detached job its logger
process (``append_log``); each has its own connection; WAL and a busy timeout let them and the
readers (``jbl job …``) run side by side. Root's ``--all`` reads other users' databases through
``open_other`` only: the directory and file checked (owner, no links, no FIFO), then opened
read-only and ``immutable`` (no lock taken, no ``-wal``/``-shm`` made in the user's directory;
rows still in the user's WAL are not seen until their next checkpoint), under a deadline.

A record's ``state``: ``running`` until its supervisor writes the end (``done`` for exit 0,
``failed`` otherwise); a ``running`` record whose supervisor (pid + start time) is gone is
``lost`` (``mark_lost``). Secret values never reach this module: the environment it is given
is already masked. Thread-safety: one ``JobStore`` per thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import re
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import apsw
from jbl.store.errors import JblError, NotFound, PermissionDenied, UsageError

TYPE_CHECKING = False  # typing costs ~3 ms of a 10,000-record `jbl job list` (cli/job_light.py)
if TYPE_CHECKING:
    from typing import Any

DB_NAME = "jobs.db"
ROOT_DIR = Path("/var/lib/jbl-jobs")
USER_DIR = ".local/state/jbl"  # under the user's home
APPLICATION_ID = 0x6A626C6A  # "jblj"
SCHEMA_VERSION = 2
MAX_OTHER_DB = 1 << 30  # bytes: root skips a user's database larger than this
OTHER_DEADLINE = 5.0  # s root gives another user's home (NFS, their FUSE mount)
MAX_GRACE = 3600.0  # s: the longest --kill-after a stop waits for (a record may be forged)
LOG_LIMIT = 16 << 20  # bytes of output kept per job by default (jbl run --log-limit)
STATES = ("running", "done", "failed", "lost")

# Every column, its meaning. Times are Unix seconds (float). JSON columns are small.
SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,          -- job-xxxxxxxx (runner/plan.new_job_id), also its hostname
    uid INTEGER NOT NULL,         -- who started it (the database's owner)
    user TEXT NOT NULL,           -- that uid's name when it started
    runtime TEXT NOT NULL,        -- name@version as resolved at start: never re-resolved
    command TEXT NOT NULL,        -- JSON list: argv
    limits TEXT NOT NULL,         -- JSON object: memory, cpu_percent, cpu_cores, pids, ...
    env TEXT NOT NULL,            -- JSON object: --env as given, secret names with '***'
    detached INTEGER NOT NULL,    -- 1: jbl run --detach (its output is in logs)
    state TEXT NOT NULL,          -- running | done | failed | lost
    created REAL NOT NULL,
    ended REAL,                   -- NULL while running
    exit_status INTEGER,          -- what jbl run exited with (128+N signal, 124, 138)
    reason TEXT,                  -- exited | signaled | timeout | oom | interrupted | setup
    message TEXT,                 -- one line for timeout/oom/setup failures
    peak_memory INTEGER,          -- bytes, from the job's cgroup (NULL: no memory cgroup)
    cpu_time REAL,                -- s user+system of the job's reaped processes (rusage)
    supervisor_pid INTEGER NOT NULL,    -- the jbl process that waits for the job
    supervisor_start INTEGER NOT NULL,  -- its start time (clock ticks, /proc/PID/stat 22)
    log_bytes INTEGER NOT NULL DEFAULT 0,    -- bytes of output in logs now
    log_dropped INTEGER NOT NULL DEFAULT 0,  -- bytes of oldest output dropped (--log-limit)
    logger_pid INTEGER NOT NULL DEFAULT 0,   -- a detached job's logger (0: none)
    logger_start INTEGER NOT NULL DEFAULT 0, -- its start time, as supervisor_start
    boot_id TEXT NOT NULL DEFAULT ''         -- the kernel's boot id when the supervisor began:
                                             -- after a reboot no pid is the same process
);
CREATE INDEX jobs_created ON jobs(created);
CREATE TABLE logs (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,         -- 1, 2, ... per job across both streams: the order read
    stream INTEGER NOT NULL,      -- 1 stdout, 2 stderr
    ts REAL NOT NULL,             -- when the chunk was read
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""
# Numbered steps from each older user_version, run in one transaction.
MIGRATIONS = {1: "ALTER TABLE jobs ADD COLUMN boot_id TEXT NOT NULL DEFAULT ''"}
BOOT_ID = "/proc/sys/kernel/random/boot_id"

LIST_COLUMNS = ("id", "user", "runtime", "command", "state", "created", "ended",
                "exit_status", "reason")
TABLE_COLUMNS = ("ID", "USER", "STATE", "RUNTIME", "STARTED", "EXIT", "COMMAND")


# A table cell shows each control character (C0, DEL, C1) as '?': a record is text someone
# else may have written (root's --all, the admin service), never terminal commands.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_ROWS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # '\n' ends a row
# A command's words joined by spaces, cut at 60 characters. jbl writes commands with
# json.dumps: one without a backslash is '["w1", "w2"]' with no quote inside a word, so
# removing the brackets and replacing '", "' is json_each's answer at half its cost; a
# command that is not JSON (a forged record) is shown as it is stored.
COMMAND_TEXT = ("substr(CASE WHEN instr(command, char(92)) = 0 AND command GLOB '[[]\"*\"]' "
                "THEN replace(substr(command, 3, length(command) - 4), '\", \"', ' ') "
                "WHEN json_valid(command) THEN (SELECT group_concat(value, ' ') FROM "
                "json_each(command)) ELSE command END, 1, 60)")
# datetime() is strftime('%Y-%m-%d %H:%M:%S', ...) at a third of its cost
STARTED_TEXT = "datetime(created, 'unixepoch', 'localtime')"


class Chunk:
    """One piece of a job's output (a plain class: dataclasses cost ~10 ms to import)."""

    __slots__ = ("seq", "stream", "ts", "data")

    def __init__(self, seq: int, stream: int, ts: float, data: bytes) -> None:
        self.seq, self.stream, self.ts, self.data = seq, stream, ts, data


def state_dir(uid: int) -> Path:
    """Where ``uid``'s job database lives (see the module docstring)."""
    if uid == 0:
        return ROOT_DIR
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        raise JblError(f"uid {uid} has no entry in the password database: no home for its "
                       "job records") from None
    return Path(home) / USER_DIR


def boot_id() -> str:
    """This boot's id ("" if the kernel has none): a record's pid and start time name a
    process of the boot it was written in only."""
    try:
        with open(BOOT_ID, "rb") as fh:
            return fh.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


def chosen_dir(value: str) -> Path | None:
    """``JBL_JOBS_DIR`` (``value``; "" when unset): the directory to use instead of the
    caller's state directory, or None for that default. It is used only when it is a 0700
    directory of the caller's (opened without following links); a directory of someone
    else's is ignored (the variable was meant for another user: ``sudo``, a test harness);
    anything else is one line."""
    if not value:
        return None
    if not os.path.isabs(value):
        raise UsageError(f"invalid JBL_JOBS_DIR {value!r}: must be an absolute path")
    hint = "make it a directory of yours, mode 0700, or unset it"
    try:
        seen = os.lstat(value)  # whose it is, before opening (another's 0700 is unreadable)
        if stat.S_ISDIR(seen.st_mode) and seen.st_uid != os.geteuid():
            return None
        fd = os.open(value, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError as e:
        why = "a link" if e.errno == errno.ELOOP else e.strerror
        raise UsageError(f"invalid JBL_JOBS_DIR {value!r}: {why}", hint=hint) from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if (st.st_dev, st.st_ino, st.st_uid) != (seen.st_dev, seen.st_ino, os.geteuid()):
        raise UsageError(f"invalid JBL_JOBS_DIR {value!r}: it changed while being checked",
                         hint=hint)
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise PermissionDenied(f"JBL_JOBS_DIR {value} is mode "
                               f"{stat.S_IMODE(st.st_mode):04o}, not 0700",
                               hint=f"chmod 700 {value}")
    return Path(value)


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if no such process (or
    a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] in (b"Z", b"X"):  # dead, not yet reaped: gone for our purposes
            return None
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def _make_own_dir(d: Path, uid: int) -> None:
    """Create the missing components of ``d`` (the last one 0700); the top that exists must
    be a directory of ``uid``'s (or root's, for root)."""
    missing = []
    p = d
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)
            os.chmod(p, 0o700)  # not what the umask leaves


class JobStore:
    def __init__(self, conn: apsw.Connection, where: Path, writable: bool,
                 owner: int | None = None) -> None:
        self.conn = conn
        self.where = where
        self.writable = writable
        self.owner = os.geteuid() if owner is None else owner  # whose records these are
        self.version = SCHEMA_VERSION  # open_other: the user's, which may be older

    # ---- opening ----------------------------------------------------------------------

    @classmethod
    def open_own(cls, directory: Path | None = None, create: bool = True) -> JobStore | None:
        """This user's database, created if ``create``; None when it does not exist and
        ``create`` is false."""
        from jbl.fusefs import trust

        uid = os.geteuid()
        d = directory or state_dir(uid)
        if create:
            try:
                _make_own_dir(d, uid)
            except OSError as e:
                raise PermissionDenied(f"cannot make the job record directory {d}: "
                                       f"{e.strerror}") from None
        elif not os.path.lexists(d / DB_NAME):
            return None
        dfd = trust.owned_dir(d, uid)
        if dfd is None or os.fstat(dfd).st_uid != uid:
            if dfd is not None:
                os.close(dfd)
            raise PermissionDenied(f"job record directory {d} is not yours alone (a link, "
                                   "someone else's, or writable by others)",
                                   hint=f"fix or remove {d}")
        try:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                ffd = os.open(DB_NAME, flags | (os.O_CREAT if create else 0), 0o600,
                              dir_fd=dfd)
            except OSError as e:
                raise PermissionDenied(f"job records {d / DB_NAME}: {e.strerror}",
                                       hint="it must be a regular file of yours") from None
            try:
                st = os.fstat(ffd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_nlink != 1:
                    raise PermissionDenied(f"job records {d / DB_NAME} is not a regular file "
                                           "of yours", hint=f"remove {d / DB_NAME}")
                if stat.S_IMODE(st.st_mode) & 0o077:
                    os.fchmod(ffd, 0o600)
            finally:
                os.close(ffd)
            # every component was checked to be the user's (or root's) and writable by no
            # one else, so only the user could swap one; NOFOLLOW refuses a link anyway
            real = Path(os.path.realpath(d)) / DB_NAME
            conn = apsw.Connection(str(real), flags=apsw.SQLITE_OPEN_READWRITE
                                   | apsw.SQLITE_OPEN_NOFOLLOW)
            self = cls(conn, d, writable=True)
            self._setup()
            return self
        finally:
            os.close(dfd)

    @classmethod
    def open_other(cls, uid: int) -> JobStore | None:
        """Root's read-only view of ``uid``'s database, or None (missing, unsafe, too big,
        unreadable in time)."""
        from jbl.fusefs import trust

        d = state_dir(uid)

        def probe() -> int | None:
            dfd = trust.owned_dir(d, uid)
            if dfd is None:
                return None
            try:
                ffd = os.open(DB_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                              | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                return None
            finally:
                os.close(dfd)
            st = os.fstat(ffd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != uid
                    or st.st_size > MAX_OTHER_DB):
                os.close(ffd)
                return None
            return ffd

        ffd = trust.within(OTHER_DEADLINE, probe)
        if ffd is None:
            return None
        try:
            # the very file checked above (its fd), immutable: no lock taken, no -shm/-wal
            # made in the user's directory
            conn = apsw.Connection(
                f"file:/proc/self/fd/{ffd}?immutable=1",
                flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
            conn.setbusytimeout(1000)
            app = conn.execute("PRAGMA application_id").fetchall()[0][0]
            version = conn.execute("PRAGMA user_version").fetchall()[0][0]
            if app != APPLICATION_ID or not isinstance(version, int) or not (
                    0 < version <= SCHEMA_VERSION):
                conn.close()
                return None
            other = cls(conn, d, writable=False, owner=uid)
            other.version = version
            return other
        except apsw.Error:
            return None
        finally:
            os.close(ffd)

    def _setup(self) -> None:
        c = self.conn
        c.setbusytimeout(10_000)  # the logger, the supervisor and readers share it
        c.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writers
        c.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        c.execute("PRAGMA foreign_keys=ON")
        with c:
            version = _int(c.execute("PRAGMA user_version").fetchall()[0][0])
            if version > SCHEMA_VERSION:
                raise JblError(f"job records {self.where / DB_NAME} are from a newer jbl "
                               f"(schema {version})", hint="use that jbl")
            if version == 0:
                c.execute(SCHEMA)
                c.execute(f"PRAGMA application_id={APPLICATION_ID}")
            else:
                for step in range(version, SCHEMA_VERSION):
                    c.execute(MIGRATIONS[step])
            if version != SCHEMA_VERSION:
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    # ---- writing (supervisor, logger) -------------------------------------------------

    def begin(self, rec: dict[str, Any]) -> None:
        """Insert the record of a starting job (or, for a detached job whose launcher
        inserted it, update it with what the supervisor knows)."""
        row = {
            "id": rec["id"], "uid": os.geteuid(), "user": _user_name(os.geteuid()),
            "runtime": rec["runtime"], "command": json.dumps(list(rec["command"])),
            "limits": json.dumps(rec.get("limits", {})), "env": json.dumps(rec.get("env", {})),
            "detached": int(bool(rec.get("detached"))), "created": rec.get("created",
                                                                           time.time()),
            "supervisor_pid": rec["supervisor_pid"],
            "supervisor_start": rec["supervisor_start"], "boot_id": boot_id(),
        }
        with self.conn:
            self.conn.execute(
                "INSERT INTO jobs (id, uid, user, runtime, command, limits, env, detached, "
                "state, created, supervisor_pid, supervisor_start, boot_id) VALUES (:id, :uid, "
                ":user, :runtime, :command, :limits, :env, :detached, 'running', :created, "
                ":supervisor_pid, :supervisor_start, :boot_id) ON CONFLICT(id) DO UPDATE SET "
                "runtime=excluded.runtime, command=excluded.command, limits=excluded.limits, "
                "env=excluded.env, supervisor_pid=excluded.supervisor_pid, "
                "supervisor_start=excluded.supervisor_start, boot_id=excluded.boot_id", row)

    def finish(self, job_id: str, *, exit_status: int, reason: str, message: str = "",
               peak_memory: int | None = None, cpu_time: float | None = None) -> None:
        state = "done" if exit_status == 0 else "failed"
        with self.conn:
            self.conn.execute(
                "UPDATE jobs SET state=?, ended=?, exit_status=?, reason=?, message=?, "
                "peak_memory=?, cpu_time=? WHERE id=? AND state='running'",
                (state, time.time(), exit_status, reason, message or None, peak_memory,
                 cpu_time, job_id))

    def append_log(self, job_id: str, chunks: Sequence[tuple[int, float, bytes]],
                   limit: int) -> None:
        """Append ``(stream, ts, data)`` chunks in one transaction; then, over ``limit``
        bytes, drop the oldest chunks (their bytes counted in ``log_dropped``)."""
        if not chunks:
            return
        c = self.conn
        with c:
            row = c.execute("SELECT coalesce(max(seq), 0) FROM logs WHERE job_id=?",
                            (job_id,)).fetchall()[0]
            seq = _int(row[0])
            total = 0
            cut = 0
            for stream, ts, data in chunks:
                if len(data) > limit:  # one chunk over the whole bound: its tail only
                    cut += len(data) - limit
                    data = data[-limit:]
                seq += 1
                total += len(data)
                c.execute("INSERT INTO logs VALUES (?, ?, ?, ?, ?)",
                          (job_id, seq, stream, ts, data))
            c.execute("UPDATE jobs SET log_bytes = log_bytes + ?, log_dropped = log_dropped "
                      "+ ? WHERE id=?", (total, cut, job_id))
            have = _int(c.execute("SELECT log_bytes FROM jobs WHERE id=?",
                                 (job_id,)).fetchall()[0][0])
            if have <= limit:
                return
            dropped = 0
            last = 0
            for s, n in c.execute("SELECT seq, length(data) FROM logs WHERE job_id=? "
                                  "ORDER BY seq", (job_id,)):
                if have - dropped <= limit:
                    break
                dropped += int(n)
                last = int(s)
            c.execute("DELETE FROM logs WHERE job_id=? AND seq<=?", (job_id, last))
            c.execute("UPDATE jobs SET log_bytes = log_bytes - ?, log_dropped = log_dropped "
                      "+ ? WHERE id=?", (dropped, dropped, job_id))

    # ---- reading ------------------------------------------------------------------------

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every record's ``LIST_COLUMNS``, oldest first (``lost`` worked out and, if
        writable, stored): ``json_text`` parsed."""
        rows: list[dict[str, Any]] = json.loads(self.json_text(state))
        return rows

    def table(self, state: str | None = None) -> list[tuple[Any, ...]]:
        """The rows of ``jbl job list`` as text, oldest first: ``TABLE_COLUMNS`` and then
        ``created`` (to merge several stores' rows; ``format_table`` lays them out)."""
        found, params = self._found(state)
        return self.conn.execute(
            f"SELECT id, user, st, runtime, {STARTED_TEXT}, coalesce(exit_status, ''), "
            f"coalesce({COMMAND_TEXT}, ''), created FROM ({found}) ORDER BY created",
            params).fetchall()

    def _found(self, state: str | None) -> tuple[str, dict[str, Any]]:
        """SQL for this store's records in ``state`` (None: all) with their shown state
        ``st`` and reason ``rs`` (``lost`` for a running record whose supervisor is gone,
        also in a read-only store), and its parameters."""
        lost = sorted(self._lost_running())
        if not lost:  # the usual case, and a third cheaper than the general one
            return ("SELECT *, state AS st, reason AS rs FROM jobs "
                    "WHERE :state IS NULL OR state = :state", {"state": state})
        sql = ("SELECT * FROM (SELECT *, CASE WHEN lost THEN 'lost' ELSE state END AS st, "
               "CASE WHEN lost THEN 'lost' ELSE reason END AS rs FROM (SELECT *, id IN "
               "(SELECT value FROM json_each(:lost)) AS lost FROM jobs)) "
               "WHERE :state IS NULL OR st = :state")
        return sql, {"lost": json.dumps(lost), "state": state}

    def json_text(self, state: str | None = None) -> str:
        """``jbl job list --json`` of this one store, made by SQLite in one string (10,000
        records: no dict per row here). A command that is not JSON (a forged record) is
        given as the string stored."""
        found, params = self._found(state)
        text = self.conn.execute(
            "SELECT json_group_array(json_object('id', id, 'user', user, 'runtime', runtime, "
            "'command', CASE WHEN json_valid(command) THEN json(command) ELSE command END, "
            "'state', st, 'created', created, 'ended', ended, 'exit_status', exit_status, "
            f"'reason', rs) ORDER BY created) FROM ({found})", params).fetchall()[0][0]
        return str(text)

    def table_text(self, state: str | None = None, user: bool = False) -> str:
        """``jbl job list``'s table of this one store (header included; "" when no job),
        laid out by SQLite: no Python object per row (10,000 rows: ~3x faster than
        ``format_table``, which a listing of several stores needs to merge them, and which
        this falls back to when a cell holds a line break or another control character)."""
        cols = [c for c in TABLE_COLUMNS if user or c != "USER"]
        found, params = self._found(state)
        n, *most = self.conn.execute(
            "SELECT count(*), max(length(id)), max(length(user)), max(length(st)), "
            "max(length(runtime)), 19, max(length(coalesce(exit_status, ''))) "
            f"FROM ({found})", params).fetchall()[0]
        if not n:
            return ""
        widths = {c: max(len(c), int(m or 0)) for c, m in zip(TABLE_COLUMNS, most,
                                                             strict=False)}
        fields = {"ID": "id", "USER": "user", "STATE": "st", "RUNTIME": "runtime",
                  "STARTED": STARTED_TEXT, "EXIT": "coalesce(exit_status, '')"}
        fmt = "  ".join("%-*s" for c in cols[:-1]) + "  %s"
        args = ", ".join(f"{widths[c]}, {fields[c]}" for c in cols[:-1])
        text = str(self.conn.execute(
            f"SELECT group_concat(printf('{fmt}', {args}, {COMMAND_TEXT}), char(10) "
            f"ORDER BY created) FROM ({found})", params).fetchall()[0][0])
        if text.count("\n") != int(n) - 1 or _CONTROL_IN_ROWS.search(text):
            return format_table(self.table(state), user)
        header = "  ".join(c.ljust(widths[c]) for c in cols[:-1]) + "  " + cols[-1]
        return f"{header}\n{text}\n"

    def _lost_running(self) -> set[str]:
        """The ids of ``running`` records whose supervisor is gone (stored as lost when
        this store is writable)."""
        boot = ", boot_id" if self.version >= 2 else ""
        rows = self._query("SELECT id, state, reason, supervisor_pid, supervisor_start"
                           f"{boot} FROM jobs WHERE state='running'")
        self._find_lost(rows)
        return {r["id"] for r in rows if r["state"] == "lost"}

    def get(self, prefix: str) -> dict[str, Any]:
        """The full record of the job whose id starts with ``prefix`` (``job-`` optional)."""
        if not prefix or len(prefix) > 64:
            raise UsageError(f"invalid job id {prefix!r}")
        if not prefix.startswith("job-"):
            prefix = "job-" + prefix
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        found = self._query("SELECT * FROM jobs WHERE id LIKE ? ESCAPE '\\' LIMIT 5",
                            (like,))
        if not found:
            raise NotFound(f"no job {prefix} in {self.where / DB_NAME}",
                           hint="jbl job list shows your jobs")
        if len(found) > 1:
            raise UsageError(f"job id {prefix} is ambiguous: "
                             f"{', '.join(r['id'] for r in found)}…",
                             hint="give more of the id")
        self._find_lost(found)
        return found[0]

    def chunks(self, job_id: str, after: int = 0, limit: int = 1000) -> list[Chunk]:
        return [Chunk(int(s), int(st), float(ts), bytes(d)) for s, st, ts, d in
                self.conn.execute("SELECT seq, stream, ts, data FROM logs WHERE job_id=? "
                                  "AND seq>? ORDER BY seq LIMIT ?", (job_id, after, limit))]

    def last_seqs(self, job_id: str, n: int) -> int:
        """The seq before the last ``n`` chunks (for ``--tail``)."""
        rows = self.conn.execute("SELECT seq FROM logs WHERE job_id=? ORDER BY seq DESC "
                                 "LIMIT 1 OFFSET ?", (job_id, n)).fetchall()
        return _int(rows[0][0]) if rows else 0

    def iter_chunks(self, job_id: str, after: int = 0) -> Iterator[Chunk]:
        while True:
            batch = self.chunks(job_id, after)
            if not batch:
                return
            yield from batch
            after = batch[-1].seq

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self.conn.cursor()
        cur.execute(sql, params)
        try:
            names = [d[0] for d in cur.getdescription()]
        except apsw.ExecutionCompleteError:
            return []
        rows = [dict(zip(names, r, strict=True)) for r in cur]
        for r in rows:
            for k in ("command", "limits", "env"):
                if k in r and isinstance(r[k], str):
                    r[k] = json.loads(r[k])
        return rows

    # ---- removing -----------------------------------------------------------------------

    def remove(self, job_id: str) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM logs WHERE job_id=?", (job_id,))
            self.conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def prune(self, before: float) -> list[str]:
        """Remove the ended (or lost) jobs created before ``before``; their ids."""
        self.jobs()  # marks lost ones first
        with self.conn:
            ids = [str(r[0]) for r in self.conn.execute(
                "SELECT id FROM jobs WHERE state != 'running' AND created < ?", (before,))]
            for i in ids:
                self.conn.execute("DELETE FROM logs WHERE job_id=?", (i,))
                self.conn.execute("DELETE FROM jobs WHERE id=?", (i,))
        return ids

    # ---- lost supervisors ---------------------------------------------------------------

    def _find_lost(self, rows: list[dict[str, Any]]) -> None:
        lost = []
        for r in rows:
            if r["state"] == "running" and not supervisor_alive(r):
                r["state"] = r["reason"] = "lost"
                lost.append(r["id"])
        if lost and self.writable:
            with self.conn:
                for i in lost:
                    self.conn.execute("UPDATE jobs SET state='lost', reason='lost', "
                                      "message='its jbl supervisor ended without recording "
                                      "the end' WHERE id=? AND state='running'", (i,))


def format_table(rows: Sequence[Sequence[Any]], user: bool) -> str:
    """``table`` rows (of one or several stores) laid out as ``table_text`` does, each
    control character in a cell shown as '?' (``CONTROL``); "" when no row."""
    if not rows:
        return ""
    keep = [i for i in range(len(TABLE_COLUMNS)) if i != 1 or user]  # USER: with --all
    cells = [[TABLE_COLUMNS[i] for i in keep],
             *([CONTROL.sub("?", str(r[i])) for i in keep] for r in rows)]
    widths = [max(map(len, col)) for col in zip(*cells, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    # written in one piece (10,000 rows: a print per row costs ~90 ms)
    return "\n".join(fmt.format(*row) for row in cells) + "\n"


def supervisor_alive(rec: dict[str, Any]) -> bool:
    """Is the process that recorded ``rec`` still there: the same boot (a record from before
    a reboot names a pid of another boot), then the same pid and start time?"""
    if rec.get("boot_id") and rec["boot_id"] != boot_id():
        return False
    return process_start(int(rec["supervisor_pid"])) == int(rec["supervisor_start"])


def stop_job(rec: dict[str, Any], owner: int, slack: float = 10.0) -> bool:
    """SIGTERM to the supervisor of the running job ``rec`` (a record of ``owner``'s), then
    wait for it to end: it forwards SIGTERM to the job and, after the job's grace
    (``--kill-after``, at most ``MAX_GRACE`` here), kills the job's whole cgroup, as on a
    timeout. Nothing is signalled unless the pid is that very process (pidfd, start time,
    boot) and runs as ``owner`` with every uid: a forged record (root's ``--all``, the admin
    service) names nothing its user could not signal. False when nothing was signalled."""
    import select
    import signal

    try:
        pid = int(rec["supervisor_pid"])
        fd = os.pidfd_open(pid) if pid > 0 else -1
    except (OSError, ValueError, TypeError):
        return False
    if fd < 0:
        return False
    try:
        if not supervisor_alive(rec) or _uids(pid) != {owner}:  # the pid is pinned by fd
            return False
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        grace = rec["limits"].get("kill_after") if isinstance(rec["limits"], dict) else None
        if not isinstance(grace, int | float) or not 0 <= grace <= MAX_GRACE:
            grace = 5.0
        select.select([fd], [], [], float(grace) + slack + 60.0)
        return True
    finally:
        os.close(fd)


def not_signalled(rec: dict[str, Any]) -> str:
    """Why ``stop_job`` signalled nothing for a record still ``running``."""
    return (f"job {rec['id']}: pid {rec['supervisor_pid']} is not its {rec['user']}'s "
            "supervisor (a changed or forged record): nothing was signalled")


def _uids(pid: int) -> set[int]:
    """The real, effective, saved and filesystem uids of ``pid`` (empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh.read(1 << 16).splitlines():
                if line.startswith(b"Uid:"):
                    return {int(u) for u in line.split()[1:5]}
    except (OSError, ValueError):
        pass
    return set()


def logger_alive(rec: dict[str, Any]) -> bool:
    """Is a detached job's logger still writing (its log not yet complete)?"""
    pid = int(rec.get("logger_pid") or 0)
    if pid <= 0 or (rec.get("boot_id") and rec["boot_id"] != boot_id()):
        return False
    return process_start(pid) == int(rec["logger_start"])


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise JblError(f"job records: expected a number, found {type(value).__name__}")
    return value


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


