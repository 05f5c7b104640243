"""store/transport.py against local servers it cannot tell from real ones (tests/fleet_servers.py,
127.0.0.1 only): the failure sequence rule by rule (bad bytes -> no-cache refetch -> next
mirror -> origin -> exit 5 naming every bad source), 503/429 backoff, a down origin (exit 7,
not asked again), the stall rule per connection, size bounds, counters, concurrency over
kept-alive connections, proxies, directory sources, s3:// read as plain HTTP, and the
directory publishing target."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_servers import ForwardProxy, ScriptedServer
from jbl.store.config import load_config
from jbl.store.errors import ExitCode, IntegrityError, RegistryError, UsageError
from jbl.store.registry import DownloadSettings
from jbl.store.transport import (
    DirTarget,
    Fetcher,
    TransportSettings,
    mirrors_for,
    proxy_map,
    source_for,
    target_for,
    transport_settings,
)

BODY = os.urandom(3000)
NAME = "objects/ab/" + hashlib.sha256(BODY).hexdigest()


def digest_check(data: bytes) -> bool:
    return "objects/ab/" + hashlib.sha256(data).hexdigest() == NAME


def quick(**kw: object) -> TransportSettings:
    """Short waits, so the rules show in well under a second each."""
    dl = DownloadSettings(timeout=5, connect_timeout=2, speed_limit=1024, speed_time=1.0)
    return TransportSettings(**{"download": dl, "backoff": 0.01, "tries": 3,  # type: ignore
                                "backoff_total": 2.0, **kw})


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def mirror() -> Iterator[ScriptedServer]:
    s = ScriptedServer({NAME: BODY})
    yield s
    s.close()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    p = ForwardProxy()
    yield p
    p.close()


def test_origin_serves_and_counters_count(scripted: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    with Fetcher([scripted.url], quick()) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
        assert (f.requests, f.bytes_fetched) == (1, len(BODY))
        assert f.per_source[scripted.url].requests == 1
    assert "range" not in scripted.log[0].headers  # whole files only, never Range
    assert "cache-control" not in scripted.log[0].headers  # a cache may answer a plain GET


def test_a_mirror_first_and_the_origin_only_when_the_mirror_lacks_it(
        scripted: ScriptedServer, mirror: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    scripted.files["objects/cd/other"] = b"other"
    with Fetcher([mirror.url, scripted.url], quick()) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
        assert scripted.log == []  # the mirror had it
        assert f.get("objects/cd/other", max_size=100) == b"other"  # mirror 404 -> origin
        assert f.per_source[mirror.url].failures == 1
        assert f.per_source[scripted.url].requests == 1


def test_bad_bytes_are_fetched_again_with_no_cache_from_the_same_source(
        scripted: ScriptedServer, mirror: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    mirror.script(NAME, "bad")  # a cache's broken copy, replaced when told no-cache
    with Fetcher([mirror.url, scripted.url], quick()) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
    first, second = mirror.requests_for(NAME)
    assert "cache-control" not in first.headers
    assert second.headers["cache-control"] == "no-cache"
    assert scripted.log == []  # the second copy was good: the origin was not asked


def test_still_bad_goes_to_the_next_mirror_then_the_origin(
        scripted: ScriptedServer, mirror: ScriptedServer) -> None:
    mirror2 = ScriptedServer({NAME: BODY})
    try:
        scripted.files[NAME] = BODY
        mirror.script(NAME, "bad", "bad")
        mirror2.script(NAME, "bad", "bad")
        with Fetcher([mirror.url, mirror2.url, scripted.url], quick()) as f:
            assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
            assert f.per_source[mirror.url].bad == 2
            assert f.per_source[mirror2.url].bad == 2
        assert len(scripted.requests_for(NAME)) == 1
    finally:
        mirror2.close()


def test_bad_everywhere_is_exit_5_naming_the_object_and_every_bad_source(
        scripted: ScriptedServer, mirror: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    mirror.always[NAME] = "bad"
    scripted.always[NAME] = "bad"
    with Fetcher([mirror.url, scripted.url], quick()) as f, \
            pytest.raises(IntegrityError) as ei:
        f.get(NAME, check=digest_check, max_size=1 << 20)
    msg = str(ei.value)
    assert ei.value.exit_code == ExitCode.INTEGRITY and "\n" not in msg
    assert NAME in msg and f"{mirror.url}/{NAME}" in msg and f"{scripted.url}/{NAME}" in msg
    assert len(scripted.requests_for(NAME)) == 2  # plain, then no-cache


def test_a_body_over_max_size_is_bad_bytes(scripted: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    scripted.always[NAME] = "big"
    with Fetcher([scripted.url], quick()) as f, pytest.raises(IntegrityError,
                                                              match="larger than 3000"):
        f.get(NAME, max_size=len(BODY))
    scripted.always.clear()
    with Fetcher([scripted.url], quick()) as f:  # exactly max_size is fine
        assert f.get(NAME, max_size=len(BODY)) == BODY


def test_503_and_429_back_off_then_succeed(scripted: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    scripted.script(NAME, "503", "429")
    with Fetcher([scripted.url], quick()) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
        assert f.requests == 3 and f.per_source[scripted.url].failures == 2


def test_503_forever_is_bounded_and_exit_7(scripted: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    scripted.always[NAME] = "503"
    t0 = time.monotonic()
    with Fetcher([scripted.url], quick(tries=4)) as f, pytest.raises(RegistryError) as ei:
        f.get(NAME, max_size=1 << 20)
    assert time.monotonic() - t0 < 3
    assert ei.value.exit_code == ExitCode.REGISTRY
    assert "HTTP 503 after 4 tries" in str(ei.value)
    assert len(scripted.requests_for(NAME)) == 4


def test_a_down_origin_is_exit_7_in_one_line_and_not_asked_again(
        scripted: ScriptedServer, mirror: ScriptedServer) -> None:
    scripted.files["objects/cd/other"] = b"other"
    with Fetcher([scripted.url, mirror.url], quick()) as f:
        assert f.get("objects/cd/other", max_size=100) == b"other"
        scripted.disappear()
        # the next source still serves; the down one is remembered
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
        before = f.per_source[scripted.url].requests
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
        assert f.per_source[scripted.url].requests == before
    with Fetcher([scripted.url], quick()) as f, pytest.raises(RegistryError) as ei:
        f.get(NAME, max_size=1 << 20)
    assert "cannot connect" in str(ei.value) and "\n" not in str(ei.value)


def test_a_trickling_source_is_ended_by_the_stall_rule(scripted: ScriptedServer) -> None:
    scripted.files[NAME] = BODY
    scripted.always[NAME] = "trickle"
    t0 = time.monotonic()
    with Fetcher([scripted.url], quick()) as f, pytest.raises(RegistryError,
                                                              match="stalled"):
        f.get(NAME, max_size=1 << 20)
    assert time.monotonic() - t0 < 4  # a 1 s window; the body would take 15 minutes


def test_the_stall_rule_times_connections_not_queued_requests() -> None:
    """Four files, one at a time, each 2.5 KiB/s for 0.8 s: above the 1 KiB/s limit while
    on the wire. The last waits 2.4 s in the queue with no bytes, longer than the window:
    timing it from when it was queued would end it."""
    files = {f"objects/{i:02x}/x": os.urandom(2048) for i in range(4)}
    s = ScriptedServer(files, chunk_gap=0.1)
    try:
        with Fetcher([s.url], quick()) as f:
            got = dict(f.get_many(((p, None, 4096) for p in files), concurrency=1))
        assert got == files
    finally:
        s.close()


def test_get_many_runs_concurrently_over_kept_alive_connections() -> None:
    files = {f"objects/{i:02x}/{i}": os.urandom(500 + i) for i in range(60)}
    s = ScriptedServer(files, chunk_gap=0.002)
    try:
        with Fetcher([s.url], quick()) as f:
            got = dict(f.get_many(((p, None, 4096) for p in files), concurrency=4))
            assert got == files
            assert f.requests == 60 and f.bytes_fetched == sum(map(len, files.values()))
        assert s.connections <= 4  # 60 requests over at most 4 kept-alive connections
        assert len({r.conn for r in s.log}) > 1  # and really more than one at a time
    finally:
        s.close()


def test_get_many_raises_the_first_failure(scripted: ScriptedServer) -> None:
    scripted.files.update({f"o/{i}": b"x" for i in range(5)})
    with Fetcher([scripted.url], quick()) as f, pytest.raises(RegistryError, match="o/9"):
        list(f.get_many([(f"o/{i}", None, 10) for i in (0, 1, 9, 2)], concurrency=2))


def test_the_environment_proxy_and_the_config_proxy_are_honoured(
        scripted: ScriptedServer, forward_proxy: ForwardProxy) -> None:
    scripted.files[NAME] = BODY
    for settings in (quick(env={"HTTP_PROXY": forward_proxy.url}),
                     quick(proxy=forward_proxy.url)):
        with Fetcher([scripted.url], settings) as f:
            assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
    assert forward_proxy.log == [f"{scripted.url}/{NAME}"] * 2
    # NO_PROXY: straight to the server
    with Fetcher([scripted.url], quick(proxy=forward_proxy.url,
                                       env={"NO_PROXY": "127.0.0.1"})) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
    assert len(forward_proxy.log) == 2 and len(scripted.log) == 3


def test_proxy_map_precedence() -> None:
    env = {"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2", "NO_PROXY": "x.org,::1"}
    m = proxy_map(env, "http://conf:3")
    assert m == {"http://": "http://conf:3", "https://": "http://a:1",
                 "all://*x.org": None, "all://[::1]": None}
    assert proxy_map({"NO_PROXY": "*"}, "http://conf:3") == {}
    assert proxy_map({}, None) == {}


def test_a_directory_source_reads_files_and_follows_no_link(tmp_path: Path) -> None:
    (tmp_path / "objects" / "ab").mkdir(parents=True)
    (tmp_path / NAME).write_bytes(BODY)
    (tmp_path / "objects" / "ab" / "link").symlink_to(tmp_path / NAME)
    (tmp_path / "objects" / "cd").symlink_to(tmp_path / "objects" / "ab")
    with Fetcher([tmp_path.as_uri()], quick()) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
        for bad in ("objects/ab/link", f"objects/cd/{NAME.rsplit('/', 1)[1]}"):
            with pytest.raises(RegistryError):
                f.get(bad, max_size=1 << 20)
        for bad in ("../etc/passwd", "/etc/passwd", "objects/../x", ""):
            with pytest.raises(UsageError):
                f.get(bad, max_size=10)
    (tmp_path / NAME).write_bytes(b"corrupt")
    with Fetcher([str(tmp_path)], quick()) as f, pytest.raises(IntegrityError):
        f.get(NAME, check=digest_check, max_size=1 << 20)


def test_s3_sources_are_plain_unsigned_http(scripted: ScriptedServer) -> None:
    scripted.files[f"bucket-1/pre/fix/{NAME}"] = BODY
    settings = quick(s3_endpoint=scripted.url)
    with Fetcher(["s3://bucket-1/pre/fix"], settings) as f:
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
    assert "authorization" not in scripted.log[0].headers
    src = source_for("s3://bucket-1/p", s3_endpoint="https://{bucket}.s3.example.org")
    assert src.base == "https://bucket-1.s3.example.org/p"
    with pytest.raises(UsageError):
        source_for("s3://Bad_Bucket/x")


def test_for_registry_takes_the_registry_directory_as_origin(scripted: ScriptedServer) -> None:
    scripted.files[f"reg/{NAME}"] = BODY
    with Fetcher.for_registry(f"{scripted.url}/reg/registry.json", settings=quick()) as f:
        assert f.get(NAME, max_size=1 << 20) == BODY


def test_a_dir_target_writes_whole_files_and_knows_what_exists(tmp_path: Path) -> None:
    t = target_for(str(tmp_path / "reg"))
    assert isinstance(t, DirTarget)
    assert not t.exists(NAME) and t.get(NAME, 1 << 20) is None
    t.put(NAME, BODY, immutable=True)  # the registry directory is made on the first put
    t.sync()
    t.put("registry.json", b"{}", immutable=False)
    assert t.get(NAME, 1 << 20) == BODY and t.get(NAME, 10) is None
    assert t.exists(NAME) and (tmp_path / "reg" / NAME).read_bytes() == BODY
    assert oct((tmp_path / "reg" / NAME).stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in (tmp_path / "reg" / "objects" / "ab").iterdir()) == \
        [NAME.rsplit("/", 1)[1]]  # no temporary file left behind
    with pytest.raises(UsageError):
        t.put("../escape", b"x", immutable=True)
    with pytest.raises(UsageError):
        target_for("http://example.invalid/x")


def test_s3_target_without_boto3_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "boto3").mkdir()
    (tmp_path / "boto3" / "__init__.py").write_text("raise ImportError('no boto3 here')\n")
    code = ("from jbl.store.transport import target_for\n"
            "from jbl.store.errors import UsageError\n"
            "try:\n    target_for('s3://bucket/x')\n"
            "except UsageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert out.stdout.strip() == "publishing to s3://bucket/x needs boto3: pip install " \
        "'jbl[s3]'", out.stderr


def test_config_mirrors_proxy_and_s3_endpoint(tmp_path: Path) -> None:
    system = tmp_path / "system.yaml"
    system.write_text("mirrors: [http://127.0.0.1:9/all]\nproxy: http://127.0.0.1:3128\n"
                      "s3_endpoint: http://127.0.0.1:9000/\n")
    cfg = load_config({"JBL_CONFIG": str(system)})
    assert (cfg.proxy, cfg.s3_endpoint) == ("http://127.0.0.1:3128", "http://127.0.0.1:9000")
    user = tmp_path / "user.yaml"
    user.write_text("mirrors:\n  - {url: mirror, registry: http://o.example/reg/}\n"
                    "  - s3://bucket-1/x\n")
    cfg2 = load_config({"JBL_CONFIG": str(user)})
    assert [m.url for m in cfg2.mirrors] == [str(tmp_path / "mirror"), "s3://bucket-1/x"]
    assert mirrors_for(cfg2, "http://o.example/reg/registry.json") == \
        [str(tmp_path / "mirror"), "s3://bucket-1/x"]
    assert mirrors_for(cfg2, "http://other.example/registry.json") == ["s3://bucket-1/x"]
    ts = transport_settings(cfg, {"HTTPS_PROXY": "http://127.0.0.1:1"})
    assert ts.s3_endpoint == "http://127.0.0.1:9000" and ts.proxy == cfg.proxy
    assert transport_settings(cfg2, {}).s3_endpoint == "https://s3.amazonaws.com"
    for bad, what in (("proxy: squid:3128", r"'proxy' must be an http\(s\) URL"),
                      ("mirrors: [{registry: x}]", r"mirrors\[0\] must be a URL"),
                      ("mirrors: 5", "'mirrors' must be a list")):
        user.write_text(bad + "\n")
        with pytest.raises(UsageError, match=what) as ei:
            load_config({"JBL_CONFIG": str(user)})
        assert "\n" not in str(ei.value)


def test_a_4xx_moves_on_without_giving_the_source_up(scripted: ScriptedServer,
                                                     mirror: ScriptedServer) -> None:
    """A public bucket answers 403 for a key it lacks: the next source serves that file,
    and the mirror is still asked for the next one."""
    scripted.files["objects/cd/other"] = b"other"
    mirror.files["objects/cd/other"] = b"other"
    mirror.script("objects/cd/other", "403")
    with Fetcher([mirror.url, scripted.url], quick()) as f:
        assert f.get("objects/cd/other", max_size=100) == b"other"
        assert f.get(NAME, check=digest_check, max_size=1 << 20) == BODY
    assert [r.path for r in mirror.log] == ["objects/cd/other", NAME]
