"""A fleet's real parts, started by the tests from the configuration files docs/fleet.md
shows (docs/fleet/nginx.conf, docs/fleet/squid.conf; tests/fleet_servers.py fills in only
ports and paths): nginx as the origin, squid as the shared cache in front of it, moto's S3
server mode as the bucket. Everything listens on 127.0.0.1 only.

The transport tests here fetch a hand-made layout of digest-named files (objects/, packs/,
registry.json) through these servers; the end-to-end tests below them publish and install
real runtimes with the jbl CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_servers import (
    Cache,
    Origin,
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
