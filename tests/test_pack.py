"""Publishing: ``jbl pack`` makes the same bytes from the same directory, and what it makes
installs back to the same tree; ``jbl registry add`` writes a Joblet registry that
``jbl store install`` reads over real HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import hostile
from conftest import assert_one_line_error, run_jbl
from fixtures_ingest import source_tree, stored_tree
from fixtures_registry import RegistryServer


def test_pack_is_deterministic_and_round_trips(rt_factory, tmp_path: Path,
                                               store_dir: Path) -> None:
    src = rt_factory("packrt", "1.0.0")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True)
    (src / "isolated/usr/bin/sh").read_bytes()  # reading (atime) must not change the output
    a, b, c = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz", tmp_path / "c.tar.gz"
    r = run_jbl("pack", src, "-o", a).ok()
    assert r.out.startswith(f"packed packrt@1.0.0 into {a} (")
    run_jbl("pack", src, "-o", b).ok()
    run_jbl("pack", copy, "-o", c).ok()
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    # Any tar reads it; runtime.yml comes first so readers learn name@version at once.
    names = subprocess.run(["tar", "-tzf", str(a)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert names[0] == "runtime.yml" and "isolated/usr/bin/python3.11" in names

    run_jbl("store", "import", a, store=store_dir).ok()
    got = stored_tree(store_dir, "packrt", "1.0.0")
    want = source_tree(src)
    del want[""], got[""]  # the directory itself is not a member (documented)
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        for key, value in w.items():
            assert got[path][key] == value, f"{path}: {key}"


def test_pack_zstd_and_plain_by_suffix(rt_factory, tmp_path: Path, store_dir: Path) -> None:
    src = rt_factory("packrt", "1.0.0")
    zst, plain = tmp_path / "rt.tar.zst", tmp_path / "rt.tar"
    run_jbl("pack", src, "-o", zst).ok()
    run_jbl("pack", src, "-o", plain).ok()
    assert zst.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert plain.read_bytes()[257:263] == b"ustar\x00"
    run_jbl("store", "import", zst, store=store_dir).ok()
    r = run_jbl("store", "import", plain, "--version", "1.0.1", store=store_dir).ok()
    assert "100% deduplicated" in r.out


def test_pack_refuses_what_is_not_a_runtime(tmp_path: Path) -> None:
    d = tmp_path / "rt"
    (d / "isolated").mkdir(parents=True)
    out = tmp_path / "x.tar.gz"
    assert_one_line_error(run_jbl("pack", d, "-o", out), 2, "has no runtime.yml")
    (d / "runtime.yml").write_text("name: x\nversion: 1.0.0\nmounts:\n"
                                   "  - {source: ../../etc, target: /etc}\n")
    assert_one_line_error(run_jbl("pack", d, "-o", out), 2, "mount source leaves the runtime")
    (d / "runtime.yml").write_text("name: x\nversion: 1.0.0\n")
    assert_one_line_error(run_jbl("pack", d, "-o", d / "self.tar.gz"), 2, "inside the runtime")
    assert_one_line_error(run_jbl("pack", tmp_path / "nope", "-o", out), 2,
                          "not a runtime directory")
    assert not out.exists() and not list(tmp_path.glob(".x.tar.gz.*"))


def test_registry_add_publishes_and_install_reads_it_over_http(
        rt_factory, tmp_path: Path, store_dir: Path) -> None:
    reg = tmp_path / "registry"
    built = tmp_path / "built"
    built.mkdir()
    t1, t2 = built / "regrt-1.0.0.tar.gz", built / "regrt-1.1.0.tar.gz"
    run_jbl("pack", rt_factory("regrt", "1.0.0"), "-o", t1).ok()
    run_jbl("pack", rt_factory("regrt", "1.1.0"), "-o", t2).ok()
    r = run_jbl("registry", "add", t1, "--registry", reg).ok()
    assert r.out.startswith("added regrt@1.0.0 to ")
    run_jbl("registry", "add", t2, "--registry", reg, "--platform", "ubuntu-amd64",
            "--platform", "ubuntu-arm64").ok()
    doc = json.loads((reg / "registry.json").read_text())
    assert doc["version"] == "1" and doc["updated_at"].endswith("Z")
    e1, e2 = doc["runtimes"]["regrt"]["1.0.0"], doc["runtimes"]["regrt"]["1.1.0"]
    assert set(e1) == {"version", "description", "download_url", "checksum", "size",
                       "platforms", "tree"}  # tree: the content-addressed form (casformat)
    assert e1["download_url"] == "regrt-1.0.0.tar.gz"  # relative, and copied in
    copied = (reg / "regrt-1.0.0.tar.gz").read_bytes()
    assert copied == t1.read_bytes()
    assert e1["checksum"] == "sha256:" + hashlib.sha256(copied).hexdigest()
    assert e1["size"] == len(copied) and e1["platforms"] == ["ubuntu-amd64"]
    assert e2["platforms"] == ["ubuntu-amd64", "ubuntu-arm64"]

    server = RegistryServer(reg)
    try:
        run_jbl("store", "install", "regrt", "--registry", server.url, store=store_dir).ok()
    finally:
        server.stop()
    r = run_jbl("store", "list", "--json", store=store_dir).ok()
    assert [(v["name"], v["version"]) for v in json.loads(r.out)] == [("regrt", "1.1.0")]


def test_registry_add_refuses_a_hostile_tarball_and_keeps_the_registry(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    good = tmp_path / "good.tar"
    good.write_bytes(hostile.tar())
    run_jbl("registry", "add", good, "--registry", reg).ok()
    before = (reg / "registry.json").read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(hostile.CASES["dotdot"].data)
    assert_one_line_error(run_jbl("registry", "add", bad, "--registry", reg), 6, "'..'")
    assert (reg / "registry.json").read_bytes() == before
    assert not (reg / "bad.tar").exists()
    assert_one_line_error(run_jbl("registry", "add", good, "--registry", reg, "--platform",
                                  "Ubuntu AMD64"), 2, "invalid platform")
