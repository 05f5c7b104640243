"""The resident launcher's wire protocol, where its socket lives, and the light client.

This module is what ``jbl run`` pays for before a job starts when a launcher is running, so
it imports only ``os``, ``sys``, ``_socket``, ``_signal`` and ``zlib`` (no ``json``, no
``socket`` wrapper, nothing of jbl). ``runner/launcher.py`` is the server; docs/runner.md
("The resident launcher") is the prose.

**Scope.** A launcher serves one *scope*: the code it runs (``token()``: the interpreter,
every ``.py`` file of jbl's four packages by name, size and mtime) and the process facts a
job inherits from whoever starts it and a forked child cannot adopt afterwards
(``facts()``: uid/gids/groups, capabilities, no_new_privs, seccomp, CPU and memory nodes
allowed, rlimits, cgroup, namespaces, nice, oom_score_adj, ``PYTHON*`` variables). Its
socket is named by a checksum of the scope, ``DIR/<key>.sock`` in the user's own 0700
``DIR`` (``launcher_dir()``, beside the views), and the request repeats the whole scope, so
a launcher of older code or of another cgroup is never used: the client runs the job
in-process instead and starts one of its own.

**Request** (client -> launcher, one ``sendmsg`` carrying fds 0, 1, 2 and an ``O_PATH`` fd on
the cwd with ``SCM_RIGHTS``, then the rest with ``sendall``)::

    b"JBL1" <u32 big-endian length> <payload: NUL-separated fields>
    payload = op \0 scope \0 umask \0 argc \0 argv... \0 env "K=V"...

``op`` is ``run`` (the rest is ``jbl``'s argv) or ``status`` / ``stop``. After the request
the client sends one byte per signal it received (its number), to be delivered to the
process running the job. Bounded: ``REQUEST_MAX`` bytes, read within ``REQUEST_TIMEOUT``.

**Replies** (launcher -> client), ASCII lines. For ``run``: ``ready`` (the request is good),
to which the client answers one byte ``g`` (it is committed: from then on it never runs the
job itself), then ``ok <job process pid> <launcher pid> <requests served>`` and, when the
job process ended, ``exit <status>``. ``no <reason>`` instead of ``ready``, a connection that
closes or a timeout before ``ready``: the client runs the job itself (nothing was started,
and without its ``g`` nothing will be). After ``g`` a closed connection is an error, never a
second run. ``status``/``stop`` are answered ``ok`` (or ``no``) at once.

Trust: the client sends its environment (secrets included) only to a peer whose
``SO_PEERCRED`` uid is its own; the launcher serves only its own uid (root included).

Thread-safety: plain functions for the main thread of a short-lived process.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys
import zlib

PROTO = b"JBL1"
GO = b"g"  # the client's commit, after "ready"
REQUEST_MAX = 4 << 20  # bytes: argv + environment; beyond it the job runs in-process
REQUEST_TIMEOUT = 5.0  # seconds for the whole request to arrive
CONNECT_TIMEOUT = 2.0  # seconds for the launcher's "ok"/"no" once the request is sent
LINE_MAX = 4096  # bytes of one reply line
# What the client forwards: what the runner itself forwards to a job (runner/sandbox.FORWARD)
FORWARD = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM, _signal.SIGUSR1,
           _signal.SIGUSR2, _signal.SIGCONT, _signal.SIGWINCH)  # _signal: signal.py's enums
# cost the client ~1 ms of imports
PACKAGES = ("cli", "runner", "store", "fusefs")  # jbl's package directories (pyproject)
STATUS_FACTS = (b"Uid:", b"Gid:", b"Groups:", b"NoNewPrivs:", b"Seccomp:", b"Cap",
                b"Cpus_allowed_list:", b"Mems_allowed_list:")
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup")


class NoLauncher(Exception):
    """No launcher took the request (none, stale, refused, other code): nothing started."""


class Committed(Exception):
    """The client said go, then the launcher failed: the job may have started, so it must
    not run again here (one error line, exit 1)."""


def switches(env: dict[str, str] | os._Environ[str] | None = None) -> tuple[bool, bool]:
    """(use a launcher, start one): ``JBL_LAUNCHER=0`` is neither; ``JBL_VIEW_LINGER`` of
    zero (``0``, ``0s``, ...: nothing lingers) or malformed (``jbl run`` reports it, exit 2)
    starts none. The one place that reads ``JBL_LAUNCHER`` (store/settings.py documents it),
    here because this runs before anything of jbl is imported; the launcher itself takes
    its linger from ``Settings.view_linger``."""
    env = os.environ if env is None else env
    if env.get("JBL_LAUNCHER", "").strip() == "0":
        return False, False
    text = env.get("JBL_VIEW_LINGER", "").strip().lower()
    try:
        lingers = not text or float(text.rstrip("smhd")) > 0
    except ValueError:
        lingers = False
    return True, lingers


def launcher_dir(env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The user's launcher directory: beside the views and mount records
    (fusefs/mounttab.records_dir's parent, same rules): root ``/run/jbl/launcher``; a user
    ``$XDG_RUNTIME_DIR/jbl/launcher`` when that is theirs, else
    ``~/.local/state/jbl/launcher``."""
    env = os.environ if env is None else env
    uid = os.geteuid()
    if uid == 0:
        return "/run/jbl/launcher"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        try:
            if os.stat(xdg).st_uid == uid:
                return os.path.join(xdg, "jbl/launcher")
        except OSError:
            pass
    return os.path.join(os.path.expanduser("~"), ".local/state/jbl/launcher")


def package_root() -> str:
    """The directory holding jbl's package directories (cli/, runner/, ...)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token() -> str:
    """The code a launcher runs: the interpreter and every ``.py`` of jbl by name, size
    and mtime. Any edit or upgrade changes it, so old code is never asked to run a job."""
    root = package_root()
    h = zlib.crc32(f"{sys.executable}\n{sys.version}\n{root}\n".encode())
    n = 0
    for pkg in PACKAGES:
        try:
            entries = sorted(os.scandir(os.path.join(root, pkg)), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.endswith(".py"):
                st = e.stat(follow_symlinks=True)
                h = zlib.crc32(f"{pkg}/{e.name}:{st.st_size}:{st.st_mtime_ns}\n".encode(), h)
                n += 1
    return f"{h:08x}.{n}"


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b"-"
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def facts(env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """What a job would inherit from this process that a forked launcher child cannot take
    over from the request (see the module docstring): one line each."""
    env = os.environ if env is None else env
    status = _read("/proc/self/status").splitlines()
    lines = [ln for ln in status if ln.startswith(STATUS_FACTS)]
    lines.append(b"cgroup " + _read("/proc/self/cgroup").replace(b"\n", b";"))
    lines.append(b"limits " + zlib.crc32(_read("/proc/self/limits")).to_bytes(4, "big").hex()
                 .encode())
    lines.append(b"oom " + _read("/proc/self/oom_score_adj").strip())
    for ns in NAMESPACES:
        try:
            lines.append(os.readlink(f"/proc/self/ns/{ns}").encode())
        except OSError:
            lines.append(ns.encode() + b":-")
    lines.append(f"nice {os.getpriority(os.PRIO_PROCESS, 0)}".encode())
    lines.extend(sorted(f"{k}={v}".encode("utf-8", "surrogateescape")
                        for k, v in env.items() if k.startswith("PYTHON")))
    return b"\n".join(lines).decode("utf-8", "replace").replace("\0", "")


def scope(env: dict[str, str] | os._Environ[str] | None = None) -> str:
    return f"{token()}\n{facts(env)}"


def key(scope_text: str) -> str:
    """The socket's name for a scope: two checksums (the request repeats the whole scope,
    so a collision can only make a launcher refuse, never serve the wrong scope)."""
    data = scope_text.encode()
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def socket_path(directory: str, scope_key: str) -> str:
    return os.path.join(directory, f"{scope_key}.sock")


def encode_request(op: str, scope_text: str, argv: list[str],
                   env: dict[bytes, bytes] | os._Environ[bytes], umask: int) -> bytes:
    fields = [op.encode(), scope_text.encode(), str(umask).encode(), str(len(argv)).encode(),
              *(os.fsencode(a) for a in argv), *(k + b"=" + v for k, v in env.items())]
    payload = b"\0".join(fields)
    return PROTO + len(payload).to_bytes(4, "big") + payload


def _connect(path: str) -> _socket.socket:
    """A connection to the launcher at ``path`` whose peer is our own uid, else NoLauncher.
    A path too long for ``sun_path`` is reached through its directory's ``/proc`` fd."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    dfd = -1
    try:
        s.settimeout(CONNECT_TIMEOUT)
        target = path
        if len(os.fsencode(path)) >= 100:
            dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            target = f"/proc/self/fd/{dfd}/{os.path.basename(path)}"
        s.connect(target)
        cred = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        uid = int.from_bytes(cred[4:8], sys.byteorder)
        if uid != os.geteuid():
            raise NoLauncher(f"{path}: served by uid {uid}, not ours")
    except OSError as e:
        s.close()
        raise NoLauncher(f"{path}: {e.strerror or e}") from None
    except BaseException:
        s.close()
        raise
    finally:
        if dfd >= 0:
            os.close(dfd)
    return s


class Lines:
    """ASCII reply lines from the launcher, each at most ``LINE_MAX`` bytes."""

    def __init__(self, s: _socket.socket) -> None:
        self.s = s
        self.buf = b""

    def next(self) -> str | None:
        while b"\n" not in self.buf:
            if len(self.buf) > LINE_MAX:
                return None
            try:
                data = self.s.recv(LINE_MAX)
            except OSError:
                return None
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("ascii", "replace")


def request(op: str, argv: list[str], scope_text: str | None = None,
            directory: str | None = None) -> tuple[_socket.socket, Lines, list[str]]:
    """Send ``op`` to this scope's launcher with our fds 0-2 and cwd; return the connection,
    its reply reader and the ``ok`` line's fields, or raise NoLauncher (nothing started)."""
    scope_text = scope() if scope_text is None else scope_text
    path = socket_path(directory or launcher_dir(), key(scope_text))
    s = _connect(path)
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        data = encode_request(op, scope_text, argv, os.environb, umask)
        fds = _fds()
        try:
            rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
            sent = s.sendmsg([data[:65536]],
                             [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
            s.sendall(data[sent:])
        finally:
            os.close(fds[3])
        lines = Lines(s)
        reply = (lines.next() or "no the launcher closed the connection").split(" ")
        if reply[0] == "ready":  # a job: commit to it (from here on never run it here)
            s.sendall(GO)
            s.settimeout(None)
            reply = (lines.next() or "no the launcher closed the connection").split(" ")
            if reply[0] != "ok":
                raise Committed(" ".join(reply[1:]))
        if reply[0] != "ok":
            raise NoLauncher(" ".join(reply[1:]))
        s.settimeout(None)
        return s, lines, reply[1:]
    except Committed:
        s.close()
        raise
    except OSError as e:
        s.close()
        raise NoLauncher(f"{path}: {e.strerror or e}") from None
    except BaseException:
        s.close()
        raise


def _fds() -> list[int]:
    """Our 0, 1, 2 and an O_PATH fd on the cwd. A closed 0-2 raises (EBADF): the job then
    runs in-process, which keeps a closed fd closed."""
    for fd in (0, 1, 2):
        os.fstat(fd)  # EBADF: run in-process, which keeps a closed fd closed
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return [0, 1, 2, cwd]


def run_via_launcher(argv: list[str]) -> int:
    """``jbl ARGV`` (a ``run``) through this scope's launcher: forward our signals while the
    job runs and return its exit status; NoLauncher when none took it. The handlers are in
    place before the request goes out (a signal that comes first is sent after ``ok``; with
    no launcher it is raised again once they are gone, as if they never were)."""
    conn: list[_socket.socket] = []
    pending: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if not conn:
            pending.append(sig)
            return
        try:  # noqa: SIM105 (contextlib is an import this path does without)
            conn[0].send(bytes([sig]))
        except OSError:
            pass  # the job process is gone; its status follows

    old = {sig: _signal.signal(sig, forward) for sig in FORWARD}
    try:
        try:
            s, lines, _ok = request("run", argv)
        except Committed:
            line = None
            s = None
        except NoLauncher:
            for sig, handler in old.items():
                _signal.signal(sig, handler)
            old.clear()
            for num in pending:
                os.kill(os.getpid(), num)
            raise
        if s is not None:
            conn.append(s)
            for num in pending:
                forward(num, None)
            line = lines.next()
            s.close()
    finally:
        for sig, handler in old.items():
            _signal.signal(sig, handler)
    if line is None or not line.startswith("exit "):
        print("jbl: error: the launcher's job process ended without a status (see "
              "'jbl launcher status'; JBL_LAUNCHER=0 runs jobs without it)", file=sys.stderr)
        return 1
    return int(line[5:])


def spawn() -> None:
    """Start this scope's launcher in the background (double fork, own session, stdio on
    /dev/null) and return at once; it exits by itself if another one already serves. Not
    when its directory could never be made (a user without a home): each job would start
    a Python that fails."""
    p = launcher_dir()
    while not os.path.lexists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    if not os.access(p, os.W_OK):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")  # hold no caller's directory (or mount) busy for its lifetime
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        os.execv(sys.executable, [sys.executable, "-m", "jbl.runner.launcher", "serve"])
    finally:
        os._exit(1)
