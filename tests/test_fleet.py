"""A fleet's real parts, started by the tests from the configuration files docs/fleet.md
shows (docs/fleet/nginx.conf, docs/fleet/squid.conf; tests/fleet_servers.py fills in only
ports and paths): nginx as the origin, squid as the shared cache in front of it, moto's S3
server mode as the bucket. Everything listens on 127.0.0.1 only.

The transport tests here fetch a hand-made layout of digest-named files (objects/, packs/,
registry.json) through these servers; the end-to-end tests below them publish and install
real runtimes with the jbl CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cas_fixtures as cx
import httpx
import pytest
from conftest import Result, assert_one_line_error, assert_store_ok, run_jbl
from fleet_servers import (
    Cache,
    Origin,
    ScriptedServer,
    moto_s3,
    nginx_origin,
    public_bucket,
    squid_cache,
    world_dir,
)
from jbl.store.errors import IntegrityError, RegistryError
from jbl.store.registry import DownloadSettings
from jbl.store.transport import DirTarget, Fetcher, TransportSettings, target_for


def _obj(data: bytes) -> str:
    h = hashlib.sha256(data).hexdigest()
    return f"objects/{h[:2]}/{h}"


def check_for(relpath: str) -> object:
    want = relpath.rsplit("/", 1)[1]
    return lambda data: hashlib.sha256(data).hexdigest() == want


# 40 objects from 1 KiB to 1 MiB, and one 4 MiB pack: what a version publishes
OBJECTS = {_obj(d): d for d in (os.urandom(1024 << (i % 11)) for i in range(40))}
PACK = os.urandom(4 << 20)
PACK_PATH = f"packs/{hashlib.sha256(PACK).hexdigest()}.pack"


@pytest.fixture(scope="module")
def registry() -> Iterator[Path]:
    root = world_dir("jbl-fleet-reg-")
    t = DirTarget(str(root))
    for rel, data in OBJECTS.items():
        t.put(rel, data, immutable=True)
    t.put(PACK_PATH, PACK, immutable=True)
    t.sync()
    t.put("registry.json", b'{"runtimes": {}}', immutable=False)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=True)


@pytest.fixture
def origin(registry: Path) -> Iterator[Origin]:
    with nginx_origin(registry) as o:
        yield o


@pytest.fixture
def cache() -> Iterator[Cache]:
    with squid_cache() as c:
        yield c


def settings(**kw: object) -> TransportSettings:
    dl = DownloadSettings(timeout=10, connect_timeout=5)
    return TransportSettings(**{"download": dl, "backoff": 0.05, "tries": 3,  # type: ignore
                                "backoff_total": 2.0, "env": {}, **kw})


def items() -> list[tuple[str, object, int]]:
    return [(rel, check_for(rel), 1 << 20) for rel in OBJECTS] + \
        [(PACK_PATH, check_for(PACK_PATH.removesuffix(".pack")), 4 << 20)]


def fetch_all(origin: Origin, **kw: object) -> Fetcher:
    f = Fetcher([origin.url], settings(**kw))
    with f:
        got = dict(f.get_many(items(), concurrency=8))  # type: ignore[arg-type]
    assert got == {**OBJECTS, PACK_PATH: PACK}
    return f


def test_the_origin_serves_what_the_docs_say(origin: Origin) -> None:
    with httpx.Client(trust_env=False) as h:
        r = h.get(f"{origin.url}/{PACK_PATH}")
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert r.content == PACK
        r = h.get(f"{origin.url}/registry.json")
        assert r.headers["cache-control"] == "public, max-age=61"  # > 60 s: squid keeps it
        r = h.get(f"{origin.url}/{PACK_PATH}", headers={"Range": "bytes=0-9"})
        assert r.status_code == 200 and len(r.content) == len(PACK)  # never a part


def test_a_second_node_through_squid_makes_the_origin_serve_nothing_twice(
        origin: Origin, cache: Cache) -> None:
    first = fetch_all(origin, proxy=cache.url)
    assert first.requests == len(OBJECTS) + 1
    assert first.bytes_fetched == sum(map(len, OBJECTS.values())) + len(PACK)
    served = origin.requests()
    assert sorted(p for p, _ in served) == sorted(f"/{r}" for r, *_ in items())
    second = fetch_all(origin, env={"HTTP_PROXY": cache.url})  # the variable, this time
    assert second.requests == len(OBJECTS) + 1
    assert origin.requests() == served  # the 4 MiB pack too: squid kept every file
    # and without the cache, a node would have asked the origin for everything again
    fetch_all(origin)
    assert len(origin.requests()) == 2 * len(served)


def _cached_file(cache: Cache, data: bytes) -> Path:
    """squid's on-disk file holding ``data`` (its headers come first)."""
    marker = data[:4096]
    for p in (cache.prefix / "cache").rglob("*"):
        if p.is_file() and p.stat().st_size >= len(data) and marker in p.read_bytes():
            return p
    raise AssertionError("squid has not stored the object on disk")


def test_a_corrupt_copy_in_squid_is_refetched_with_no_cache_and_replaced(
        origin: Origin, registry: Path) -> None:
    rel = next(r for r, d in OBJECTS.items() if len(d) == 1 << 20)
    data = OBJECTS[rel]
    with squid_cache() as c:
        s = settings(proxy=c.url)
        with Fetcher([origin.url], s) as f:
            assert f.get(rel, check=check_for(rel), max_size=1 << 20) == data
        # squid stopped, one byte of its stored copy flipped, started again from its disk
        c.restart(lambda: _flip(_cached_file(c, data), data))
        before = len(origin.requests())
        with Fetcher([origin.url], s) as f:
            assert f.get(rel, check=check_for(rel), max_size=1 << 20) == data
            assert f.per_source[origin.url].bad == 1  # the corrupt copy was seen
        asked = origin.requests()[before:]
        assert asked == [(f"/{rel}", 200)]  # the no-cache request reached the origin
        assert '"no-cache"' in origin.access_log.read_text().splitlines()[-1]
        with Fetcher([origin.url], s) as f:  # squid replaced its copy
            assert f.get(rel, check=check_for(rel), max_size=1 << 20) == data
            assert f.per_source[origin.url].bad == 0
        assert len(origin.requests()) == before + 1


def _flip(path: Path, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(data[:4096]) + 100
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_corrupt_mirror_then_the_origin_and_bad_everywhere_is_exit_5(
        origin: Origin, registry: Path, tmp_path: Path) -> None:
    rel = next(iter(OBJECTS))
    mirror = tmp_path / "mirror"
    DirTarget(str(mirror)).put(rel, b"not the object", immutable=True)
    with Fetcher([str(mirror), origin.url], settings()) as f:
        assert f.get(rel, check=check_for(rel), max_size=1 << 20) == OBJECTS[rel]
        assert f.per_source[str(mirror)].bad == 1
    (registry / rel).write_bytes(b"broken at the origin too")
    try:
        with Fetcher([str(mirror), origin.url], settings()) as f, \
                pytest.raises(IntegrityError) as ei:
            f.get(rel, check=check_for(rel), max_size=1 << 20)
        assert f"{mirror}/{rel}" in str(ei.value) and f"{origin.url}/{rel}" in str(ei.value)
    finally:
        (registry / rel).write_bytes(OBJECTS[rel])
        (registry / rel).chmod(0o644)


def test_the_origin_going_away_is_exit_7(registry: Path) -> None:
    with nginx_origin(registry) as o:
        url = o.url
        with Fetcher([url], settings()) as f:
            rel = next(iter(OBJECTS))
            assert f.get(rel, max_size=1 << 20) == OBJECTS[rel]
    with Fetcher([url], settings()) as f, pytest.raises(RegistryError, match="cannot connect"):
        f.get(rel, max_size=1 << 20)


def test_publish_to_s3_with_boto3_and_read_it_back_as_plain_http(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_s3() as s3:
        public_bucket(s3, "jbl-fleet")
        code = (
            "import sys\n"
            "from jbl.store.transport import target_for\n"
            "t = target_for('s3://jbl-fleet/runtimes', s3_endpoint=sys.argv[1])\n"
            "for rel, path in zip(sys.argv[2::2], sys.argv[3::2]):\n"
            "    t.put(rel, open(path, 'rb').read(), immutable=rel != 'registry.json')\n"
            "assert t.exists('registry.json') and not t.exists('objects/00/00')\n")
        args = []
        for i, (rel, data) in enumerate(list(OBJECTS.items())[:5]):
            (tmp_path / str(i)).write_bytes(data)
            args += [rel, str(tmp_path / str(i))]
        (tmp_path / "index").write_bytes(b"{}")
        args += ["registry.json", str(tmp_path / "index")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        subprocess.run([sys.executable, "-c", code, s3.endpoint, *args], check=True,
                       env={**env, **s3.env}, timeout=120)
        with Fetcher(["s3://jbl-fleet/runtimes"], settings(s3_endpoint=s3.endpoint)) as f:
            for rel in args[0:10:2]:
                assert f.get(rel, check=check_for(rel), max_size=1 << 20) == OBJECTS[rel]
        with httpx.Client(trust_env=False) as h:  # the caching headers went up with them
            r = h.get(f"{s3.endpoint}/jbl-fleet/runtimes/{args[0]}")
            assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
            r = h.get(f"{s3.endpoint}/jbl-fleet/runtimes/registry.json")
            assert r.headers["cache-control"] == "public, max-age=61"
        # the publisher's own read-back, signed (what re-publishing uses to skip objects)
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        t = target_for("s3://jbl-fleet/runtimes", s3_endpoint=s3.endpoint)
        assert t.get(args[0], 1 << 20) == OBJECTS[args[0]]
        assert t.get("objects/00/00", 10) is None


# --- end to end: `jbl registry add` publishes, nodes `jbl store install` -----------------------
def _content(path: str) -> bool:
    return path.startswith(("/objects/", "/packs/", "/trees/"))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two versions of a runtime (tests/cas_fixtures.py: shared 1 MiB chunks, one new large
    file per version, packed small files) published with the real `jbl registry add` into a
    directory nginx's workers can read."""
    reg = world_dir("jbl-fleet-published-")
    cx.publish(reg, ["1.0.0", "1.1.0"], tmp_path_factory.mktemp("built"))
    subprocess.run(["chmod", "-R", "a+rX", str(reg)], check=True)
    yield reg
    subprocess.run(["rm", "-rf", str(reg)], check=True)


def install(node: Path, spec: str, registry: str, config: Path, *more: str) -> Result:
    env = {"JBL_CONFIG": str(config)}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "all_proxy", "no_proxy"):
        env[k] = ""  # only what the test's config says
    return run_jbl("store", "install", spec, "--registry", registry, *more, store=node, env=env,
                   timeout=120)


def listed(node: Path) -> list[tuple[str, str]]:
    r = run_jbl("store", "list", "--json", store=node).ok()
    return sorted((v["name"], v["version"]) for v in json.loads(r.out))


def test_nodes_install_through_squid_and_the_origin_serves_no_file_twice(
        published: Path, tmp_path: Path) -> None:
    with nginx_origin(published) as origin, squid_cache() as cache:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"proxy: {cache.url}\n")
        node_a, node_b = tmp_path / "a", tmp_path / "b"
        install(node_a, f"{cx.NAME}@1.0.0", origin.url, cfg).ok()
        cold = [x for x in origin.served() if _content(x[0])]
        install(node_a, f"{cx.NAME}@1.1.0", origin.url, cfg).ok()  # an update: 1.0.0 is here
        update = [x for x in origin.served() if _content(x[0])][len(cold):]
        for node in (node_b,):  # a second node, cold, then updated
            install(node, f"{cx.NAME}@1.0.0", origin.url, cfg).ok()
            install(node, f"{cx.NAME}@1.1.0", origin.url, cfg).ok()
        # registry.json went through the cache too (config proxy: for every request)
        assert f"{origin.url}/registry.json" in (cache.prefix / "access.log").read_text()
        served = Counter(p for p, _, _ in origin.served() if _content(p))
        assert served and max(served.values()) == 1, served  # squid served node b entirely
        assert all(status == 200 for _, status, _ in origin.served())
        # never a Range request (nginx logs the Range header asked for: "-" when none)
        assert all(line.split('"')[3] == "-"
                   for line in origin.access_log.read_text().splitlines())
        # the update fetched only what is new in 1.1.0: no file the cold install fetched,
        # and less than half its bytes
        assert {p for p, _, _ in update}.isdisjoint({p for p, _, _ in cold})
        assert sum(n for *_, n in update) < sum(n for *_, n in cold) / 2
        for node in (node_a, node_b):
            assert listed(node) == [(cx.NAME, "1.0.0"), (cx.NAME, "1.1.0")]
            assert_store_ok(node)


def test_a_corrupt_copy_on_a_mirror_is_fetched_again_from_the_origin(
        published: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(published, mirror)
    big = max((p for p in (mirror / "objects").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size)
    rel = str(big.relative_to(mirror))
    big.chmod(0o644)
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    big.write_bytes(bytes(raw))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"mirrors: [{mirror}]\n")
    with nginx_origin(published) as origin:
        install(tmp_path / "node", f"{cx.NAME}@1.0.0", origin.url, cfg).ok()
        asked = [p for p, _ in origin.requests() if _content(p)]
    assert asked == [f"/{rel}"]  # everything else came from the mirror
    assert_store_ok(tmp_path / "node")
    # bad at the origin too: exit 5 naming the object and both sources; nothing installed
    bad_origin = world_dir("jbl-fleet-bad-")
    try:
        shutil.copytree(mirror, bad_origin, dirs_exist_ok=True)
        subprocess.run(["chmod", "-R", "a+rX", str(bad_origin)], check=True)
        with nginx_origin(bad_origin) as origin:
            r = install(tmp_path / "node2", f"{cx.NAME}@1.0.0", origin.url, cfg)
        assert_one_line_error(r, rc=5, contains=rel)
        assert f"{mirror}/{rel}" in r.err and f"{origin.url}/{rel}" in r.err
        assert not (tmp_path / "node2" / "index.db").exists() or listed(tmp_path / "node2") == []
    finally:
        shutil.rmtree(bad_origin)


def test_the_origin_going_away_mid_install_leaves_the_store_as_before(
        published: Path, tmp_path: Path) -> None:
    node = tmp_path / "node"
    cfg = tmp_path / "config.yaml"
    cfg.write_text("download: {timeout: 10s}\n")
    install(node, f"{cx.NAME}@1.0.0", str(published), cfg).ok()
    before = listed(node)
    origin = ScriptedServer()
    try:
        origin.serve_dir(published)
        origin.vanish_after = 1  # the second object or pack request finds no server
        r = install(node, f"{cx.NAME}@1.1.0", origin.url, cfg, "--refresh")
    finally:
        origin.close()
    assert_one_line_error(r, rc=7)
    assert sum(1 for x in origin.log if x.path.startswith(("objects/", "packs/"))) >= 2
    assert listed(node) == before
    assert_store_ok(node)
    # and the next try, with the origin back, completes
    with nginx_origin(published) as back:
        install(node, f"{cx.NAME}@1.1.0", back.url, cfg).ok()
    assert listed(node) == [(cx.NAME, "1.0.0"), (cx.NAME, "1.1.0")]


def test_publish_to_a_bucket_and_install_from_it(tmp_path: Path) -> None:
    """`jbl registry add --registry s3://…` uploads with boto3 to moto's S3 server (the
    local S3 API of this test); a node installs with `--registry s3://…`, reading the bucket
    as plain unsigned HTTP."""
    built = tmp_path / "built"
    built.mkdir()
    tbs = [cx.tarball(built / f"{cx.NAME}-{v}.tar.gz", v) for v in ("1.0.0", "1.1.0")]
    with moto_s3() as s3:
        public_bucket(s3, "jbl-fleet")
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"s3_endpoint: {s3.endpoint}\n")
        env = {"JBL_CONFIG": str(cfg), **s3.env}
        first = run_jbl("registry", "add", tbs[0], "--registry", "s3://jbl-fleet/runtimes",
                        "--json", env=env).ok()
        again = run_jbl("registry", "add", *tbs, "--registry", "s3://jbl-fleet/runtimes",
                        "--json", env=env).ok()
        new = {e["version"]: e["published"] for e in json.loads(again.out)}
        assert json.loads(first.out)[0]["published"]["objects"] > 0
        assert new["1.0.0"]["objects"] == 0  # published before: nothing uploaded again
        assert 0 < new["1.1.0"]["objects"] < json.loads(first.out)[0]["published"]["objects"]
        with httpx.Client(trust_env=False) as h:
            doc = h.get(f"{s3.endpoint}/jbl-fleet/runtimes/registry.json").json()
            tree = doc["runtimes"][cx.NAME]["1.1.0"]["tree"]["url"]
            r = h.get(f"{s3.endpoint}/jbl-fleet/runtimes/{tree}")
            assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        node = tmp_path / "node"
        for v in ("1.0.0", "1.1.0"):
            r = install(node, f"{cx.NAME}@{v}", "s3://jbl-fleet/runtimes", cfg).ok()
            assert "fetched" in r.out
        assert listed(node) == [(cx.NAME, "1.0.0"), (cx.NAME, "1.1.0")]
        assert_store_ok(node)
    # a bucket that does not exist: one line naming it (exit 7)
    with moto_s3() as s3:
        cfg.write_text(f"s3_endpoint: {s3.endpoint}\n")
        r = run_jbl("registry", "add", tbs[0], "--registry", "s3://no-such-bucket/x",
                    env={"JBL_CONFIG": str(cfg), **s3.env})
        assert_one_line_error(r, rc=7, contains="s3://no-such-bucket/x")
        assert "NoSuchBucket" in r.err
