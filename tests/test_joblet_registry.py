"""Registries the Joblet way: ``OWNER/REPO`` and ``https://github.com/OWNER/REPO`` mean that
repository's registry.json (under a raw-content base a setting replaces), Joblet's config block
``runtimes: {registries: [{name, url, enabled}]}`` in jbl's files and in ``~/.rnx/config.yaml``
(only that block, only the user's own file), ``enabled: false`` honoured.

The end-to-end tests serve ``/OWNER/REPO/main/registry.json`` from a real HTTP server on
127.0.0.1 and point ``JBL_GITHUB_RAW_BASE`` at it; runtimes are tiny synthetic ones
(fixtures_registry), the CLI is the real ``jbl`` in a subprocess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Result, assert_one_line_error, run_jbl
from fixtures_registry import RegistryServer, publish
from jbl.store.config import load_config
from jbl.store.errors import UsageError
from jbl.store.registry import location_url

RAW = "https://raw.githubusercontent.com"
NOBODY = 65534  # a real other user (Debian's nobody)


# --- naming a registry ---------------------------------------------------------------------
def test_owner_repo_and_github_urls_mean_the_raw_registry_json(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    want = f"{RAW}/mycompany/joblet-runtimes/main/registry.json"
    for text in ("mycompany/joblet-runtimes", "https://github.com/mycompany/joblet-runtimes",
                 "https://github.com/mycompany/joblet-runtimes/",
                 "https://github.com/mycompany/joblet-runtimes.git",
                 "http://www.github.com/mycompany/joblet-runtimes"):
        assert location_url(text) == want, text
    assert location_url("o/r", github_raw_base="http://127.0.0.1:9/mirror/") == \
        "http://127.0.0.1:9/mirror/o/r/main/registry.json"
    # what is not a repository keeps today's meaning
    assert location_url("https://github.com/o/r/raw/main/x.json") == \
        "https://github.com/o/r/raw/main/x.json"
    assert location_url("regs/registry.json") == (tmp_path / "regs/registry.json").as_uri()
    assert location_url("a/b/c") == (tmp_path / "a/b/c/registry.json").as_uri()
    assert location_url("./o/r") == (tmp_path / "o/r/registry.json").as_uri()
    assert location_url("o/..") == (tmp_path / "registry.json").as_uri()


def test_an_existing_local_path_shaped_owner_repo_stays_a_directory_registry(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert location_url("lab/runtimes").startswith(RAW)  # no such path: GitHub
    (tmp_path / "lab/runtimes").mkdir(parents=True)
    assert location_url("lab/runtimes") == (tmp_path / "lab/runtimes/registry.json").as_uri()
    # a relative config entry is looked up next to the config file, not in the cwd
    cfg = tmp_path / "etc/config.yaml"
    cfg.parent.mkdir()
    cfg.write_text("registries: [lab/runtimes, {url: site/regs}]\n")
    (tmp_path / "etc/site/regs").mkdir(parents=True)
    urls = [r.url for r in load_config({"JBL_CONFIG": str(cfg)}).registries]
    assert urls == ["https://github.com/lab/runtimes", str(tmp_path / "etc/site/regs")]


# --- the config blocks -----------------------------------------------------------------------
def _cfg(tmp_path: Path, text: str, **env: str) -> list[tuple[str, str]]:
    f = tmp_path / "config.yaml"
    f.write_text(text)
    return [(r.name, r.url) for r in load_config({"JBL_CONFIG": str(f), **env}).registries]


def test_joblets_runtimes_block_and_enabled_in_jbls_own_list(tmp_path: Path) -> None:
    got = _cfg(tmp_path, """
registries:
  - https://a.example/registry.json
  - {url: https://off.example/, enabled: false}
  - {name: own, url: own/repo, enabled: true}
runtimes:
  registries:
    - name: company
      url: https://github.com/mycompany/joblet-runtimes
      enabled: true
    - name: old
      url: https://github.com/mycompany/old-runtimes
      enabled: false
    - {name: implicit, url: other/repo}
""")
    assert got == [("", "https://a.example/registry.json"),
                   ("own", "https://github.com/own/repo"),
                   ("company", "https://github.com/mycompany/joblet-runtimes"),
                   ("implicit", "https://github.com/other/repo")]


@pytest.mark.parametrize("text, complaint", [
    ("runtimes: [a/b]\n", "'runtimes' must be a mapping"),
    ("runtimes: {registries: {url: x}}\n", "'runtimes.registries' must be a list"),
    ("runtimes: {registries: [{url: a/b, enabled: 'no'}]}\n", "'enabled' must be true or false"),
    ("runtimes: {registries: [{name: x}]}\n", "runtimes.registries[0] must be a URL/path"),
    ("github_raw_base: ftp://mirror\n", "'github_raw_base' must be an http(s) URL"),
    ("github_raw_base: [x]\n", "'github_raw_base' must be an http(s) URL"),
])
def test_a_malformed_block_names_the_file_and_key(tmp_path: Path, text: str,
                                                  complaint: str) -> None:
    with pytest.raises(UsageError) as e:
        _cfg(tmp_path, text)
    assert complaint in e.value.message and str(tmp_path / "config.yaml") in e.value.message


def test_the_raw_base_setting_config_then_env(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("github_raw_base: https://mirror.example/raw/\n")
    assert load_config({"JBL_CONFIG": str(f)}).github_raw_base == "https://mirror.example/raw"
    assert load_config({"JBL_CONFIG": ""}).github_raw_base == RAW
    env = {"JBL_CONFIG": str(f), "JBL_GITHUB_RAW_BASE": "http://127.0.0.1:1"}
    assert load_config(env).github_raw_base == "http://127.0.0.1:1"
    with pytest.raises(UsageError, match="JBL_GITHUB_RAW_BASE must be an http"):
        load_config({"JBL_CONFIG": "", "JBL_GITHUB_RAW_BASE": "/srv/mirror"})


# --- ~/.rnx/config.yaml ----------------------------------------------------------------------
RNX = """\
version: "3.0"
nodes:
  default: {address: "joblet.example:50051", cert: "-----BEGIN CERTIFICATE-----"}
store: /should/not/be/read
github_raw_base: http://should.not.be.read
runtimes:
  registries:
    - name: company
      url: https://github.com/mycompany/joblet-runtimes
      enabled: true
    - name: retired
      url: https://github.com/mycompany/retired
      enabled: false
"""


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """No JBL_CONFIG: the real file lookup, with HOME (and the user config) in ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("JBL_CONFIG", "XDG_CONFIG_HOME")}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / "cache"), **extra}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    (h / ".rnx").mkdir(parents=True)
    (h / ".rnx/config.yaml").write_text(RNX)
    return h


def test_the_runtimes_block_of_the_rnx_config_and_nothing_else(home: Path) -> None:
    cfg = load_config(home_env(home))
    assert [(r.name, r.url) for r in cfg.registries] == \
        [("company", "https://github.com/mycompany/joblet-runtimes")]
    assert cfg.store is None and cfg.github_raw_base == RAW  # the rest is Joblet's
    assert home / ".rnx/config.yaml" in cfg.files
    # the user's jbl config comes first and may switch a Joblet registry off
    (home / ".config/jbl").mkdir(parents=True)
    (home / ".config/jbl/config.yaml").write_text(
        "registries: [{url: https://a.example/r.json},\n"
        "             {url: 'https://github.com/mycompany/joblet-runtimes', enabled: false}]\n")
    assert [r.url for r in load_config(home_env(home)).registries] == \
        ["https://a.example/r.json"]
    # JBL_CONFIG names exactly the files jbl reads: no ~/.rnx then
    assert load_config({**home_env(home), "JBL_CONFIG": ""}).registries == ()


def test_a_malformed_rnx_config_is_one_line_naming_it(home: Path) -> None:
    (home / ".rnx/config.yaml").write_text("runtimes: {registries: [\n")
    with pytest.raises(UsageError, match=r"\.rnx/config\.yaml is not valid YAML"):
        load_config(home_env(home))


@pytest.mark.skipif(os.geteuid() != 0, reason="root's rules: needs root")
def test_root_reads_only_its_own_rnx_config(home: Path, caplog) -> None:
    path = home / ".rnx/config.yaml"
    own = load_config(home_env(home)).registries
    assert len(own) == 1

    def refused(why: str) -> None:
        caplog.clear()
        assert load_config(home_env(home)).registries == ()
        assert any(why in r.getMessage() and str(path) in r.getMessage()
                   for r in caplog.records), caplog.text

    os.chown(path, NOBODY, NOBODY)                      # another user's file
    refused(f"owned by uid {NOBODY}")
    os.chown(path, 0, 0)
    os.chown(path.parent, NOBODY, NOBODY)               # in another user's directory
    refused(f"owned by uid {NOBODY}")
    os.chown(path.parent, 0, 0)
    path.parent.chmod(0o777)                            # where anyone may swap the file
    refused("writable by others")
    path.parent.chmod(0o755)
    (home / "elsewhere.yaml").write_text(RNX)           # a link root does not follow
    path.unlink()
    path.symlink_to(home / "elsewhere.yaml")
    refused("symbolic link")
    path.unlink()
    os.mkfifo(path)                                     # never waited on
    refused("not a regular file")
    path.unlink()
    path.write_text(RNX)                                # and the legitimate file again
    assert load_config(home_env(home)).registries == own


# --- end to end over HTTP --------------------------------------------------------------------
@pytest.fixture
def github(tmp_path: Path) -> Iterator[RegistryServer]:
    """A raw-content server: /mycompany/joblet-runtimes/main/registry.json and tarballs."""
    server = RegistryServer(tmp_path / "raw")
    repo = server.root / "mycompany/joblet-runtimes/main"
    publish(repo, "my-custom-runtime", "1.0.0")
    publish(repo, "my-custom-runtime", "1.1.0")
    yield server
    server.stop()


def jbl_at(store: Path, home: Path, server: RegistryServer, *args: str) -> Result:
    return run_jbl(*args, store=store, env=home_env(
        home, JBL_GITHUB_RAW_BASE=server.url + "/"))


def test_install_from_owner_repo_over_the_raw_base(github: RegistryServer, store_dir: Path,
                                                  tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    r = jbl_at(store_dir, home, github, "runtime", "list", "--json",
               "--registry=mycompany/joblet-runtimes").ok()
    assert [(x["name"], x["versions"]) for x in json.loads(r.out)] == \
        [("my-custom-runtime", ["1.0.0", "1.1.0"])]
    assert github.requests["/mycompany/joblet-runtimes/main/registry.json"] == 1
    r = jbl_at(store_dir, home, github, "runtime", "install", "my-custom-runtime@1.0.0",
               "--registry", "https://github.com/mycompany/joblet-runtimes").ok()
    assert r.out.startswith("installed my-custom-runtime@1.0.0: ")
    # a repository that is not there: one line naming the URL jbl asked, exit 7
    r = jbl_at(store_dir, home, github, "runtime", "install", "x", "--registry=nobody/nothing")
    assert_one_line_error(r, 7, f"{github.url}nobody/nothing/main/registry.json: HTTP 404")


def test_install_with_the_registries_of_rnx_config(github: RegistryServer, store_dir: Path,
                                                    home: Path) -> None:
    # the enabled:false registry comes first and would answer (a directory registry
    # offering a different my-custom-runtime): it must not be asked
    decoy = home / "decoy"
    publish(decoy, "my-custom-runtime", "9.0.0")
    (home / ".rnx/config.yaml").write_text(
        "runtimes:\n  registries:\n"
        f"    - {{name: decoy, url: {decoy}, enabled: false}}\n"
        "    - {name: company, url: 'https://github.com/mycompany/joblet-runtimes'}\n")
    r = jbl_at(store_dir, home, github, "runtime", "install", "my-custom-runtime").ok()
    assert r.out.startswith("installed my-custom-runtime@1.1.0: ")
    r = jbl_at(store_dir, home, github, "runtime", "list", "--registry").ok()
    assert "company" in r.out and "decoy" not in r.out and "9.0.0" not in r.out
    # the same block switched off: no registry at all, said in one line
    (home / ".rnx/config.yaml").write_text(
        "runtimes:\n  registries:\n"
        "    - {name: company, url: 'mycompany/joblet-runtimes', enabled: false}\n")
    r = jbl_at(store_dir, home, github, "runtime", "install", "my-custom-runtime@1.0.0")
    assert_one_line_error(r, 2, "no registry given")


@pytest.mark.skipif(os.geteuid() != 0, reason="root's rules: needs root")
def test_a_refused_rnx_config_is_one_warning_per_command(home: Path, tmp_path: Path) -> None:
    os.chown(home / ".rnx/config.yaml", NOBODY, NOBODY)
    # no --store: the default store and the registry client both read the config
    r = run_jbl("runtime", "list", "--registry", str(tmp_path / "none"),
                env=home_env(home, XDG_DATA_HOME=str(tmp_path / "data")))
    warnings = [ln for ln in r.err.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and f"owned by uid {NOBODY}" in warnings[0], r.err
    assert r.rc == 7 and "no registry at" in r.err  # the command itself goes on as asked
