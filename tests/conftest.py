"""Shared fixtures: a CLI driver, fresh stores, real runtimes built from this host.

Every test that changes a store should end with ``assert_store_ok(store_dir)`` (the integrity
check) — the ``store`` fixture does it automatically at teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
JBL = str(Path(sys.executable).with_name("jbl"))

from rtbuild import build_runtime  # noqa: E402

# Job records of the jobs tests run as root go to a directory of the session's own, never
# into root's real ones (/var/lib/jbl-jobs): JBL_JOBS_DIR, inherited by every jbl the tests
# start. Under /run (root's, 0755), as /tmp's sticky 1777 is no safe parent for records.
# Test users' jbl ignores it (not their directory) and keeps to their own homes.
if os.geteuid() == 0 and "JBL_JOBS_DIR" not in os.environ:
    import tempfile

    os.environ["JBL_JOBS_DIR"] = tempfile.mkdtemp(prefix="jbl-test-jobs-", dir="/run")


# Jobs run in-process unless a test asks for the resident launcher (tests/test_launcher.py
# does, per call): no launcher of a test outlives it in a cgroup or cwd another test removes.
# `JBL_LAUNCHER=1 pytest tests/test_run_*.py` runs those through launchers instead.
os.environ.setdefault("JBL_LAUNCHER", "0")


def pytest_sessionfinish(session: pytest.Session) -> None:
    jobs = os.environ.get("JBL_JOBS_DIR", "")
    if os.geteuid() == 0 and Path(jobs).name.startswith("jbl-test-jobs-"):
        import shutil

        shutil.rmtree(jobs, ignore_errors=True)

# fixtures shared by the multi-user tests (``users``: real users for one module)
pytest_plugins = ["fixtures_users"]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def ok(self) -> Result:
        assert self.rc == 0, f"jbl failed rc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        return self


def run_jbl(*args: str | os.PathLike[str], store: Path | None = None, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 300,
            user: str | None = None) -> Result:
    """Run the real ``jbl`` console script as a user would, in a subprocess."""
    argv = [JBL]
    if store is not None:
        argv += ["--store", str(store)]
    argv += [str(a) for a in args]
    if user is not None:
        argv = ["runuser", "-u", user, "--"] + argv
    e = dict(os.environ)
    e.pop("JBL_STORE", None)
    if env:
        e.update(env)
    p = subprocess.run(argv, capture_output=True, text=True, input=input, env=e,
                       timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(r: Result, rc: int | None = None, contains: str | None = None) -> None:
    assert r.rc != 0, f"expected failure, got rc=0: {r.out}"
    if rc is not None:
        assert r.rc == rc, f"rc={r.rc} (wanted {rc}): {r.err}"
    lines = [ln for ln in r.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{r.err}"
    assert "Traceback" not in r.err
    if contains is not None:
        assert contains in r.err, f"{contains!r} not in {r.err!r}"


def assert_store_ok(store_dir: Path) -> None:
    """The integrity check: index <-> blobs consistent (``jbl store verify``)."""
    if not (store_dir / "index.db").exists():
        return  # the test never made a store (nothing to check, nothing to hide)
    r = run_jbl("store", "verify", store=store_dir)
    assert r.rc == 0, f"store verify failed:\n{r.out}\n{r.err}"


@pytest.fixture
def store_dir(tmp_path: Path):
    d = tmp_path / "store"
    yield d
    assert_store_ok(d)


@pytest.fixture(scope="session")
def rt_factory(tmp_path_factory: pytest.TempPathFactory):
    """build(name, version, **kw) -> runtime directory (cached per (name, version, probe))."""
    cache: dict[tuple[str, str, str | None], Path] = {}
    base = tmp_path_factory.mktemp("runtimes")

    def build(name: str = "pyrt", version: str = "1.0.0", probe: str | None = None,
              extra: dict[str, bytes] | None = None) -> Path:
        key = (name, version, probe)
        if key not in cache or extra:
            d = base / f"{name}-{version}-{len(cache)}"
            cache[key] = build_runtime(d, name, version, probe=probe, extra=extra)
        return cache[key]

    return build
