"""A job cannot reach back into the caller (issue 10): its own session and process group, no
descriptor of the caller's terminal, its own session keyring; interactive use still works.

Every test drives the real ``jbl run`` as a user would: from a real pseudo-terminal (the
"caller's terminal", with ``jbl`` or a shell as its session leader) or a real script, and
checks both that the attack gets nothing and that the legitimate use beside it works.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import conftest_run
import pytest
from conftest_run import JBL, user_jbl

rt = conftest_run.rt
runtimes = conftest_run.runtimes
test_user = conftest_run.test_user
shared_dir = conftest_run.shared_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users; jobs run as root "
                                "and as a created user")

DEADLINE = 60.0


class Terminal:
    """A real pty; ``argv`` runs with its slave as controlling terminal and stdio (unless
    ``stdout`` names a file). The test keeps a slave fd, to read the terminal's modes."""

    def __init__(self, argv: list[str], rows: int = 33, cols: int = 101,
                 stdout: Path | None = None) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.modes = termios.tcgetattr(self.slave)
        self.out = b""
        self.pid = os.fork()
        if self.pid == 0:  # the test's own child: plain fork/exec, as a login would
            try:
                os.setsid()
                fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(self.slave, fd)
                if stdout is not None:
                    os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.status: int | None = None

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read(self, timeout: float) -> bool:
        if select.select([self.master], [], [], timeout)[0]:
            try:
                self.out += os.read(self.master, 65536)
            except OSError:
                return False
            return True
        return False

    def expect(self, text: str) -> str:
        """Read until ``text`` appeared; the output so far."""
        end = time.monotonic() + DEADLINE
        while text not in self.text():
            assert time.monotonic() < end, f"no {text!r} in {self.text()!r}"
            self._read(0.2)
        return self.text()

    def wait(self) -> int:
        end = time.monotonic() + DEADLINE
        while self.status is None:
            done, st = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(st)
                break
            assert time.monotonic() < end, f"still running; output {self.text()!r}"
            self._read(0.1)
        while self._read(0.05):  # what is left in the terminal
            pass
        return self.status

    def text(self) -> str:
        return self.out.decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.master)
        os.close(self.slave)


def _run_argv(rt: str, *args: str, user: str | None = None) -> list[str]:
    if user is None:
        return [JBL, "run", "--runtime-dir", rt, *args]
    return ["runuser", "-u", user, "--", user_jbl(), "run", "--runtime-dir", rt, *args]


# ---- the plan ---------------------------------------------------------------------------------

def test_plan_puts_helper_and_job_in_new_sessions_and_the_job_in_a_new_keyring() -> None:
    from jbl.runner import plan as P
    from jbl.store.manifest import parse_manifest

    m = parse_manifest("name: rt\nversion: 1.0.0\nmounts:\n - {source: isolated, target: /}\n")
    req = P.JobRequest(Path("/rt"), ("sh",), job_id="job-1")
    for ctty, ids in ((False, P.Ids(0, 0, False, 1000, 1000)), (True, P.Ids(1000, 1000, True))):
        ops = [s.op for s in P.build_plan(req, m, {"isolated": []}, ids, ctty=ctty).steps]
        assert ops[0] == "new_session"  # the helper, before anything else
        job = ops[ops.index("fork_job") + 1:]
        assert job[0] == "new_session"
        if ids.job_uid is not None:  # the keyring belongs to the job's user
            assert job.index("set_user") < job.index("new_keyring")
        assert job.index("new_keyring") < job.index("drop_caps") < job.index("exec")
        steps = P.build_plan(req, m, {"isolated": []}, ids, ctty=ctty).steps
        assert P.NewSession(ctty) in steps[ops.index("fork_job"):]


def test_tty_and_no_tty_together_is_one_line_exit_2(rt: str) -> None:
    r = subprocess.run([JBL, "run", "--runtime-dir", rt, "--tty", "--no-tty", "--", "true"],
                       capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--no-tty" in r.stderr and "--tty" in r.stderr


# ---- (a) TIOCSTI ----------------------------------------------------------------------------

INJECT = """
import fcntl, os, termios
results = []
fds = [0, 1, 2]
try:
    fds.append(os.open("/dev/tty", os.O_RDWR))
except OSError as e:
    results.append("open /dev/tty: " + os.strerror(e.errno))
for fd in fds:
    try:
        for ch in "touch {marker}\\n":
            fcntl.ioctl(fd, termios.TIOCSTI, ch.encode())
        results.append(f"fd {{fd}}: pushed")
    except OSError as e:
        results.append(f"fd {{fd}}: " + os.strerror(e.errno))
print("job-output-ok", results, flush=True)
raise SystemExit(3)
"""


@pytest.mark.parametrize("mode", [[], ["--no-tty"]], ids=["auto-pty", "no-tty"])
def test_tiocsti_from_the_job_types_nothing_into_the_callers_shell(
        rt: str, shared_dir: Path, mode: list[str]) -> None:
    marker = shared_dir / "injected-command-ran"
    script = INJECT.format(marker=marker)
    term = Terminal(["/bin/sh", "-i"])
    try:
        term.expect("# ")
        line = " ".join(_shell_quote(a) for a in _run_argv(rt, *mode, "--", "python3", "-c",
                                                            script))
        term.write(f"{line}; echo END-$?\n".encode())
        out = term.expect("END-3")
        assert "job-output-ok" in out  # the job's own output still arrives
        # anything injected into the shell's input would run now, before this line
        term.write(b"echo SYNC-$((40+2))\n")
        term.expect("SYNC-42")
        assert not marker.exists(), f"the job typed a command into the caller's shell:\n{out}"
        if mode:  # --no-tty: no terminal at all: pipes, and no controlling tty
            assert "open /dev/tty: No such device or address" in out
            assert "fd 0: Inappropriate ioctl for device" in out
        else:  # only its own pty, which is the only input it can push into
            assert "fd 0: pushed" in out
        term.write(b"exit\n")
        assert term.wait() == 0
    finally:
        term.close()


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


# ---- (b) signals to the caller's process group ----------------------------------------------

@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_kill_0_from_the_job_reaches_neither_the_caller_nor_its_siblings(
        rt: str, test_user: str, as_user: bool) -> None:
    # The job ignores its own SIGUSR1 (a handler), kills its group and the caller's by pgid,
    # and exits 7. The calling script and its sibling have SIGUSR1's default action: death.
    job = ("import os, signal, errno\n"
           "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
           "os.kill(0, signal.SIGUSR1)\n"
           "try:\n"
           "    os.kill(-int(os.environ['CALLER_PGID']), signal.SIGUSR1)\n"
           "    print('signalled the caller')\n"
           "except OSError as e:\n"
           "    print('kill(-caller):', errno.errorcode[e.errno])\n"
           "raise SystemExit(7)\n")
    argv = _run_argv(rt, "--env", "CALLER_PGID=$$", "--", "python3", "-c", job,
                     user=test_user if as_user else None)
    run = " ".join("CALLER_PGID=$$" if a.startswith("CALLER_PGID") else _shell_quote(a)
                   for a in argv)  # $$: the calling script's pid, its process group's id
    script = (f"sleep 60 & SIB=$!\n{run}\necho status=$?\n"
              "kill -0 $SIB && echo sibling-alive\nkill $SIB\n")
    r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                       timeout=DEADLINE, stdin=subprocess.DEVNULL, start_new_session=True)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "kill(-caller): ESRCH" in r.stdout  # the caller's group is not even visible
    assert "status=7" in r.stdout and "sibling-alive" in r.stdout, r.stdout + r.stderr


# ---- (c) interactive use through the job's own pty ------------------------------------------

INTERACTIVE = """
import os, signal, sys, time
print("isatty", [os.isatty(i) for i in range(3)], "size", tuple(os.get_terminal_size()))
print("session leader", os.getsid(0) == os.getpid(), "foreground", os.tcgetpgrp(0) == os.getpgrp())
tty = os.open("/dev/tty", os.O_WRONLY)
os.write(tty, b"written-to-dev-tty\\n")
signal.signal(signal.SIGWINCH,
              lambda *a: print("resized", tuple(os.get_terminal_size()), flush=True))
print("READY", flush=True)
print("read", repr(sys.stdin.readline()), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_interactive_job_gets_its_own_pty_window_size_and_ctrl_c(
        rt: str, test_user: str, as_user: bool) -> None:
    term = Terminal(_run_argv(rt, "--", "python3", "-c", INTERACTIVE,
                              user=test_user if as_user else None))
    try:
        out = term.expect("READY")
        assert "isatty [True, True, True] size (101, 33)" in out
        assert "session leader True foreground True" in out
        assert "written-to-dev-tty" in out  # /dev/tty is the job's own pty
        raw = termios.tcgetattr(term.slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO  # caller's is raw
        fcntl.ioctl(term.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        term.expect("resized (120, 40)")
        term.write(b"typed\r")
        term.expect("read 'typed\\n'")
        term.write(b"\x03")  # Ctrl-C: through the pty, the job's line discipline signals it
        assert term.wait() == 130, term.text()
        assert "KeyboardInterrupt" in term.text()
        assert termios.tcgetattr(term.slave) == term.modes  # the caller's terminal restored
    finally:
        term.close()


def test_terminal_is_restored_when_jbl_is_terminated(rt: str) -> None:
    term = Terminal(_run_argv(rt, "--kill-after", "1s", "--", "sh", "-c",
                              "echo READY; sleep 60"))
    try:
        term.expect("READY")
        assert termios.tcgetattr(term.slave) != term.modes
        os.kill(term.pid, signal.SIGTERM)
        assert term.wait() == 128 + signal.SIGTERM
        assert termios.tcgetattr(term.slave) == term.modes
    finally:
        term.close()


@pytest.mark.parametrize("mode", [[], ["--tty"], ["--no-tty"]], ids=["auto", "tty", "no-tty"])
def test_exit_code_passes_through_in_every_mode(rt: str, mode: list[str]) -> None:
    term = Terminal(_run_argv(rt, *mode, "--", "sh", "-c", "echo hi; exit 7"))
    try:
        assert term.wait() == 7
        assert "hi\n" in term.text()
        assert termios.tcgetattr(term.slave) == term.modes
    finally:
        term.close()


# ---- (d) output redirected: no pty, stdout and stderr apart, no terminal fd -----------------

SEPARATE = """
import os, sys
print("to-stdout", flush=True)
print("fds", [os.isatty(i) for i in range(3)],
      [os.readlink(f"/proc/self/fd/{i}").split(":")[0] for i in (0, 2)], file=sys.stderr)
try:
    os.open("/dev/tty", os.O_RDWR)
except OSError as e:
    print("/dev/tty:", os.strerror(e.errno), file=sys.stderr)
print("READY", file=sys.stderr, flush=True)
print("read", repr(sys.stdin.readline()), file=sys.stderr, flush=True)
raise SystemExit(5)
"""


def test_redirected_output_keeps_stdout_and_stderr_apart(rt: str, shared_dir: Path) -> None:
    out_file = shared_dir / "out.json"
    term = Terminal(_run_argv(rt, "--", "python3", "-c", SEPARATE), stdout=out_file)
    try:
        term.expect("READY")
        term.write(b"a line\n")  # stdin is relayed through a pipe, line by line
        assert term.wait() == 5
        assert out_file.read_text() == "to-stdout\n"
        text = term.text()
        assert "to-stdout" not in text
        assert "fds [False, False, False] ['pipe', 'pipe']" in text  # never the terminal
        assert "/dev/tty: No such device or address" in text
        assert "read 'a line\\n'" in text
    finally:
        term.close()


# ---- (e) the session keyring ------------------------------------------------------------------

KEYCTL = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
GET_KEYRING_ID, SEARCH, READ, SESSION = 0, 10, 11, -3
def keyctl(*args):
    r = libc.syscall(SYS_KEYCTL, *args)
    return r if r >= 0 else errno.errorcode[ctypes.get_errno()]
def add(desc, payload):
    return libc.syscall(SYS_ADD_KEY, b"user", desc, payload, len(payload), SESSION)
def read(key):
    buf = ctypes.create_string_buffer(64)
    n = keyctl(READ, key, buf, 64)
    return buf.raw[:n] if isinstance(n, int) else n
"""

CALLER = KEYCTL + """
keyctl(1, None)  # KEYCTL_JOIN_SESSION_KEYRING: a fresh session keyring of our own
key = add(b"jbl-test-secret", b"kerberos-ticket")
assert read(key) == b"kerberos-ticket"
ids = {"SECRET_KEY_ID": key, "CALLER_SESSION": keyctl(GET_KEYRING_ID, SESSION, 0)}
argv = [f"{a[:-1]}{ids[a[:-2]]}" if a.endswith("=?") else a for a in sys.argv[1:]]
r = os.spawnvp(os.P_WAIT, argv[0], argv)
print("caller still reads", read(key), flush=True)
raise SystemExit(r)
"""

JOB = KEYCTL + """
key = int(os.environ["SECRET_KEY_ID"])
print("session differs", keyctl(GET_KEYRING_ID, SESSION, 0) != int(os.environ["CALLER_SESSION"]))
print("search", keyctl(SEARCH, SESSION, b"user", b"jbl-test-secret", 0))
print("read", read(key))
own = add(b"job-key", b"job-payload")  # the job's own keyring works for the job
print("own", read(own))
"""


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_job_cannot_read_the_callers_session_keyring(rt: str, test_user: str,
                                                     as_user: bool) -> None:
    user = test_user if as_user else None
    # SECRET_KEY_ID=? and CALLER_SESSION=? are filled in by the caller once it holds the key
    argv = _run_argv(rt, "--env", "SECRET_KEY_ID=?", "--env", "CALLER_SESSION=?", "--",
                     "python3", "-c", JOB, user=user)
    if user:  # the caller is the user, keyring and all: runuser starts the caller script
        caller = [*argv[:4], "/usr/bin/python3", "-c", CALLER, *argv[4:]]
    else:
        caller = ["/usr/bin/python3", "-c", CALLER, *argv]
    r = subprocess.run(caller, capture_output=True, text=True, timeout=DEADLINE,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["session differs True", "search ENOKEY", "read EACCES",
                                     "own b'job-payload'",
                                     "caller still reads b'kerberos-ticket'"], r.stdout + r.stderr
