"""Real unprivileged users and a shared-server store, for the multi-user tests.

``make_users()`` creates Linux users with ``useradd -m`` (and an admin group), removed again
with ``userdel -r`` at teardown. ``as_user(name, *args)`` runs the real ``jbl`` as that user.

Other users run jbl as they would on a real server: the system-wide install that ``make
install`` makes (``PREFIX/bin/jbl``, PREFIX ``/opt/jbl`` unless ``JBL_PREFIX`` says
otherwise), not the development venv (whose Python may live under a 0700 /root). Once per
session ``installed_jbl()`` asks ``tools/install.py --check`` whether that install matches
this clone's sources (a digest, ~0.1 s) and runs ``make install`` when it does not (a
refresh of jbl's own files takes ~1-3 s; the first install 10-60 s, pyfuse3 being built from
source). If the install cannot be made, every test that needs it fails, saying why.

Shared paths must be reachable by those users, so the tests' shared base directory is made
with mode 0755 under /tmp instead of pytest's 0700 tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Result


@dataclass(frozen=True)
class Users:
    admin_group: str
    alice: str   # an ordinary user
    bob: str     # another ordinary user
    carol: str   # a member of the admin group

    def uid(self, name: str) -> int:
        import pwd

        return pwd.getpwnam(name).pw_uid

    def home(self, name: str) -> Path:
        return Path("/home") / name


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _user_exists(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode == 0


def make_users(tag: str | None = None) -> Users:
    tag = tag or secrets.token_hex(2)
    u = Users(admin_group=f"jblt{tag}-adm", alice=f"jblt{tag}-alice", bob=f"jblt{tag}-bob",
              carol=f"jblt{tag}-carol")
    drop_users(u)  # a crashed earlier run with the same tag
    _sh("groupadd", u.admin_group)
    for name in (u.alice, u.bob, u.carol):
        _sh("useradd", "-m", "-s", "/bin/sh", name)
        os.chmod(u.home(name), 0o700)  # the point of the isolation tests
    _sh("usermod", "-aG", u.admin_group, u.carol)
    return u


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """Three real users and an admin group for one test module (``users`` in any test;
    registered through ``pytest_plugins`` in conftest.py); removed again at its end."""
    u = make_users()
    try:
        yield u
    finally:
        drop_users(u)


def drop_users(u: Users) -> None:
    for name in (u.alice, u.bob, u.carol):
        if _user_exists(name):
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
    subprocess.run(["groupdel", u.admin_group], capture_output=True)


def shared_dir(prefix: str = "jbl-shared-") -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


PREFIX = Path(os.environ.get("JBL_PREFIX", "/opt/jbl"))  # as `make test` passes them
BINDIR = Path(os.environ.get("JBL_BINDIR", "/usr/local/bin"))
_INSTALL: dict[str, str] = {}  # this session's outcome: {"jbl": path} or {"error": why}


def installed_jbl() -> str:
    """``PREFIX/bin/jbl``, up to date with this clone (see the module docstring)."""
    if not _INSTALL:
        where = [f"PREFIX={PREFIX}", f"BINDIR={BINDIR}"]
        check = subprocess.run([sys.executable, str(REPO / "tools/install.py"), "--check",
                                "--prefix", str(PREFIX), "--bindir", str(BINDIR)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode == 0:
            _INSTALL["jbl"] = str(PREFIX / "bin/jbl")
        else:
            p = subprocess.run(["make", "-s", "-C", str(REPO), "install", *where],
                               capture_output=True, text=True, timeout=1200)
            if p.returncode == 0:
                _INSTALL["jbl"] = str(PREFIX / "bin/jbl")
            else:
                _INSTALL["error"] = (f"`make install {' '.join(where)}` failed (needed: "
                                     f"{check.stdout.strip()}):\n{p.stdout}{p.stderr}")
    if "error" in _INSTALL:
        pytest.fail(_INSTALL["error"], pytrace=False)
    return _INSTALL["jbl"]


def user_jbl() -> str:
    """The ``jbl`` other users run: the system-wide install."""
    return installed_jbl()


def as_user(user: str, *args: str | os.PathLike[str], store: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 120,
            input: str | None = None) -> Result:
    """Run ``jbl ARGS`` as ``user`` (via runuser), with that user's HOME."""
    exe = user_jbl()
    e = {"HOME": f"/home/{user}", "USER": user, "LOGNAME": user, "XDG_DATA_HOME": "",
         "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}
    e.update(env or {})
    argv = ["runuser", "-u", user, "--", exe]
    if store is not None:
        argv += ["--store", str(store)]
    argv += [str(a) for a in args]
    full = {k: v for k, v in os.environ.items() if k != "JBL_STORE"}
    full.update(e)
    p = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=timeout,
                       input=input, stdin=None if input is not None else subprocess.DEVNULL,
                       cwd="/")
    return Result(p.returncode, p.stdout, p.stderr)


def sh_as(user: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A plain shell command as ``user`` (what they could do without jbl)."""
    return subprocess.run(["runuser", "-u", user, "--", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, cwd="/")


def make_registry(reg: Path, runtimes: list[tuple[str, str, Path]]) -> Path:
    """``reg/registry.json`` + one ``.tar`` per (name, version, runtime dir), by hand.

    Written with ``tar`` and the documented format rather than ``jbl pack``/``registry add``,
    so these tests depend only on ``jbl store install``.
    """
    reg.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {"version": "1", "updated_at": "2025-01-01T00:00:00Z",
                              "runtimes": {}}
    for name, version, src in runtimes:
        tb = reg / f"{name}-{version}.tar"  # uncompressed: gzip would dominate the setup time
        subprocess.run(["tar", "-C", str(src), "-cf", str(tb), "."], check=True)
        data = tb.read_bytes()
        doc["runtimes"].setdefault(name, {})[version] = {  # type: ignore[union-attr]
            "version": version, "description": f"{name} {version} (test)",
            "download_url": tb.name, "checksum": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data), "platforms": ["ubuntu-amd64", "ubuntu-arm64"]}
    (reg / "registry.json").write_text(json.dumps(doc, indent=1))
    return reg


def tree_state(store: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file in a store: "unchanged" means equal."""
    out = []
    for p in sorted(store.rglob("*")):
        if p.is_file() and not p.name.endswith(("-shm",)):
            st = p.stat()
            out.append((str(p.relative_to(store)), st.st_size, st.st_mtime_ns))
    return out


def index_dump(store: Path, tables: tuple[str, ...] = ("blobs", "contents", "chunks",
                                                       "entries", "meta")) -> list[str]:
    """What installs/removals change in the index, as text (read-only), to compare.

    ``versions`` is compared without ``last_used_at`` (a mount or a job touching a version
    legitimately updates it) and ``leases`` not at all (live readers hold them).
    """
    import apsw

    conn = apsw.Connection(str(store / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = [f"versions{r!r}" for r in conn.execute(
            "SELECT id, name, version, state, root_id, pinned FROM versions ORDER BY id")]
        for name in tables:
            rows += [f"{name}{r!r}" for r in conn.execute(f'SELECT * FROM "{name}"')]
        return rows
    finally:
        conn.close()
