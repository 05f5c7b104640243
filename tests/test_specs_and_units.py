"""What users type: sizes, durations, NAME@VERSION specs, runtime.yml — parsed one way."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jbl.store.errors import UnsafeArchive, UsageError
from jbl.store.manifest import parse_manifest
from jbl.store.units import format_size, parse_duration, parse_size
from jbl.store.versions import latest, parse_spec, select, sort_versions


@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("2G", 2 << 30), ("100", 100),
                                        ("1.5K", 1536), ("64MiB", 64 << 20), ("1t", 1 << 40)])
def test_sizes_read_like_people_write_them(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "M", "12X", "-5M", "1e9", "five"])
def test_malformed_sizes_are_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_size(bad)


@pytest.mark.parametrize("text,value", [("90s", 90), ("10m", 600), ("2h", 7200), ("30d", 2592000),
                                        ("1h30m", 5400), ("45", 45)])
def test_durations(text: str, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("bad", ["", "m", "10x", "ten minutes", "5m-"])
def test_malformed_durations_are_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_roughly_round_trips(n: int) -> None:
    back = parse_size(format_size(n))
    assert abs(back - n) <= max(1, n * 0.05)


def test_versions_compare_as_semver_not_text() -> None:
    avail = ["1.9.0", "1.10.0", "1.3.2", "1.3.10", "1.4.0-beta", "2.0.0-rc1"]
    assert latest(avail) == "1.10.0"
    assert select(parse_spec("py"), avail) == "1.10.0"
    assert select(parse_spec("py@latest"), avail) == "1.10.0"
    assert select(parse_spec("py@1.3"), avail) == "1.3.10"
    assert select(parse_spec("py@1.4.0-beta"), avail) == "1.4.0-beta"
    assert sort_versions(avail)[-1] == "2.0.0-rc1"


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30)),
                min_size=1, max_size=20))
def test_latest_is_the_numeric_maximum(triples: list[tuple[int, int, int]]) -> None:
    texts = [f"{a}.{b}.{c}" for a, b, c in triples]
    a, b, c = max(triples)
    assert latest(texts) == f"{a}.{b}.{c}"


@pytest.mark.parametrize("bad", ["", "@1.0", "py@", "../etc", "py thon"])
def test_bad_specs(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_spec(bad)


def test_manifest_mounts_must_stay_inside_the_runtime() -> None:
    head = "name: a\nversion: 1.0.0\nmounts:\n"
    ok = parse_manifest(head + "- {source: isolated/usr, target: /usr}\n")
    assert ok.mounts[0].source == "isolated/usr" and ok.mounts[0].readonly
    for src, dst in [("../../etc", "/etc"), ("/etc", "/etc"), ("isolated", "usr"),
                     ("isolated", "/usr/../etc")]:
        with pytest.raises(UnsafeArchive):
            parse_manifest(head + f"- {{source: '{src}', target: '{dst}'}}\n")
