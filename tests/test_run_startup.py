"""``jbl run`` starts fast without cutting corners: the forked helper leaves nothing of the
supervisor in the job's relays, a threaded caller still gets an exec'd helper, and the parsed
runtime.yml cache is used only for exactly the same bytes and is validated like a fresh parse."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import conftest_run
import pytest
from conftest_run import JBL

rt = conftest_run.rt
runtimes = conftest_run.runtimes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs here run as root")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_the_jobs_relays_hold_none_of_the_supervisors_files(rt: str, tmp_path: Path) -> None:
    secret = tmp_path / "held-open-by-jbl"
    secret.write_text("x")
    with open(secret) as held:  # an fd jbl inherits; the helper and init must not keep it
        proc = subprocess.Popen([JBL, "run", "--runtime-dir", rt, "--", "/bin/sleep", "3"],
                                pass_fds=(held.fileno(),), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    try:
        relays: list[int] = []
        deadline = time.monotonic() + 20
        while len(relays) < 2 and time.monotonic() < deadline:
            helper = _children(proc.pid)
            relays = helper + [c for h in helper for c in _children(h)]
            time.sleep(0.05)
        assert len(relays) >= 2, "no helper and init found under jbl"
        for pid in relays:
            fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
            assert fds <= {0, 1, 2}, f"relay {pid} holds {targets}"
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


THREADED = """
import sys, threading, time
from pathlib import Path
from jbl.runner.plan import JobRequest
from jbl.runner.supervise import run_job, single_threaded
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
assert not single_threaded()
ok = run_job(JobRequest(Path(sys.argv[1]), ("/bin/sh", "-c", "echo hello; exit 7")))
print("status", ok.exit_status)
try:
    run_job(JobRequest(Path(sys.argv[1]), ("/no/such/program",)))
except Exception as e:
    print("error", type(e).__name__, e)
"""


def test_a_threaded_caller_gets_an_execd_helper_that_behaves_the_same(rt: str) -> None:
    r = subprocess.run([sys.executable, "-c", THREADED, rt], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "hello", "status 7",
        "error CommandNotFound /no/such/program: no such file in the runtime"]


def _cache_entry(home: Path, rt: str) -> Path:
    """The one cache record written for ``rt``'s runtime.yml: named by its crc32 and length
    (the rest of the name is the cache format's tag, which the test does not pin)."""
    data = (Path(rt) / "runtime.yml").read_bytes()
    pattern = f"{zlib.crc32(data):08x}-{len(data)}.*marshal"
    found = sorted((home / "jbl" / "manifests").glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _run_with_cache(rt: str, cache: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPROFILEIMPORTTIME": "1"}
    return subprocess.run([JBL, "run", "--runtime-dir", rt, "--", *cmd], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def _imported(stderr: str, module: str) -> bool:
    return any(line.rstrip().endswith(f"| {module}") or line.rstrip().endswith(f" {module}")
               for line in stderr.splitlines() if line.startswith("import time:"))


def test_a_second_job_uses_the_parsed_manifest_without_loading_yaml(rt: str,
                                                                      tmp_path: Path) -> None:
    first = _run_with_cache(rt, tmp_path, "/bin/sh", "-c", "echo $LANG")
    assert first.returncode == 0 and first.stdout == "C.UTF-8\n", first.stderr
    assert _imported(first.stderr, "yaml")
    entry = _cache_entry(tmp_path, rt)
    assert entry.stat().st_mode & 0o077 == 0
    second = _run_with_cache(rt, tmp_path, "/bin/sh", "-c", "echo $LANG")
    assert second.returncode == 0 and second.stdout == "C.UTF-8\n", second.stderr
    assert not _imported(second.stderr, "yaml")


def test_a_cache_entry_is_validated_like_a_fresh_parse(rt: str, tmp_path: Path) -> None:
    """Someone (or a bug) left a cached document that escapes the runtime: refused, exactly
    as runtime.yml saying so would be; a document cached for other bytes is ignored."""
    assert _run_with_cache(rt, tmp_path, "/bin/true").returncode == 0
    entry = _cache_entry(tmp_path, rt)
    data, doc = marshal.loads(entry.read_bytes())
    evil = dict(doc, mounts=[{"source": "../../..", "target": "/"}])
    entry.write_bytes(marshal.dumps((data, evil)))
    r = _run_with_cache(rt, tmp_path, "/bin/true")
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert r.returncode != 0 and errors == [
        "jbl: error: unsafe archive: runtime.yml mount source leaves the runtime: "
        "'../../..'"], r.stderr
    entry.write_bytes(marshal.dumps((data + b"# other bytes\n", evil)))
    assert _run_with_cache(rt, tmp_path, "/bin/true").returncode == 0
