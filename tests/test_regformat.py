"""registry.json has one model (store/regformat.py): what `jbl registry add` writes is checked
by the installer's own reader, and the platform it publishes maps back to this host."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_jbl
from fixtures_gc import files_for, make_tarball
from jbl.store.errors import ExitCode, RegistryError
from jbl.store.regformat import (
    _ARCH_ALIASES,
    _PLATFORM_ARCH,
    host_arch,
    host_platforms,
    normalize_arch,
    parse_registry,
)


@pytest.mark.parametrize("arch", sorted(set(_ARCH_ALIASES.values())))
def test_every_published_platform_names_its_architecture(arch: str) -> None:
    assert normalize_arch(f"ubuntu-{_PLATFORM_ARCH.get(arch, arch)}") == arch


def test_the_host_platform_is_what_the_installer_runs() -> None:
    assert [normalize_arch(p) for p in host_platforms()] == [host_arch()]
    assert host_arch() == normalize_arch(platform.machine()) or host_arch() == \
        platform.machine().lower()


def test_registry_add_refuses_an_existing_entry_the_installer_would_refuse(
        tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    t1 = make_tarball(tmp_path / "a", "regfmt", "1.0.0", files_for("1.0.0", shared=2, own=1))
    t2 = make_tarball(tmp_path / "b", "regfmt", "1.1.0", files_for("1.1.0", shared=2, own=1))
    run_jbl("registry", "add", t1, "--registry", reg).ok()
    doc = json.loads((reg / "registry.json").read_text())
    doc["runtimes"]["regfmt"]["1.0.0"]["checksum"] = "md5:1234"  # hand-edited, broken
    broken = (json.dumps(doc, indent=2) + "\n").encode()
    (reg / "registry.json").write_bytes(broken)
    with pytest.raises(RegistryError, match="checksum must be"):  # the installer refuses it…
        parse_registry(broken, (reg / "registry.json").as_uri())
    # …so publishing next to it is refused in one line, and the file is left as it was.
    r = run_jbl("registry", "add", t2, "--registry", reg)
    assert_one_line_error(r, ExitCode.REGISTRY, "runtimes.regfmt.1.0.0: checksum must be")
    assert (reg / "registry.json").read_bytes() == broken
    # The entry fixed, the same command publishes, and the reader accepts what it wrote.
    doc["runtimes"]["regfmt"]["1.0.0"]["checksum"] = "sha256:" + "0" * 64
    (reg / "registry.json").write_text(json.dumps(doc))
    run_jbl("registry", "add", t2, "--registry", reg).ok()
    data = (reg / "registry.json").read_bytes()
    got = parse_registry(data, (reg / "registry.json").as_uri())
    assert sorted(got.runtimes["regfmt"]) == ["1.0.0", "1.1.0"]
    assert got.runtimes["regfmt"]["1.1.0"].platforms == tuple(host_platforms())
