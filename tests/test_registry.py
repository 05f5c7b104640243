"""Installing from registries: the user's story over a real local HTTP server, file:// URLs,
registry dirs and a YAML config; version selection, architectures, checksums, the cache.

Runtimes here are tiny synthetic ones (tests/fixtures_registry.py) so the file stays fast;
the real-runtime path is covered by the demo and tests/test_store_cli.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import JBL, Result, assert_one_line_error, run_jbl
from fixtures_registry import RegistryServer, publish, sha256_file
from jbl.store.config import load_config
from jbl.store.errors import RegistryError, UsageError
from jbl.store.regformat import normalize_arch, parse_registry
from jbl.store.registry import location_url
from pausepoints import Pauses
from procs import reap

VERSIONS = ["1.2.0", "1.3.0", "1.3.2", "1.9.0", "1.10.0", "2.0.0-beta"]


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    """No host config, a private user cache: each test sees only its own registries."""
    return {"XDG_CACHE_HOME": str(tmp / "xdg-cache"), "JBL_CONFIG": "", **extra}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory):
    """A registry served over http: demo in six versions, one arm64-only runtime, and a
    runtime whose newest version exists only for arm64."""
    root = tmp_path_factory.mktemp("shop") / "registry"
    for v in VERSIONS:
        publish(root, "demo", v)
    publish(root, "armonly", "1.0.0", platforms=["ubuntu-arm64"])
    publish(root, "mixed", "1.0.0", platforms=["ubuntu-amd64"])
    publish(root, "mixed", "1.1.0", platforms=["linux/aarch64"])
    server = RegistryServer(root)
    yield server
    server.stop()


def install(tmp: Path, store: Path, *specs: str, registry: str, **kw: str) -> Result:
    return run_jbl("store", "install", *specs, "--registry", registry, store=store,
                   env=env_for(tmp, **kw))


def installed(store: Path, tmp: Path) -> list[str]:
    r = run_jbl("store", "list", "--json", store=store, env=env_for(tmp)).ok()
    return [f"{x['name']}@{x['version']}" for x in json.loads(r.out)]


# --- pure parts ----------------------------------------------------------------------------
def test_platform_strings_name_architectures() -> None:
    assert normalize_arch("ubuntu-amd64") == normalize_arch("x86_64") == "amd64"
    assert normalize_arch("linux/aarch64") == normalize_arch("debian-arm64") == "arm64"
    assert normalize_arch("rhel9-x86-64") == "amd64"
    assert normalize_arch("linux") is None
    assert normalize_arch("armadillo") is None


def test_a_registry_location_may_be_a_file_a_dir_or_a_url(tmp_path: Path) -> None:
    (tmp_path / "reg").mkdir()
    assert location_url(str(tmp_path / "reg")) == (tmp_path / "reg/registry.json").as_uri()
    assert location_url("http://h/x") == "http://h/x/registry.json"
    assert location_url("https://h/x/index.json") == "https://h/x/index.json"
    assert location_url((tmp_path / "reg").as_uri()) == (tmp_path / "reg/registry.json").as_uri()
    with pytest.raises(UsageError):
        location_url("ftp://h/registry.json")


@pytest.mark.parametrize("doc, complaint", [
    (b"{", "not valid JSON"),
    (b"[]", "top level must be an object"),
    (b'{"version": "1"}', "no 'runtimes' object"),
    (b'{"version": "9", "runtimes": {}}', "unsupported format version"),
    (b'{"runtimes": {"a": {"1.0.0": {"download_url": "a.tgz"}}}}',
     "runtimes.a.1.0.0: checksum must be 'sha256:' and 64 hex digits (missing)"),
    (b'{"runtimes": {"a": {"1.0.0": {"download_url": "a.tgz", "checksum": "md5:00"}}}}',
     "got 'md5:00'"),
    (b'{"runtimes": {"a": {"1.0.0": {"checksum": "sha256:' + b"0" * 64 + b'"}}}}',
     "download_url is missing"),
    (b'{"runtimes": {"a": {"1.0.0": {"download_url": "a", "checksum": "sha256:' + b"0" * 64
     + b'", "size": -1}}}}', "size must be a non-negative integer"),
    (b'{"runtimes": {"../x": {}}}', "invalid runtime name"),
])
def test_a_malformed_registry_is_refused_naming_what_is_wrong(doc: bytes, complaint: str) -> None:
    with pytest.raises(RegistryError) as e:
        parse_registry(doc, "http://h/registry.json")
    assert complaint in str(e.value)
    assert "http://h/registry.json" in str(e.value)


def test_a_remote_registry_may_not_point_at_local_files() -> None:
    doc = {"runtimes": {"a": {"1.0.0": {"download_url": "file:///etc/shadow",
                                        "checksum": "sha256:" + "0" * 64}}}}
    with pytest.raises(RegistryError, match="unsupported scheme"):
        parse_registry(json.dumps(doc).encode(), "http://h/registry.json")
    # a local registry may name only files in its own directory (test_bounded_input.py)
    with pytest.raises(RegistryError, match="leaves the registry's directory /srv"):
        parse_registry(json.dumps(doc).encode(), "file:///srv/registry.json")
    doc["runtimes"]["a"]["1.0.0"]["download_url"] = "file:///srv/a.tar.gz"
    reg = parse_registry(json.dumps(doc).encode(), "file:///srv/registry.json")
    assert reg.runtimes["a"]["1.0.0"].download_url == "file:///srv/a.tar.gz"


def test_config_files_combine_user_first(tmp_path: Path) -> None:
    system = tmp_path / "etc.yaml"
    system.write_text("registries: [https://admin/registry.json]\nstore: /srv/jbl\n"
                      "gc: {keep_latest: 3, unused_for: 30d}\n")
    user = tmp_path / "xdg" / "jbl" / "config.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("registries:\n  - {name: mine, url: ../../mine}\n  - https://admin/registry.json\n"
                    "gc: {keep_latest: 5}\n")
    import jbl.store.config as config

    saved = config.SYSTEM_CONFIG
    config.SYSTEM_CONFIG = system
    try:
        cfg = load_config({"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    finally:
        config.SYSTEM_CONFIG = saved
    assert [r.url for r in cfg.registries] == [str(tmp_path / "mine"), "https://admin/registry.json"]
    assert cfg.registries[0].label == "mine"
    assert cfg.store == Path("/srv/jbl")
    assert cfg.gc == {"keep_latest": 5, "unused_for": "30d"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("registries: {a: 1}\n")
    with pytest.raises(UsageError, match="'registries' must be a list"):
        load_config({"JBL_CONFIG": str(bad)})


# --- choosing a version ----------------------------------------------------------------------
def test_install_picks_the_highest_release_by_semver(shop: RegistryServer, tmp_path: Path,
                                                     store_dir: Path) -> None:
    store = store_dir
    r = install(tmp_path, store, "demo", registry=shop.url).ok()
    assert r.out.startswith("installed demo@1.10.0: 5 files"), r.out  # 1.10.0 > 1.9.0
    assert "2.0.0-beta" not in r.out
    r = install(tmp_path, store, "demo@latest", registry=shop.url).ok()
    assert r.out.strip() == "demo@1.10.0 is already installed"
    assert installed(store, tmp_path) == ["demo@1.10.0"]


def test_partial_exact_and_prerelease_versions(shop: RegistryServer, tmp_path: Path,
                                               store_dir: Path) -> None:
    store = store_dir
    r = install(tmp_path, store, "demo@1.3", "demo@1.3.0", "demo@2.0.0-beta",
                registry=shop.url).ok()
    assert [ln.split(":")[0] for ln in r.out.splitlines()] == [
        "installed demo@1.3.2", "installed demo@1.3.0", "installed demo@2.0.0-beta"]
    assert installed(store, tmp_path) == ["demo@1.3.0", "demo@1.3.2", "demo@2.0.0-beta"]
    r = install(tmp_path, store, "demo@1.4", registry=shop.url)
    assert_one_line_error(r, 3, "demo@1.4 not found")
    assert "1.10.0" in r.err  # says what is there


def test_a_version_for_another_architecture_is_refused(shop: RegistryServer,
                                                       tmp_path: Path, store_dir: Path) -> None:
    store = store_dir
    r = install(tmp_path, store, "armonly", registry=shop.url)
    assert_one_line_error(r, 3, "armonly@1.0.0 is offered only for ubuntu-arm64; "
                                "this host is amd64")
    r = install(tmp_path, store, "mixed@1.1.0", registry=shop.url)
    assert_one_line_error(r, 3, "only for linux/aarch64")
    # without a version, the highest release this host can run
    r = install(tmp_path, store, "mixed", registry=shop.url).ok()
    assert r.out.startswith("installed mixed@1.0.0")


def test_json_output_of_install(shop: RegistryServer, tmp_path: Path, store_dir: Path) -> None:
    store = store_dir
    r = install(tmp_path, store, "demo@1.2.0", "--json", registry=shop.url).ok()
    [out] = json.loads(r.out)
    assert out["status"] == "installed" and out["version"] == "1.2.0"
    assert out["checksum"] == sha256_file(shop.root / "demo-1.2.0.tar.gz")
    assert out["source"] == shop.url + "demo-1.2.0.tar.gz"
    assert out["files"] == 5 and out["logical_bytes"] > 384 * 1024


# --- integrity and failures ------------------------------------------------------------------
def snapshot(store: Path) -> list[str]:
    """What the store holds, apart from the registry cache and SQLite's own side files."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if "cache" not in p.parts and not p.name.startswith("index.db"))


def test_a_bad_checksum_names_both_digests_and_changes_nothing(tmp_path: Path,
                                                              store_dir: Path) -> None:
    root = tmp_path / "reg"
    publish(root, "demo", "1.0.0")
    wrong = "sha256:" + "ab" * 32
    publish(root, "demo", "1.1.0", checksum=wrong)
    server = RegistryServer(root)
    try:
        store = store_dir
        install(tmp_path, store, "demo@1.0.0", registry=server.url).ok()
        before = (snapshot(store), installed(store, tmp_path))
        r = install(tmp_path, store, "demo@1.1.0", registry=server.url)
        assert_one_line_error(r, 5, wrong)
        assert sha256_file(root / "demo-1.1.0.tar.gz") in r.err
        assert (snapshot(store), installed(store, tmp_path)) == before
    finally:
        server.stop()


def test_a_missing_tarball_or_a_down_registry_is_exit_7(tmp_path: Path, store_dir: Path) -> None:
    root = tmp_path / "reg"
    publish(root, "demo", "1.0.0")
    (root / "demo-1.0.0.tar.gz").unlink()
    server = RegistryServer(root)
    store = store_dir
    try:
        r = install(tmp_path, store, "demo", registry=server.url)
        assert_one_line_error(r, 7, "HTTP 404")
    finally:
        server.stop()
    # nobody listens any more: the cached index still resolves, the download cannot
    r = install(tmp_path, store, "demo", registry=server.url)
    assert_one_line_error(r, 7, f"cannot download demo@1.0.0 from {server.url}demo-1.0.0")
    r = install(tmp_path, store, "demo", "--refresh", registry=server.url)
    assert_one_line_error(r, 7, f"cannot fetch registry {server.url}registry.json: cannot "
                                "connect")
    r = install(tmp_path, store, "demo", registry=str(tmp_path / "nowhere"))
    assert_one_line_error(r, 7, "no registry at")


def test_a_download_larger_than_its_size_is_cut_short(tmp_path: Path, store_dir: Path) -> None:
    root = tmp_path / "reg"
    publish(root, "demo", "1.0.0", size=1000)
    server = RegistryServer(root)
    try:
        r = install(tmp_path, store_dir, "demo", registry=server.url)
        assert_one_line_error(r, 5, "larger than the 1000 bytes its registry says")
    finally:
        server.stop()
    assert list((store_dir / "blobs" / "tmp").iterdir()) == []  # the partial download is gone


def test_a_server_that_never_answers_times_out(tmp_path: Path, store_dir: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        t0 = time.monotonic()
        r = install(tmp_path, store_dir, "demo", registry=url, JBL_HTTP_TIMEOUT="1s")
    assert_one_line_error(r, 7, f"cannot fetch registry {url}registry.json: timed out")
    assert time.monotonic() - t0 < 20


def test_a_malformed_registry_is_one_line_exit_7(tmp_path: Path, store_dir: Path) -> None:
    root = tmp_path / "reg"
    publish(root, "demo", "1.0.0", drop=["checksum"])
    r = install(tmp_path, store_dir, "demo", registry=str(root))
    assert_one_line_error(r, 7, "runtimes.demo.1.0.0: checksum")


# --- the cache -------------------------------------------------------------------------------
def test_the_index_is_cached_and_refresh_refetches(tmp_path: Path, store_dir: Path) -> None:
    root = tmp_path / "reg"
    publish(root, "demo", "1.0.0")
    server = RegistryServer(root)
    store = store_dir
    try:
        install(tmp_path, store, "demo", registry=server.url).ok()
        assert server.requests["/registry.json"] == 1
        assert len(list((store / "cache" / "registries").glob("*.json"))) == 1
        publish(root, "demo", "1.1.0")
        r = run_jbl("store", "available", "--registry", server.url, store=store,
                    env=env_for(tmp_path)).ok()
        assert "1.1.0" not in r.out  # served from the cache: the server was not asked
        assert server.requests["/registry.json"] == 1
        r = run_jbl("store", "available", "--refresh", "--registry", server.url, store=store,
                    env=env_for(tmp_path)).ok()
        assert "1.0.0, 1.1.0" in r.out
        assert server.requests["/registry.json"] == 2
    finally:
        server.stop()
    # offline: the cache answers, an installed version needs no download
    r = run_jbl("store", "available", "--registry", server.url, store=store,
                env=env_for(tmp_path)).ok()
    assert "1.0.0, 1.1.0" in r.out
    r = install(tmp_path, store, "demo@1.0.0", registry=server.url).ok()
    assert "already installed" in r.out
    # past the TTL an unreachable server falls back to the stale copy, with a warning
    for cached in (store / "cache" / "registries").glob("*.json"):
        os.utime(cached, (time.time() - 7200, time.time() - 7200))
    r = run_jbl("store", "available", "--registry", server.url, store=store,
                env=env_for(tmp_path)).ok()
    assert "1.1.0" in r.out and "using the copy cached 120 min ago" in r.err
    # but --refresh means "ask the server": that fails
    r = run_jbl("store", "available", "--refresh", "--registry", server.url, store=store,
                env=env_for(tmp_path))
    assert_one_line_error(r, 7, "cannot fetch registry")


# --- other kinds of registry -----------------------------------------------------------------
def test_file_urls_and_plain_directories(tmp_path: Path, store_dir: Path) -> None:
    root = tmp_path / "reg"
    publish(root, "demo", "1.0.0")
    publish(root, "demo", "1.1.0")
    store = store_dir
    install(tmp_path, store, "demo@1.0.0", registry=(root / "registry.json").as_uri()).ok()
    install(tmp_path, store, "demo@1.1.0", registry=str(root)).ok()
    assert installed(store, tmp_path) == ["demo@1.0.0", "demo@1.1.0"]
    assert not (store / "cache" / "registries").exists()  # local files are read, not cached


def test_config_with_two_registries_first_offer_wins(tmp_path: Path, store_dir: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    publish(first, "demo", "1.0.0")
    publish(second, "demo", "9.0.0")
    publish(second, "other", "2.0.0")
    server = RegistryServer(second)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"registries:\n  - first\n  - {{name: lab, url: '{server.url}'}}\n")
    store = store_dir
    try:
        r = run_jbl("store", "install", "demo", "other", store=store,
                    env=env_for(tmp_path, JBL_CONFIG=str(cfg))).ok()
        assert r.out.splitlines()[0].startswith("installed demo@1.0.0")  # first registry's
        assert r.out.splitlines()[1].startswith("installed other@2.0.0")
        r = run_jbl("store", "available", store=store,
                    env=env_for(tmp_path, JBL_CONFIG=str(cfg))).ok()
        assert "lab (shadowed)" in r.out
    finally:
        server.stop()
    r = run_jbl("store", "install", "demo", store=store, env=env_for(tmp_path))
    assert_one_line_error(r, 2, "no registry given")


def test_two_installs_at_once_in_two_processes(tmp_path: Path, store_dir: Path) -> None:
    root = tmp_path / "reg"
    for v in ("1.0.0", "1.1.0"):
        publish(root, "demo", v)
    publish(root, "other", "1.0.0")
    store = store_dir
    run_jbl("store", "install", "demo@1.0.0", "--registry", root, store=store,
            env=env_for(tmp_path)).ok()  # the store exists; now race two writers
    env = {**os.environ, **env_for(tmp_path)}
    env.pop("JBL_STORE", None)
    pauses = Pauses(tmp_path / "pauses")

    def start(spec: str, pause: bool) -> subprocess.Popen[str]:
        extra = pauses.env("ingest.before-commit") if pause else {}
        return subprocess.Popen([JBL, "--store", str(store), "store", "install", spec,
                                 "--registry", str(root)], env={**env, **extra}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # two installs downloaded and stored their blobs and are held before their commits;
    # a third install of one of the same versions runs start to end meanwhile
    held = [start("demo@1.1.0", True), start("other", True)]
    late = None
    try:
        flags = pauses.wait("ingest.before-commit", held)
        late = start("demo@1.1.0", False)
        late_out = late.communicate(timeout=120)
        assert late.returncode == 0 and late_out[0].startswith("installed demo@1.1.0"), late_out
        pauses.release(flags)
        outs = [p.communicate(timeout=120) + (p.returncode,) for p in held]
    finally:
        for p in (*held, late):
            if p is not None:
                reap(p)
    assert all(rc == 0 for _, _, rc in outs), outs
    assert outs[0][0].strip() == "demo@1.1.0 is already installed", outs  # the re-check
    assert outs[1][0].startswith("installed other@1.0.0"), outs
    assert installed(store, tmp_path) == ["demo@1.0.0", "demo@1.1.0", "other@1.0.0"]
