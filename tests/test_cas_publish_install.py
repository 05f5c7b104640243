"""The content-addressed form end to end: ``jbl registry add`` publishes it, ``jbl store
install`` fetches only what the store lacks (from a directory and over a real local HTTP
server on 127.0.0.1), commits exactly what a tarball install commits, refuses hostile trees
and bad objects leaving the store as it was, and resumes a killed install without fetching
again what it verified. Real CLI, real stores, real files; nothing mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard
from cas_fixtures import (
    NAME,
    MiB,
    blob_files,
    entry,
    files,
    index_rows,
    publish,
    rewrite_tree,
    tarball,
    tree_doc,
)
from conftest import JBL, assert_one_line_error, assert_store_ok, run_jbl
from fixtures_registry import RegistryServer
from jbl.store import casformat as cf
from jbl.store.store import Store
from jbl.store.view import View
from pausepoints import Pauses
from procs import reap

V1, V2 = "1.0.0", "1.1.0"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with both versions, published one after the other (as a lab would)."""
    base = tmp_path_factory.mktemp("casreg")
    reg = base / "reg"
    publish(reg, [V1], base / "built")
    publish(reg, [V2], base / "built")
    return reg


def _files_under(reg: Path) -> dict[str, int]:
    return {str(p.relative_to(reg)): p.stat().st_ino
            for sub in ("objects", "packs", "trees") for p in (reg / sub).rglob("*")
            if p.is_file()}


def _copy(reg: Path, to: Path, link: bool = True) -> Path:
    """A registry of one's own (hard links to the published files, which tests replace
    rather than change, unless ``link`` is False)."""
    shutil.copytree(reg, to, copy_function=os.link if link else shutil.copy2)
    index = to / "registry.json"  # the one file the tests change in place: a copy of its own
    data = index.read_bytes()
    index.unlink()
    index.write_bytes(data)
    return to


def _fetched(server: RegistryServer, reg: Path) -> tuple[set[str], int]:
    paths = {p.lstrip("/") for p in server.requests if p != "/registry.json"}
    return paths, sum((reg / p).stat().st_size for p in paths)


# ------------------------------------------------------------------------------ publishing
def test_publish_writes_the_form_and_a_later_version_only_what_is_new(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    publish(reg, [V1], tmp_path / "built")
    first = _files_under(reg)
    tb2 = tarball(tmp_path / "built" / "v2.tar.gz", V2)
    r = run_jbl("registry", "add", tb2, "--registry", reg, "--json").ok()
    said = json.loads(r.out)[0]["published"]
    second = _files_under(reg)
    # Nothing published before was written again (same inodes), and only 1.1's new
    # objects, its delta pack(s) and its tree are new.
    assert {p: second[p] for p in first} == first
    d1, d2 = tree_doc(reg, V1), tree_doc(reg, V2)
    old = {o[0] for o in d1["objects"]}
    new_objects = {p.rsplit("/", 1)[1] for p in set(second) - set(first)
                   if p.startswith("objects/")}
    assert new_objects == {o[0] for o in d2["objects"]} - old and new_objects
    new_packs = {p for p in set(second) - set(first) if p.startswith("packs/")}
    full = {f"packs/{p[0]}.pack" for p in d2["full"]}
    assert "full" not in d1 and len(full) == 1  # 1.0's delta pack is its full set already
    delta = new_packs - full
    assert len(delta) == 1  # 1.1's objects new since 1.0, in one delta pack
    assert (said["objects"], said["packs"], said["trees"]) == (len(new_objects), 2, 1)
    for pack in delta:  # ...holding only objects 1.0 did not have
        members = next(p[2] for p in d2["packs"] if f"packs/{p[0]}.pack" == pack)
        assert {d2["objects"][i][0] for i, _ in members} <= {o[0] for o in d2["objects"]} - old
    # ...and 1.1's full set: every small object of 1.1 once, and nothing else.
    small = sorted(i for i, o in enumerate(d2["objects"]) if o[1] < MiB)
    assert sorted(i for p in d2["full"] for i, _ in p[2]) == small
    # Publishing 1.1 again writes nothing: the same tree, the same packs.
    again = json.loads(run_jbl("registry", "add", tb2, "--registry", reg,
                               "--json").ok().out)[0]
    assert again["published"] == {"objects": 0, "packs": 0, "trees": 0, "bytes": 0}
    assert again["tree"] == entry(reg, V2)["tree"] and _files_under(reg) == second
    # Every object is named by its decoded bytes' digest and ready to be a blob as it is.
    for o in d2["objects"]:
        stored = (reg / cf.object_path(bytes.fromhex(o[0]))).read_bytes()
        assert cf.check_object(cf.Obj(bytes.fromhex(o[0]), o[1], o[2], o[3]), stored)
    assert any(o[3] == 1 for o in d2["objects"]) and any(o[3] == 0 for o in d2["objects"])
    for p in (reg / "packs").iterdir():  # named by their bytes, within squid's 4 MB
        assert cf.sha256(p.read_bytes()).hex() + ".pack" == p.name
        assert p.stat().st_size <= cf.PACK_MAX
    # registry.json is written last: nothing it names is newer than it.
    newest = max((reg / p).stat().st_mtime_ns for p in second)
    assert (reg / "registry.json").stat().st_mtime_ns >= newest
    # The key is jbl's extra: the Joblet fields are all still there.
    assert {"download_url", "checksum", "size", "tree"} <= set(entry(reg, V2))


# ------------------------------------------------------------------------------ installing
def test_update_fetches_only_new_objects_and_a_cold_install_few_requests(
        published: Path, store_dir: Path) -> None:
    server = RegistryServer(published)
    try:
        r = run_jbl("store", "install", f"{NAME}@{V1}", "--registry", server.url, "--json",
                    store=store_dir).ok()
        cold, cold_bytes = _fetched(server, published)
        out = json.loads(r.out)[0]
        assert out["form"] == "tree" and out["fetched_bytes"] == cold_bytes
        nfiles = len(files(V1)) + 2
        assert len(cold) <= 8 and len(cold) * 4 < nfiles, cold  # packs, not one per file
        assert any(p.startswith("packs/") for p in cold)
        server.requests.clear()
        r = run_jbl("store", "install", f"{NAME}@{V2}", "--registry", server.url,
                    store=store_dir).ok()
        update, update_bytes = _fetched(server, published)
    finally:
        server.stop()
    assert not update & cold  # nothing 1.0 brought is fetched again
    assert update_bytes < 0.5 * entry(published, V2)["size"], (update, update_bytes)
    d2 = tree_doc(published, V2)
    delta = {f"packs/{p[0]}.pack" for p in d2["packs"]} - cold
    assert {p for p in update if p.startswith("packs/")} == delta  # not the full set
    assert " fetched, " in r.out and "already here" in r.out
    listed = json.loads(run_jbl("store", "list", "--json", store=store_dir).ok().out)
    assert [v["version"] for v in listed] == [V1, V2]


def test_a_cold_install_of_a_later_version_fetches_its_full_set_not_old_packs(
        published: Path, store_dir: Path) -> None:
    d1, d2 = tree_doc(published, V1), tree_doc(published, V2)
    full = {f"packs/{p[0]}.pack" for p in d2["full"]}
    dry = json.loads(run_jbl("store", "install", f"{NAME}@{V2}", "--registry", published,
                             "--dry-run", "--json", store=store_dir).ok().out)
    server = RegistryServer(published)
    try:
        r = run_jbl("store", "install", f"{NAME}@{V2}", "--registry", server.url, "--json",
                    store=store_dir).ok()
        got, got_bytes = _fetched(server, published)
    finally:
        server.stop()
    packs = {p for p in got if p.startswith("packs/")}
    assert packs == full, got  # 1.1's own small objects in one pack: no 1.0 pack, no delta
    assert not packs & {f"packs/{p[0]}.pack" for p in d1["packs"]}
    large = {o[0] for o in d2["objects"] if o[1] == MiB}
    assert {p.rsplit("/", 1)[1] for p in got if p.startswith("objects/")} <= large
    needed = sum(o[2] for o in d2["objects"]) + entry(published, V2)["tree"]["size"]
    assert got_bytes == needed == json.loads(r.out)[0]["fetched_bytes"]  # nothing superseded
    said = dry if isinstance(dry, dict) else dry[0]
    assert said["requests"] == len(got) - 1 and said["packs"] == 1, said


def test_tree_install_equals_the_tarball_install(published: Path, tmp_path: Path) -> None:
    reg = _copy(published, tmp_path / "reg")  # its own: its registry.json changes below
    by_tree, by_tarball = tmp_path / "a", tmp_path / "b"
    r = run_jbl("store", "install", f"{NAME}@{V1}", "--registry", reg, "--json", store=by_tree)
    assert json.loads(r.ok().out)[0]["form"] == "tree"
    index = json.loads((reg / "registry.json").read_text())
    for e in index["runtimes"][NAME].values():
        del e["tree"]  # the same entries without the form: a tarball install
    (reg / "registry.json").write_text(json.dumps(index))
    r = run_jbl("store", "install", f"{NAME}@{V1}", "--registry", reg, "--json",
                store=by_tarball)
    assert "form" not in json.loads(r.ok().out)[0]
    a, b = index_rows(by_tree), index_rows(by_tarball)
    assert a["entries"] == b["entries"] and len(a["entries"]) > 40
    shapes = {e[0].split(":", 1)[1]: e for e in a["entries"]}
    assert shapes["/isolated/lib/odd.link"][8] == b"caf\xe9"  # not UTF-8, carried exactly
    assert shapes["/isolated/bin/suid"][2] == 0o755  # setuid cleared, as ingest does
    assert shapes["/isolated/implied/dir"][1] == 0o040000  # an implied directory
    assert shapes["/isolated/etc/empty"][6] == 0 and "/isolated/empty.d" in shapes
    assert a == b
    infos = [json.loads(run_jbl("store", "info", f"{NAME}@{V1}", "--json", store=s).ok().out)
             for s in (by_tree, by_tarball)]
    for i in infos:
        i.pop("installed_at")
    assert infos[0] == infos[1]
    for s in (by_tree, by_tarball):
        assert_store_ok(s)
    # The bytes, through the store's own view, are the tarball's.
    want = files(V1)
    with Store.open(by_tree, readonly=True) as store:
        view = View(store)
        root = view.installed()[NAME][V1].root_id
        for path, data in want.items():
            e = view.resolve(root, path)
            assert e is not None and e.content_id is not None
            assert view.read(view.chunks(e.content_id), e.size, 0, e.size + 1) == data, path
        link = view.resolve(root, "isolated/bin/hello2")
        assert link is not None and link.nlink == 2


def test_dry_run_says_what_would_be_fetched_and_changes_nothing(
        published: Path, store_dir: Path) -> None:
    r = run_jbl("store", "install", "--dry-run", f"{NAME}@{V1}", "--registry", published,
                store=store_dir).ok()
    assert "would fetch" in r.out and "packs" in r.out and not store_dir.exists()
    run_jbl("store", "install", f"{NAME}@{V1}", "--registry", published, store=store_dir).ok()
    before = (index_rows(store_dir), blob_files(store_dir))
    r = run_jbl("store", "install", "--dry-run", f"{NAME}@{V2}", "--registry", published,
                "--json", store=store_dir).ok()
    plan = json.loads(r.out)[0]
    assert plan["status"] == "would fetch" and 0 < plan["fetch_bytes"] < entry(published,
                                                                              V2)["size"]
    assert plan["present_bytes"] >= len(files(V1)["isolated/lib/big.bin"])
    assert (index_rows(store_dir), blob_files(store_dir)) == before


# ------------------------------------------------------------------------------ hostile trees
def _entry_index(doc: dict, name: str) -> int:  # type: ignore[type-arg]
    return next(i for i, e in enumerate(doc["entries"]) if e[1] == name)


def _set(field: int, value: object, name: str = "hello") -> object:
    def change(doc: dict) -> None:  # type: ignore[type-arg]
        doc["entries"][_entry_index(doc, name)][field] = value
    return change


def _setuid(doc: dict) -> None:  # type: ignore[type-arg]
    doc["entries"][_entry_index(doc, "hello")][3] |= 0o4000


def _deep(doc: dict) -> None:  # type: ignore[type-arg]
    parent = 0
    for _ in range(130):
        doc["entries"].append([parent, "d", "d", 0o755, 0, 0, 0, 0, None])
        parent = len(doc["entries"]) - 1


def _hardlink_to_dir(doc: dict) -> None:  # type: ignore[type-arg]
    e = doc["entries"][_entry_index(doc, "version")]
    e[8][1] = _entry_index(doc, "etc")


def _lying_body(doc: dict) -> None:  # type: ignore[type-arg]
    # big-1.1.0.bin (new to the store) claims big.bin's first chunk: sizes add up, the
    # body's digest does not (a tree must not poison file-level dedup).
    new = next(b for b in doc["bodies"] if len(b[2]) == 2)
    shared = next(b for b in doc["bodies"] if len(b[2]) == 3)
    new[2][0] = shared[2][0]


HOSTILE = [
    ("dotdot", _set(1, ".."), 6, "one path component"),
    ("slash", _set(1, "a/b"), 6, "one path component"),
    ("device", _set(2, "c"), 6, "no devices"),
    ("setuid", _setuid, 6, "setuid"),
    ("deep", _deep, 6, "deeper than 128"),
    ("hardlink-to-dir", _hardlink_to_dir, 6, "hardlink"),
    ("whiteout", _set(1, ".wh.hello"), 6, "whiteout"),
    ("body-digest", _lying_body, 5, "chunks hash to"),
]


def test_hostile_trees_are_refused_and_the_store_is_unchanged(
        published: Path, tmp_path: Path, store_dir: Path) -> None:
    run_jbl("store", "install", f"{NAME}@{V1}", "--registry", published, store=store_dir).ok()
    before = (index_rows(store_dir), blob_files(store_dir))
    for label, change, rc, why in HOSTILE:
        reg = _copy(published, tmp_path / label)
        rewrite_tree(reg, V2, change)  # type: ignore[arg-type]
        r = run_jbl("store", "install", f"{NAME}@{V2}", "--registry", reg, store=store_dir)
        assert_one_line_error(r, rc, why)
        assert (index_rows(store_dir), blob_files(store_dir)) == before, label
    # registry.json's key itself is checked as any of its fields (exit 7), before any fetch.
    reg = _copy(published, tmp_path / "badkey")
    index = json.loads((reg / "registry.json").read_text())
    index["runtimes"][NAME][V2]["tree"]["url"] = "../trees/" + "0" * 64
    (reg / "registry.json").write_text(json.dumps(index))
    assert_one_line_error(run_jbl("store", "install", f"{NAME}@{V2}", "--registry", reg,
                                  store=store_dir), 7, "tree must be")
    assert (index_rows(store_dir), blob_files(store_dir)) == before
    # The legitimate tree next to them still installs.
    run_jbl("store", "install", f"{NAME}@{V2}", "--registry", published, store=store_dir).ok()


def test_a_tree_or_object_whose_bytes_do_not_match_is_exit_5(
        published: Path, tmp_path: Path, store_dir: Path) -> None:
    reg = _copy(published, tmp_path / "reg", link=False)  # its files are changed in place
    tree = reg / entry(reg, V1)["tree"]["url"]
    good_tree = tree.read_bytes()
    tree.write_bytes(good_tree[:-1] + bytes([good_tree[-1] ^ 1]))
    assert_one_line_error(run_jbl("store", "install", f"{NAME}@{V1}", "--registry", reg,
                                  store=store_dir), 5, tree.name)
    tree.write_bytes(good_tree)
    doc = tree_doc(reg, V1)
    big = next(o for o in doc["objects"] if o[1] == MiB)  # a full chunk: fetched alone
    obj = reg / cf.object_path(bytes.fromhex(big[0]))
    good = obj.read_bytes()
    obj.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    assert_one_line_error(run_jbl("store", "install", f"{NAME}@{V1}", "--registry", reg,
                                  store=store_dir), 5, big[0])
    assert run_jbl("store", "list", "--json", store=store_dir).ok().out.strip() == "[]"
    assert not blob_files(store_dir)  # what it wrote before it met the bad object: removed
    obj.write_bytes(good)
    run_jbl("store", "install", f"{NAME}@{V1}", "--registry", reg, store=store_dir).ok()


# ------------------------------------------------------------------------------ interrupted
def test_a_killed_install_leaves_the_store_and_the_retry_fetches_only_the_rest(
        published: Path, tmp_path: Path, store_dir: Path) -> None:
    pauses = Pauses(tmp_path / "pauses")
    server = RegistryServer(published)
    try:
        env = {**os.environ, **pauses.env("casinstall.half-fetched")}
        env.pop("JBL_STORE", None)
        p = subprocess.Popen([JBL, "--store", str(store_dir), "store", "install",
                              f"{NAME}@{V1}", "--registry", server.url], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pauses.wait("casinstall.half-fetched", [p], timeout=60)
        finally:
            reap(p)  # SIGKILL
        first, _ = _fetched(server, published)
        listed = run_jbl("store", "list", "--json", store=store_dir).ok().out
        assert json.loads(listed) == []
        assert_store_ok(store_dir)
        orphans = blob_files(store_dir)
        assert orphans  # verified objects of the killed try, without rows
        server.requests.clear()
        r = run_jbl("store", "install", f"{NAME}@{V1}", "--registry", server.url, "--json",
                    store=store_dir).ok()
        retry, _ = _fetched(server, published)
    finally:
        server.stop()
    # The killed try asked for everything (get_many keeps requests under way) and wrote half;
    # the retry fetches no object it verified, as a single object or in a pack.
    doc = tree_doc(published, V1)
    tree = {f"trees/{entry(published, V1)['tree']['sha256']}"}
    have = {"".join(f.split("/")[1:]) for f in orphans}  # blobs/ab/cd... -> abcd...
    assert not {p for p in retry if p.startswith("objects/") and p.split("/")[-1] in have}
    for pack in doc["packs"]:
        if f"packs/{pack[0]}.pack" in retry:
            assert {doc["objects"][i][0] for i, _ in pack[2]} - have
    assert len(retry - tree) < len(first - tree) and first - tree
    assert json.loads(r.out)[0]["present_bytes"] > 0
    assert orphans <= blob_files(store_dir)


def test_two_tree_installs_at_once_commit_one_version(
        published: Path, tmp_path: Path, store_dir: Path) -> None:
    """One install held just before its commit while another commits the same version: the
    held one then finds it installed (the same tarball: a no-op), nothing twice."""
    pauses = Pauses(tmp_path / "pauses")
    env = {**os.environ, **pauses.env("ingest.before-commit")}
    env.pop("JBL_STORE", None)
    held = subprocess.Popen([JBL, "--store", str(store_dir), "store", "install",
                             f"{NAME}@{V1}", "--registry", published, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        flags = pauses.wait("ingest.before-commit", [held], timeout=60)
        r = run_jbl("store", "install", f"{NAME}@{V1}", "--registry", published, "--json",
                    store=store_dir).ok()
        assert json.loads(r.out)[0]["status"] == "installed"
        pauses.release(flags)
        out, err = held.communicate(timeout=60)
    finally:
        reap(held)
    assert held.returncode == 0, err
    assert json.loads(out)[0]["status"] == "already installed"
    rows = index_rows(store_dir)
    assert len(rows["versions"]) == 1
    assert len({b[0] for b in rows["blobs"]}) == len(rows["blobs"])


def test_gc_sweeps_what_a_killed_install_verified_when_no_retry_comes(
        published: Path, tmp_path: Path, store_dir: Path) -> None:
    pauses = Pauses(tmp_path / "pauses")
    env = {**os.environ, **pauses.env("casinstall.half-fetched")}
    env.pop("JBL_STORE", None)
    p = subprocess.Popen([JBL, "--store", str(store_dir), "store", "install", f"{NAME}@{V1}",
                          "--registry", published], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        pauses.wait("casinstall.half-fetched", [p], timeout=60)
    finally:
        reap(p)  # SIGKILL
    assert blob_files(store_dir)
    run_jbl("store", "gc", "--grace", "1h", store=store_dir).ok()
    assert blob_files(store_dir)  # within the grace: a retry may still come
    run_jbl("store", "gc", "--grace", "0s", store=store_dir).ok()
    assert not blob_files(store_dir)


def test_a_registry_without_the_form_installs_the_tarball(tmp_path: Path,
                                                          store_dir: Path) -> None:
    from fixtures_registry import publish as publish_plain

    publish_plain(tmp_path / "reg", "plain", "1.0.0")  # Joblet's entry: no tree key
    r = run_jbl("store", "install", "plain", "--registry", tmp_path / "reg", "--json",
                store=store_dir).ok()
    assert json.loads(r.out)[0]["status"] == "installed" and "form" not in r.out


def test_a_tree_the_origin_lacks_falls_back_to_the_tarball_with_one_warning(
        published: Path, tmp_path: Path, store_dir: Path) -> None:
    reg = _copy(published, tmp_path / "reg")
    (reg / entry(reg, V1)["tree"]["url"]).unlink()  # named by registry.json, never uploaded
    server = RegistryServer(reg)
    try:
        r = run_jbl("store", "install", f"{NAME}@{V1}", "--registry", server.url, "--json",
                    store=store_dir).ok()
        asked = dict(server.requests)
        # the form of a version the origin does serve is still used
        r2 = run_jbl("store", "install", f"{NAME}@{V2}", "--registry", server.url, "--json",
                     store=store_dir).ok()
    finally:
        server.stop()
    out = json.loads(r.out)[0]
    assert out["status"] == "installed" and "form" not in out
    assert "/" + entry(reg, V1)["download_url"] in asked  # the tarball, fetched once
    warned = [line for line in r.err.splitlines() if "not served" in line]
    assert len(warned) == 1 and "installing its tarball instead" in warned[0], r.err
    assert "Traceback" not in r.err
    assert json.loads(r2.out)[0]["form"] == "tree"
    assert_store_ok(store_dir)


# ------------------------------------------------------------------------------ units
def test_parse_tree_bounds_counts_and_plan_prefers_packs_when_most_is_lacking(
        published: Path) -> None:
    from jbl.store.errors import LimitExceeded, UnsafeArchive
    from jbl.store.limits import Limits

    data = (published / entry(published, V1)["tree"]["url"]).read_bytes()
    tree = cf.parse_tree(data, Limits())
    with pytest.raises(LimitExceeded):
        cf.parse_tree(data, Limits(max_entries=len(tree.entries) - 1))
    with pytest.raises(LimitExceeded, match="larger than"):
        cf.parse_tree(data, Limits(max_total_size=tree.bodies[0].size))
    doc = cf.decode_tree(data)
    doc["entries"][1][1] = "\ud800"  # a lone surrogate that surrogateescape did not make
    with pytest.raises(UnsafeArchive, match="encodes no bytes"):
        cf.parse_tree(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()), Limits())
    everything = cf.plan_fetch(tree, set(range(len(tree.objects))))
    assert everything.packs and everything.requests < len(tree.objects)
    packed = {i for p in tree.packs for i, _ in p.members}
    one = {min(packed)}
    single = cf.plan_fetch(tree, one)  # one small object lacking: not its whole pack
    assert single.singles == [min(packed)] and not single.packs


def test_the_progress_bar_says_what_is_already_here(published: Path, tmp_path: Path,
                                                    store_dir: Path) -> None:
    """On a terminal, an update's bar names the bytes the store holds already, while the
    install is under way (held at a pause point mid-fetch, so the bar has been drawn)."""
    import pty
    import select
    import time

    run_jbl("store", "install", f"{NAME}@{V1}", "--registry", str(published),
            store=store_dir).ok()
    pauses = Pauses(tmp_path / "pauses")
    env = {**os.environ, **pauses.env("casinstall.half-fetched"), "TERM": "xterm",
           "COLUMNS": "200"}
    env.pop("JBL_STORE", None)
    main, sub = pty.openpty()
    p = subprocess.Popen([JBL, "--store", str(store_dir), "store", "install", f"{NAME}@{V2}",
                          "--registry", str(published)], env=env, stdin=subprocess.DEVNULL,
                         stdout=sub, stderr=sub)
    os.close(sub)
    seen = b""
    try:
        flags = pauses.wait("casinstall.half-fetched", [p], timeout=60)
        deadline = time.monotonic() + 15
        while b"already here" not in seen and time.monotonic() < deadline:
            if select.select([main], [], [], 0.2)[0]:
                seen += os.read(main, 65536)
        drawn_while_held = b"already here" in seen
        for f in flags:
            f.unlink()
        while True:  # drain until the install ends (EIO once the pty's last user closed it)
            try:
                if select.select([main], [], [], 0.2)[0]:
                    chunk = os.read(main, 65536)
                    if not chunk:
                        break
                    seen += chunk
                elif p.poll() is not None:
                    break
            except OSError:
                break
        assert p.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(main)
    assert drawn_while_held, seen.decode(errors="replace")
    assert b"installed" in seen and b"already here" in seen
