"""The raw engine needs neither pyfuse3 nor trio (issue 12): a ``jbl mount`` on a machine
where neither can be imported serves the store, and the pyfuse3 engine there is refused
with one clear line.

"Cannot be imported" is real, not simulated in-process: a ``sitecustomize`` on
``PYTHONPATH`` installs a meta-path finder that makes ``import pyfuse3``/``import trio``
raise ImportError in every Python the command starts (the CLI and the mount daemon it
spawns, which inherits the environment).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_jbl
from fixtures_mount import import_tarball, mounted, pyrt_tarball, sweep_mounts  # noqa: F401
from jbl.fusefs import mounttab
from jbl.store.errors import ExitCode

BLOCKER = '''
import sys

class _Block:
    """Make pyfuse3 and trio unimportable, as on a machine without them."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("pyfuse3", "trio"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Block())
'''


@pytest.fixture(scope="module")
def no_pyfuse3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("nopyfuse3")
    (d / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(d)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, pyrt_tarball: Path) -> Path:  # noqa: F811
    s = tmp_path_factory.mktemp("np") / "store"
    import_tarball(s, pyrt_tarball)
    return s


def test_the_blocker_works(no_pyfuse3: dict[str, str]) -> None:
    # without this, the tests below would prove nothing
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import pyfuse3"], capture_output=True,
                       text=True, env={**os.environ, **no_pyfuse3})
    assert r.returncode != 0 and "blocked by the test" in r.stderr


def test_the_raw_engine_serves_without_pyfuse3(store: Path, tmp_path: Path,
                                               no_pyfuse3: dict[str, str]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = run_jbl("mount", mp, "--engine", "raw", store=store, env=no_pyfuse3)
    assert r.rc == 0, r.err
    try:
        assert mounttab.mount_fstype(mp) == mounttab.FSTYPE
        iso = mp / "pyrt/1.0.0/isolated"
        assert (iso / "usr/bin").is_dir()
        assert (mp / "pyrt/1.0.0/runtime.yml").read_bytes().startswith(b"name:")
        # the daemon really ran under the blocker: its environment carries it
        (st,) = [s for s in mounttab.records() if s.mountpoint == str(mp)]
        env = Path(f"/proc/{st.pid}/environ").read_bytes().split(b"\0")
        assert f"PYTHONPATH={no_pyfuse3['PYTHONPATH']}".encode() in env
    finally:
        run_jbl("umount", mp, store=store, env=no_pyfuse3).ok()
    assert mounttab.mount_fstype(mp) is None


def test_the_pyfuse3_engine_without_pyfuse3_is_one_clear_line(
        store: Path, tmp_path: Path, no_pyfuse3: dict[str, str]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = run_jbl("mount", mp, "--engine", "pyfuse3", store=store, env=no_pyfuse3)
    assert_one_line_error(r, rc=int(ExitCode.MOUNT), contains="pyfuse3 mount engine is not "
                          "available")
    assert mounttab.mount_fstype(mp) is None
