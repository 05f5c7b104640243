"""A removed version someone keeps open through the mount is held only ``removed_hold_limit``
(issue 10, point 6): until then ``store df``/``gc`` name the holder (uid and pid of the last
request the mount saw), after it the mount lets go, gc frees the version and the holder's
next access fails instead of pinning the version forever.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_jbl
from fixtures_mount import ENGINES, import_tarball, make_tarball, wait_until

LIMIT = "3s"


@pytest.fixture(params=ENGINES)  # one lease policy for both engines (fusefs/core.py)
def mounted(request: pytest.FixtureRequest, rt_factory, store_dir: Path,  # type: ignore[no-untyped-def]
            tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    import_tarball(store_dir, make_tarball(rt_factory("pyrt", "1.0.0"), tmp_path / "a.tar.gz"))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"removed_hold_limit: {LIMIT}\n")
    env = {"JBL_CONFIG": str(cfg)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_jbl("mount", mnt, "--engine", request.param, store=store_dir, env=env).ok()
    try:
        yield mnt, env
    finally:
        run_jbl("umount", mnt)


def held(store_dir: Path, env: dict[str, str]) -> list[dict[str, object]]:
    r = run_jbl("store", "gc", "--dry-run", "--json", store=store_dir, env=env).ok()
    return json.loads(r.out)["removed_held"]  # type: ignore[no-any-return]


def test_a_shell_cd_into_a_removed_version_is_released_after_the_limit(
        mounted: tuple[Path, dict[str, str]], store_dir: Path) -> None:
    mnt, env = mounted
    shell = subprocess.Popen(["sh", "-c", f"cd {mnt}/pyrt/1.0.0 && echo in && exec sleep 60"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout is not None and shell.stdout.readline() == "in\n"
        r = run_jbl("store", "rm", "pyrt@1.0.0", store=store_dir, env=env).ok()
        assert "1.0.0" in r.out + r.err
        # held, and df/gc name who holds it: the shell's uid and pid, through the mount
        rows = held(store_dir, env)
        assert [(h["version"], h["uid"], h["pid"]) for h in rows] == \
            [("pyrt@1.0.0", os.getuid(), shell.pid)], rows
        df = run_jbl("store", "df", store=store_dir, env=env).ok().out
        assert f"pid {shell.pid}" in df and "pyrt@1.0.0" in df
        # the limit passes: the mount lets go, and gc frees the version
        assert wait_until(lambda: not held(store_dir, env), timeout=20)
        gc = run_jbl("store", "gc", "--json", store=store_dir, env=env).ok()
        assert "pyrt@1.0.0" in json.loads(gc.out)["purged"]
        # the holder now sees the version gone (not a pinned copy)
        with pytest.raises(OSError) as gone:
            os.listdir(f"/proc/{shell.pid}/cwd/isolated")
        assert gone.value.errno in (errno.ENOENT, errno.ESTALE), gone.value
    finally:
        shell.kill()
        shell.wait()
        if shell.stdout is not None:
            shell.stdout.close()


def test_a_malformed_limit_is_one_line_error(rt_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             store_dir: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("removed_hold_limit: soon\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # a store that exists (mount refuses a missing one before it reads the config)
    import_tarball(store_dir, make_tarball(rt_factory("pyrt", "1.0.0"), tmp_path / "a.tar.gz"))
    r = run_jbl("mount", mnt, store=store_dir, env={"JBL_CONFIG": str(cfg)})
    assert r.rc == 2 and "removed_hold_limit" in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1
