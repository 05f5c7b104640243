"""The jobs admin service: root reads and stops any user's jobs for members of the admin group
(issue 13: "root and the admin group may pass --all"), so that they need not become root.

Users' job records are theirs (``jobs.db`` 0600 in a 0700 directory: runner/jobstore.py), so a
privileged party must read them. ``serve`` (``jbl job serve-admin``, root; the systemd unit
``jbl-jobs-admin.service`` that ``jbl setup --system`` writes) listens on ``SOCKET`` (mode
0666: anyone may ask, the answer depends on who asks):

* **Who asks** is the kernel's word, never the request's: ``SO_PEERCRED`` (uid, gid at
  connect) and ``SO_PEERGROUPS`` (the peer's supplementary groups at connect); root, or a
  member of the admin group (one of those groups, or listed in the group database) is served.
  Anyone else gets a refusal (exit 8); their request is never looked at.
* **Bounds**: one request per connection, a JSON object of at most ``MAX_REQUEST`` bytes read
  within ``REQUEST_TIMEOUT``; at most ``MAX_CLIENTS`` at once (more are told to retry); a log
  answer holds at most ``LOG_PAGE`` bytes of output (the client asks again for more).
* **Reading** is root's ``--all``: ``every_store`` (``JobStore.open_other``: no link followed,
  nothing opened that blocks, owner and type checked, read-only and immutable, under a
  deadline). A record is text its user wrote: the answers carry it as JSON strings, and the
  client shows control characters as '?'.
* **Stopping** is ``jobstore.stop_job`` with the record's owner: root signals the pid a record
  names only if that very process (pidfd, start time, boot) runs as the record's owner with
  every uid, so a forged record can make root signal nothing its user could not signal.

The client side (``ask``) is what ``jbl job list --all`` and ``job status|log|stop`` of
another user's job use when the caller is not root (cli/job_cmd.py).

Thread-safety: ``serve`` answers each connection on its own thread with its own stores.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import grp
import json
import os
import pwd
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jbl.store.errors import JblError, NotFound, PermissionDenied, UsageError

from .jobstore import STATES, JobStore, logger_alive, not_signalled, stop_job

SOCKET = Path("/run/jbl/jobs-admin.sock")
UNIT = "jbl-jobs-admin.service"
MAX_REQUEST = 4096  # bytes: a request is an op, an id and two numbers
REQUEST_TIMEOUT = 5.0  # s for the whole request to arrive
HELPER_TIMEOUT = 10.0  # s for a log page read as its user (_log_as)
ANSWER_TIMEOUT = 30.0  # s for a client to take its answer
MAX_CLIENTS = 16  # connections answered at once (a stop waits for the job's grace)
LOG_PAGE = 1 << 20  # bytes of output per log answer
SO_PEERGROUPS = 59  # <asm-generic/socket.h>; not in Python's socket module
OPS = ("list", "status", "log", "stop")
START_HINT = f"root starts it: systemctl start {UNIT} (or jbl job serve-admin)"


class AdminServiceDown(PermissionDenied):
    """Not root, asking for other users' jobs, and the service that answers is not running."""


class Answered(JblError):
    """The service's error, with its exit code; ``refused``: the caller is no admin."""

    def __init__(self, message: str, code: int, refused: bool = False) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[assignment]
        self.refused = refused


# ---- who may ask ---------------------------------------------------------------------------

def peer(conn: socket.socket) -> tuple[int, int, int, set[int]]:
    """The connected process's pid, uid, gid and groups (primary and supplementary), as the
    kernel recorded them when it connected."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    groups = {gid}
    with contextlib.suppress(OSError):  # ERANGE past 256 groups: the group database decides
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups.update(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
    return pid, uid, gid, groups


def may_admin(uid: int, groups: set[int], group: str) -> bool:
    """Root, or a member of ``group``: one of the peer's groups, or listed in the group
    database (added to it since that session began)."""
    if uid == 0:
        return True
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    if g.gr_gid in groups:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return name in g.gr_mem


# ---- what root reads -------------------------------------------------------------------------

def every_store(own: Path | None, skip_uid: int | None = None) -> list[JobStore]:
    """Root's own store (``own``: its directory, None for the default) and every other
    user's, read-only (``open_other``); ``skip_uid``'s left out (the caller reads its own)."""
    out = []
    if skip_uid != 0:
        mine = JobStore.open_own(own, create=False)
        if mine is not None:
            out.append(mine)
    seen = {0}
    for pw in pwd.getpwall():
        if pw.pw_uid in seen or pw.pw_uid == skip_uid or not os.path.isabs(pw.pw_dir):
            continue
        seen.add(pw.pw_uid)
        # every look at a user's home is open_other's, under its deadline: a home on a
        # hung NFS server or the user's own FUSE mount must not hang root
        other = JobStore.open_other(pw.pw_uid)
        if other is not None:
            out.append(other)
    return out


def find(stores: list[JobStore], prefix: str) -> tuple[JobStore, dict[str, Any]]:
    """The store holding the one job whose id starts with ``prefix``, and its record."""
    found = []
    for store in stores:
        try:
            found.append((store, store.get(prefix)))
        except NotFound:
            continue
    if not found:
        raise NotFound(f"no job {prefix} among any user's jobs",
                       hint="jbl job list --all shows them")
    if len(found) > 1:
        raise UsageError(f"job id {prefix} is ambiguous: "
                         f"{', '.join(r['id'] for _, r in found)}", hint="give more of the id")
    return found[0]


def answer(req: dict[str, Any], caller: int, own: Path | None) -> dict[str, Any]:
    """The answer to one checked request from ``caller`` (uid)."""
    op = req["op"]
    stores = every_store(own, skip_uid=caller if op == "list" else None)
    try:
        if op == "list":
            if req.get("table"):
                return {"table": [list(r) for s in stores for r in s.table(req.get("state"))]}
            return {"jobs": [r for s in stores for r in s.jobs(req.get("state"))]}
        store, rec = find(stores, req["id"])
        if op == "status":
            return {"record": rec}
        if op == "stop":
            if rec["state"] == "running":
                if not stop_job(rec, owner=store.owner):
                    raise PermissionDenied(not_signalled(rec))
                rec = find(every_store(own), rec["id"])[1]  # re-read: the end it recorded
            return {"record": rec}
        if store.writable:  # root's own
            return log_page(store, rec["id"], req.get("after", 0), req.get("tail"))
        return _log_as(store.owner, rec["id"], req.get("after", 0), req.get("tail"))
    finally:
        for s in stores:
            s.close()


def log_page(store: JobStore, job: str, after: int, tail: int | None) -> dict[str, Any]:
    """Job ``job``'s record and at most ``LOG_PAGE`` bytes of its output after seq
    ``after`` (or its last ``tail`` chunks)."""
    rec = store.get(job)
    if tail is not None:
        after = store.last_seqs(rec["id"], tail)
    chunks, size = [], 0
    for c in store.iter_chunks(rec["id"], after):
        chunks.append([c.seq, c.stream, c.ts, base64.b64encode(c.data).decode()])
        size += len(c.data)
        if size >= LOG_PAGE:
            break
    live = rec["state"] == "running" or logger_alive(rec)
    return {"record": rec, "chunks": chunks, "more": size >= LOG_PAGE, "live": live}


def _log_as(uid: int, job: str, after: int, tail: int | None) -> dict[str, Any]:
    """``log_page`` of ``uid``'s job read by a helper process running as that user (no
    group, a clean environment): a live job's output is in the user's WAL, which root's
    immutable read does not see, and root opens none of the user's files. What it prints is
    the user's to forge: bounded in size and time, parsed as JSON, checked for shape."""
    import select
    import subprocess

    pw = pwd.getpwuid(uid)
    p = subprocess.Popen([sys.executable, "-m", "jbl.runner.jobadmin", job, str(after),
                          "" if tail is None else str(tail)],
                         user=uid, group=pw.pw_gid, extra_groups=[], cwd="/",
                         env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    out, end, limit = b"", time.monotonic() + HELPER_TIMEOUT, 2 * LOG_PAGE + (1 << 20)
    try:
        while len(out) <= limit:
            left = end - time.monotonic()
            if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
                raise JblError(f"reading {pw.pw_name}'s job log took over "
                               f"{HELPER_TIMEOUT:g} s")
            more = os.read(p.stdout.fileno(), 1 << 16)
            if not more:
                break
            out += more
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    page: Any = None
    try:
        page = json.loads(out)
        assert isinstance(page, dict) and isinstance(page["record"], dict)
        assert isinstance(page["chunks"], list) and len(out) <= limit
        return {"record": page["record"], "chunks": page["chunks"],
                "more": bool(page["more"]), "live": bool(page["live"])}
    except (ValueError, AssertionError, KeyError, TypeError):
        if isinstance(page, dict) and "error" in page and "code" in page:
            raise Answered(str(page["error"])[:500], int(page["code"])) from None
        raise JblError(f"{pw.pw_name}'s job log could not be read") from None


def checked(data: bytes) -> dict[str, Any]:
    """The request in ``data``, its fields checked (``UsageError`` otherwise)."""
    try:
        req = json.loads(data)
    except ValueError:
        raise UsageError("the request is not JSON") from None
    if not isinstance(req, dict) or req.get("op") not in OPS:
        raise UsageError(f"the request must be an object with op one of {', '.join(OPS)}")
    if req["op"] != "list" and not (isinstance(req.get("id"), str) and req["id"]):
        raise UsageError("the request needs a job id")
    if req.get("state") not in (None, *STATES):
        raise UsageError("state must be one of " + ", ".join(STATES))
    for k in ("after", "tail"):
        v = req.get(k)
        if v is not None and (type(v) is not int or v < 0):
            raise UsageError(f"{k} must be a whole number, 0 or more")
    return req


# ---- the service -----------------------------------------------------------------------------

def serve(group: str, own: Path | None, path: Path = SOCKET) -> None:
    """Answer requests on ``path`` until killed (see the module docstring)."""
    listener = _listen(path)
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    try:
        while True:
            conn, _ = listener.accept()
            if not slots.acquire(blocking=False):
                _reply(conn, {"ok": False, "code": 9, "error": "the jobs admin service is "
                              f"answering {MAX_CLIENTS} requests: try again"})
                continue
            threading.Thread(target=_one, args=(conn, group, own, slots), daemon=True).start()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()


def _listen(path: Path) -> socket.socket:
    """The listening socket at ``path`` (mode 0666) in a root-owned directory nobody else
    may write; one that answers means a service already runs."""
    from jbl.fusefs import trust

    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    dfd = trust.owned_dir(path.parent, 0)
    if dfd is None:
        raise PermissionDenied(f"{path.parent} must be root's, writable by root only")
    os.close(dfd)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        raise UsageError(f"a jobs admin service already answers on {path}")
    except OSError:
        pass
    finally:
        probe.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp))
    os.chmod(tmp, 0o666)  # anyone may ask; the answer depends on who (peer)
    os.rename(tmp, path)
    s.listen(64)
    return s


def _one(conn: socket.socket, group: str, own: Path | None,
         slots: threading.BoundedSemaphore) -> None:
    try:
        _, uid, _, groups = peer(conn)
        if not may_admin(uid, groups, group):
            with contextlib.suppress(JblError, OSError):  # taken unread (bounded), so that
                _request(conn)  # closing does not reset the connection before the answer
            reply: dict[str, Any] = {"ok": False, "code": 8, "refused": True,
                                     "error": "only root and members of group "
                                     f"{group} may see other users' jobs"}
        else:
            try:
                reply = {"ok": True} | answer(checked(_request(conn)), uid, own)
            except JblError as e:
                reply = {"ok": False, "code": int(e.exit_code), "error": str(e)}
            except Exception as e:  # a bug: said to the client, the service goes on
                reply = {"ok": False, "code": 1,
                         "error": f"jobs admin service: {type(e).__name__}: {e}"}
        _reply(conn, reply)
    finally:
        slots.release()


def _request(conn: socket.socket) -> bytes:
    """The request: bytes until the client shuts its side (or a newline), bounded."""
    end = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    while not data.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0:
            raise UsageError(f"the request took more than {REQUEST_TIMEOUT:g} s")
        conn.settimeout(left)
        try:
            more = conn.recv(MAX_REQUEST + 1 - len(data))
        except TimeoutError:
            continue
        if not more:
            break
        data += more
        if len(data) > MAX_REQUEST:
            raise UsageError(f"the request is over {MAX_REQUEST} bytes")
    return data


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    try:
        conn.settimeout(ANSWER_TIMEOUT)
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass  # the client left
    finally:
        conn.close()


# ---- the client ------------------------------------------------------------------------------

def ask(req: dict[str, Any], path: Path = SOCKET, timeout: float = 600.0) -> dict[str, Any]:
    """The service's answer to ``req``; ``AdminServiceDown`` if it is not running,
    ``Answered`` for its refusal or error."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)  # a stop waits for the job's grace
        try:
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0:
                raise FileNotFoundError(errno.ENOENT, "not root's socket")
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AdminServiceDown(
                "other users' jobs are read by root's jobs admin service (for root and the "
                "admin group), which is not running", hint=START_HINT) from None
        s.sendall(json.dumps(req).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    finally:
        s.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise JblError("the jobs admin service gave no answer (see its log: journalctl -u "
                       f"{UNIT})") from None
    if not reply.get("ok"):
        raise Answered(str(reply.get("error")), int(reply.get("code") or 1),
                       refused=bool(reply.get("refused")))
    return dict(reply)


def _helper(argv: list[str]) -> int:
    """``python -m jbl.runner.jobadmin JOB AFTER TAIL``, run by ``_log_as`` as the job's
    user: ``log_page`` of that user's own records, as JSON on stdout."""
    try:
        store = JobStore.open_own(None, create=False)
        if store is None:
            raise NotFound("no job records")
        try:
            page = log_page(store, argv[0], int(argv[1]), int(argv[2]) if argv[2] else None)
        finally:
            store.close()
    except JblError as e:
        page = {"error": str(e), "code": int(e.exit_code)}
    sys.stdout.write(json.dumps(page))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1:]))
