"""The admin's story after installing: ``jbl store list / info / rm / df`` in text and JSON.

Tiny synthetic runtimes from a registry dir (tests/fixtures_registry.py): every version of a
runtime shares one 256 KiB file and has a 128 KiB file of its own (random bytes, stored raw),
so sizes, sharing and "bytes unique to it" are known exactly. One test installs a real
runtime built from this host through ``jbl pack`` + ``jbl registry add`` over HTTP.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time
from pathlib import Path

import pytest
from conftest import JBL, Result, assert_one_line_error, run_jbl
from fixtures_registry import SHARED_SIZE, UNIQUE_SIZE, RegistryServer, publish
from fixtures_registry import registry_server as registry_server  # a fixture

SMALL = 4096  # runtime.yml, bin/hello and etc/version together stay below this


@pytest.fixture(scope="module")
def regdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reg")
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        publish(root, "demo", v)
    publish(root, "other", "2.0.0")
    return root


def jbl(store: Path, *args: str) -> Result:
    return run_jbl(*args, store=store, env={"JBL_CONFIG": ""})


@pytest.fixture
def filled(store_dir: Path, regdir: Path) -> Path:
    """A store with demo@1.0.0, demo@1.1.0 and other@2.0.0."""
    jbl(store_dir, "store", "install", "demo@1.0.0", "demo@1.1.0", "other",
        "--registry", str(regdir)).ok()
    return store_dir


def test_list_shows_each_version_text_and_json(filled: Path) -> None:
    r = jbl(filled, "store", "list").ok()
    lines = r.out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "FILES", "LOGICAL", "STORED", "INSTALLED",
                                "LAST", "USED", "PINNED"]
    assert [ln.split()[:3] for ln in lines[1:]] == [
        ["demo", "1.0.0", "5"], ["demo", "1.1.0", "5"], ["other", "2.0.0", "5"]]
    assert lines[1].split()[3].startswith("384.")  # logical: 256K + 128K + a few bytes
    assert "never" in lines[1]  # never used by a job yet
    rows = json.loads(jbl(filled, "store", "list", "--json").out)
    assert [(x["name"], x["version"]) for x in rows] == [
        ("demo", "1.0.0"), ("demo", "1.1.0"), ("other", "2.0.0")]
    for x in rows:
        assert SHARED_SIZE + UNIQUE_SIZE <= x["logical_bytes"] < SHARED_SIZE + UNIQUE_SIZE + SMALL
        # stored: the two random files raw, the small ones (maybe compressed)
        assert SHARED_SIZE + UNIQUE_SIZE <= x["stored_bytes"] < SHARED_SIZE + UNIQUE_SIZE + SMALL
        assert x["installed_at"] <= time.time() and x["last_used_at"] is None
        assert x["pinned"] is False


def test_info_tells_sizes_origin_and_manifest(filled: Path, regdir: Path) -> None:
    r = jbl(filled, "store", "info", "demo@1.0.0").ok()
    fields = dict(ln.split(":", 1) for ln in r.out.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["name"] == "demo" and fields["version"] == "1.0.0"
    assert fields["description"] == "tiny demo 1.0.0"
    assert fields["files"] == "5 files, 4 directories, 0 symlinks"
    assert fields["logical size"].startswith("384.")
    assert fields["unique to it"].startswith("128.")  # its own 128K file (+ a few bytes)
    assert fields["source"] == (regdir / "demo-1.0.0.tar.gz").as_uri()
    assert fields["checksum"].startswith("sha256:") and len(fields["checksum"]) == 71
    assert fields["mount"] == "isolated -> / (ro)" and fields["env"] == "PATH=/bin"
    assert fields["pinned"] == "no" and fields["last used"] == "never"
    d = json.loads(jbl(filled, "store", "info", "demo", "--json").out)  # NAME = latest
    assert d["version"] == "1.1.0"
    assert UNIQUE_SIZE <= d["unique_bytes"] < UNIQUE_SIZE + SMALL
    assert d["stored_bytes"] >= SHARED_SIZE + UNIQUE_SIZE
    assert d["manifest"].startswith("name: demo\nversion: 1.1.0\n")
    # other shares nothing with demo: all of it is unique
    d = json.loads(jbl(filled, "store", "info", "other@2.0.0", "--json").out)
    assert d["unique_bytes"] == d["stored_bytes"]


def test_info_of_what_is_not_there(filled: Path) -> None:
    assert_one_line_error(jbl(filled, "store", "info", "demo@3.0.0"), 3, "not found installed")
    assert_one_line_error(jbl(filled, "store", "info", "nope"), 3,
                          "install it with: jbl store install nope")
    assert_one_line_error(jbl(filled, "store", "info", "bad/name"), 2, "invalid runtime name")


def test_df_reports_logical_physical_and_what_each_runtime_alone_holds(filled: Path) -> None:
    r = jbl(filled, "store", "df").ok()
    first = [ln.split()[0] for ln in r.out.splitlines()[:3]]
    assert first == ["logical", "physical", "ratio"]
    assert "3 versions of 2 runtimes" in r.out
    assert "RUNTIME" in r.out and "ALONE HOLDS" in r.out
    d = json.loads(jbl(filled, "store", "df", "--json").out)
    assert d["versions"] == 3 and d["runtimes"] == 2
    assert d["logical_bytes"] >= 3 * (SHARED_SIZE + UNIQUE_SIZE)
    assert d["physical_bytes"] == d["blob_allocated_bytes"] + d["index_bytes"]
    assert d["ratio"] == pytest.approx(d["physical_bytes"] / d["logical_bytes"])
    # blobs: demo's shared file once + 2 unique, other's shared + unique, small files
    stored = 2 * SHARED_SIZE + 3 * UNIQUE_SIZE
    assert stored <= d["referenced_bytes"] < stored + 3 * SMALL
    alone = {r["name"]: r["unique_bytes"] for r in d["per_runtime"]}
    assert SHARED_SIZE + 2 * UNIQUE_SIZE <= alone["demo"] < SHARED_SIZE + 2 * UNIQUE_SIZE + SMALL
    assert SHARED_SIZE + UNIQUE_SIZE <= alone["other"] < SHARED_SIZE + UNIQUE_SIZE + SMALL
    assert d["unreferenced_bytes"] == 0


def test_rm_a_version_frees_what_it_alone_held(filled: Path) -> None:
    before = json.loads(jbl(filled, "store", "df", "--json").out)["referenced_bytes"]
    unique = json.loads(jbl(filled, "store", "info", "demo@1.0.0", "--json").out)["unique_bytes"]
    r = jbl(filled, "store", "rm", "demo@1.0.0").ok()
    assert r.out.strip() == "removed demo@1.0.0"
    after = json.loads(jbl(filled, "store", "df", "--json").out)
    assert after["referenced_bytes"] == before - unique
    assert after["unreferenced_bytes"] == 0  # rm swept what it freed
    rows = json.loads(jbl(filled, "store", "list", "--json").out)
    assert [f"{x['name']}@{x['version']}" for x in rows] == ["demo@1.1.0", "other@2.0.0"]
    # the shared file is still readable through the remaining version's info
    d = json.loads(jbl(filled, "store", "info", "demo@1.1.0", "--json").out)
    assert d["unique_bytes"] >= SHARED_SIZE + UNIQUE_SIZE  # now it alone holds the shared file


def test_rm_refuses_what_is_not_installed_or_not_exact(filled: Path) -> None:
    assert_one_line_error(jbl(filled, "store", "rm", "demo@1.2.0"), 3, "rm needs an exact")
    assert_one_line_error(jbl(filled, "store", "rm", "demo@1.0"), 3,
                          "installed versions: 1.0.0, 1.1.0")
    assert_one_line_error(jbl(filled, "store", "rm", "nope"), 3, "nope is not installed")
    # nothing was removed by the failed commands (all arguments are checked first)
    assert_one_line_error(jbl(filled, "store", "rm", "other", "nope"), 3)
    assert len(json.loads(jbl(filled, "store", "list", "--json").out)) == 3


def test_rm_a_whole_runtime_with_yes_and_json(filled: Path) -> None:
    r = jbl(filled, "store", "rm", "demo", "--yes", "--json").ok()
    d = json.loads(r.out)
    assert sorted(d["removed"]) == ["demo@1.0.0", "demo@1.1.0"] and d["deferred"] == []
    assert d["freed_bytes"] >= SHARED_SIZE + 2 * UNIQUE_SIZE
    rows = json.loads(jbl(filled, "store", "list", "--json").out)
    assert [x["name"] for x in rows] == ["other"]


def _on_a_terminal(store: Path, *args: str, answer: bytes) -> tuple[int, str]:
    """Run jbl with stdin/stdout/stderr on a pseudo-terminal, typing ``answer``."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "JBL_STORE"}
    env["JBL_CONFIG"] = ""
    p = subprocess.Popen([JBL, "--store", str(store), *args], stdin=slave, stdout=slave,
                         stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    try:
        while b"[y/N]" not in out:
            out += os.read(master, 4096)
        os.write(master, answer)
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
    return p.wait(timeout=60), out.decode()


def test_rm_of_a_whole_runtime_asks_on_a_terminal(filled: Path) -> None:
    rc, out = _on_a_terminal(filled, "store", "rm", "demo", answer=b"n\n")
    assert rc == 1 and "remove 2 version(s): demo@1.0.0, demo@1.1.0? [y/N]" in out
    assert "aborted: nothing removed" in out
    assert len(json.loads(jbl(filled, "store", "list", "--json").out)) == 3
    rc, out = _on_a_terminal(filled, "store", "rm", "demo", answer=b"y\n")
    assert rc == 0 and "removed demo@1.0.0" in out
    assert len(json.loads(jbl(filled, "store", "list", "--json").out)) == 1


def test_reinstall_is_a_no_op_that_says_so(filled: Path, regdir: Path) -> None:
    r = jbl(filled, "store", "install", "demo@1.0.0", "--registry", str(regdir), "--json").ok()
    [d] = json.loads(r.out)
    assert d["status"] == "already installed" and d["new_stored_bytes"] == 0


def test_an_empty_or_missing_store(tmp_path: Path) -> None:
    store = tmp_path / "none"
    assert "no runtimes installed" in jbl(store, "store", "list").ok().out
    assert json.loads(jbl(store, "store", "list", "--json").out) == []
    assert "no runtimes installed" in jbl(store, "store", "df").ok().out
    assert_one_line_error(jbl(store, "store", "info", "demo"), 3)
    assert_one_line_error(jbl(store, "store", "rm", "demo", "--yes"), 3)
    assert not store.exists()  # looking never creates a store


def test_global_options_work_after_the_subcommand_too(filled: Path) -> None:
    a = run_jbl("--json", "store", "list", store=filled, env={"JBL_CONFIG": ""}).ok().out
    b = run_jbl("store", "list", "--json", "--store", str(filled), env={"JBL_CONFIG": ""}).ok()
    assert json.loads(a) == json.loads(b.out)


@pytest.mark.slow
def test_a_real_runtime_through_pack_registry_add_and_http(rt_factory, tmp_path: Path,
                                                           store_dir: Path,
                                                           registry_server: RegistryServer
                                                           ) -> None:
    pytest.importorskip("jbl.cli.pack_cmd", reason="jbl pack not written yet")
    rt = rt_factory("pyrt", "1.0.0")
    tarball = registry_server.root / "pyrt-1.0.0.tar.gz"
    jbl(store_dir, "pack", str(rt), "-o", str(tarball)).ok()
    jbl(store_dir, "registry", "add", str(tarball), "--registry", str(registry_server.root)).ok()
    r = jbl(store_dir, "store", "install", "pyrt", "--registry", registry_server.url).ok()
    assert r.out.startswith("installed pyrt@1.0.0")
    d = json.loads(jbl(store_dir, "store", "info", "pyrt@1.0.0", "--json").out)
    assert d["files"] > 500 and d["symlinks"] > 0
    assert d["source"] == registry_server.url + "pyrt-1.0.0.tar.gz"
    assert d["stored_bytes"] < d["logical_bytes"]  # zstd pays on a real runtime
