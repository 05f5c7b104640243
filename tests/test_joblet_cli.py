"""Joblet's spellings: ``jbl runtime …`` and ``jbl job run`` do what ``jbl store …`` and
``jbl run`` do, the commands of Joblet's runtime guide run as written (``jbl`` for ``rnx``),
and a Joblet spelling jbl does not implement is one line and exit 2.

The registry is Joblet's kind: ``https://github.com/lab/runtimes`` named in ``~/.rnx/config.yaml``
(HOME is a temp dir) and ``--registry=mycompany/joblet-runtimes``, both served by a real HTTP
server on 127.0.0.1 that ``JBL_GITHUB_RAW_BASE`` points at (``/OWNER/REPO/main/registry.json``).
``python-3.11-ml`` is a real runtime built from this host's Python (tests/rtbuild.py) in three
versions, packed with ``jbl pack`` and published with ``jbl registry add``; its ``jblprobe``
package answers with the version, so each job proves which runtime it ran in.

Joblet's examples assume the script is already in the job's directory; a jbl job starts in
an empty one, so the scripts travel with ``--upload`` (Joblet's flag, also as written).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import JBL, Result, assert_one_line_error, assert_store_ok, run_jbl
from fixtures_registry import RegistryServer, make_tarball, publish, runtime_files
from rtbuild import build_runtime

ML = "python-3.11-ml"
VERSIONS = ("1.3.1", "1.3.2", "1.4.0-beta")
SCRIPT = "import sys, jblprobe\nprint('ran', jblprobe.VERSION, sys.argv[1:])\n"


@dataclass
class Lab:
    server: RegistryServer
    home: Path
    work: Path  # the user's directory: the scripts and data they upload
    store: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("JBL_CONFIG", "JBL_STORE")}
        return {**env, "HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"),
                "XDG_CACHE_HOME": str(self.home / ".cache"),
                "JBL_GITHUB_RAW_BASE": self.server.url.rstrip("/"),
                "JBL_VIEW_LINGER": "0"}  # a job's private view ends with it: rm is immediate

    def jbl(self, *args: str | os.PathLike[str]) -> Result:
        """``jbl --store STORE ARGS`` as the user types it, from their directory."""
        p = subprocess.run([JBL, "--store", str(self.store), *map(str, args)], cwd=self.work,
                           env=self.env(), capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("joblet")
    server = RegistryServer(base / "raw")
    repo = server.root / "lab/runtimes/main"
    for v in VERSIONS:
        tarball = base / f"{ML}-{v}.tar.gz"
        run_jbl("pack", build_runtime(base / f"rt-{v}", ML, v), "-o", tarball).ok()
        run_jbl("registry", "add", tarball, "--registry", repo).ok()
    publish(server.root / "mycompany/joblet-runtimes/main", "my-custom-runtime", "1.0.0")
    home = base / "home"
    (home / ".rnx").mkdir(parents=True)
    (home / ".rnx/config.yaml").write_text(
        'version: "3.0"\nnodes: {default: {address: "localhost:50051"}}\n'
        "runtimes:\n  registries:\n    - name: lab\n      url: https://github.com/lab/runtimes\n"
        "      enabled: true\n")
    work = base / "work"
    work.mkdir()
    for name in ("script.py", "experimental_pipeline.py"):
        (work / name).write_text(SCRIPT)
    (work / "raw_data.csv").write_text("id,value\n1,42\n")
    (work / "extract.py").write_text(
        "import csv, json\nprint(json.dumps(list(csv.DictReader(open('raw_data.csv')))))\n")
    lab = Lab(server, home, work, base / "store")
    yield lab
    server.stop()
    assert_store_ok(lab.store)


def ran(r: Result) -> tuple[str, list[str]]:
    """(runtime version, argv) the job's script printed."""
    r.ok()
    line = r.out.strip().splitlines()[-1]
    word, ver, args = line.split(" ", 2)
    assert word == "ran", r.out
    return ver, eval(args)  # the script's own repr of a list of str


# --- the runtime guide's commands, in its order ------------------------------------------------
def test_the_runtime_guide_as_written(lab: Lab) -> None:
    r = lab.jbl("runtime", "list").ok()
    assert r.out == lab.jbl("store", "list").out  # one implementation: the same output

    r = lab.jbl("runtime", "list", "--registry").ok()  # the configured (~/.rnx) registries
    assert ML in r.out and "1.3.1, 1.3.2, 1.4.0-beta" in r.out and "1.3.2" in r.out
    assert lab.server.requests["/lab/runtimes/main/registry.json"] == 1

    r = lab.jbl("runtime", "install", ML).ok()  # = @latest: the highest release, not a beta
    assert r.out.startswith(f"installed {ML}@1.3.2: ")
    r = lab.jbl("runtime", "install", f"{ML}@1.3.2").ok()
    assert r.out == f"{ML}@1.3.2 is already installed\n"
    r = lab.jbl("runtime", "install", "my-custom-runtime",
                "--registry=mycompany/joblet-runtimes").ok()
    assert r.out.startswith("installed my-custom-runtime@1.0.0: ")
    lab.jbl("runtime", "install", f"{ML}@1.3.1", f"{ML}@1.4.0-beta").ok()

    r = lab.jbl("runtime", "list", "--json").ok()
    assert r.out == lab.jbl("store", "list", "--json").out
    assert [(x["name"], x["version"]) for x in json.loads(r.out)] == \
        [("my-custom-runtime", "1.0.0")] + [(ML, v) for v in VERSIONS]

    # info names the version asked for, not the name's latest
    r = lab.jbl("runtime", "info", f"{ML}@1.3.1").ok()
    assert "version:" in r.out and r.out.split("version:")[1].split()[0] == "1.3.1"
    info = json.loads(lab.jbl("runtime", "info", f"{ML}@1.3.1", "--json").ok().out)
    assert (info["version"], info["name"]) == ("1.3.1", ML)
    info.pop("last_used_at")
    same = json.loads(lab.jbl("store", "info", f"{ML}@1.3.1", "--json").ok().out)
    same.pop("last_used_at")
    assert info == same

    assert ran(lab.jbl("job", "run", f"--runtime={ML}", "--upload=script.py",
                       "python", "script.py")) == ("1.3.2", [])
    assert ran(lab.jbl("job", "run", f"--runtime={ML}@1.3.1", "--upload=script.py",
                       "python", "script.py")) == ("1.3.1", [])
    r = lab.jbl("job", "run", f"--runtime={ML}", "--upload=raw_data.csv", "--upload=extract.py",
                "python", "extract.py").ok()
    assert json.loads(r.out) == [{"id": "1", "value": "42"}]  # > extracted.json: stdout only
    assert ran(lab.jbl("job", "run", f"--runtime={ML}@1.4.0-beta",
                       "--upload=experimental_pipeline.py", "python",
                       "experimental_pipeline.py")) == ("1.4.0-beta", [])

    r = lab.jbl("runtime", "remove", f"{ML}@1.3.1").ok()
    assert r.out == f"removed {ML}@1.3.1\n"
    r = lab.jbl("runtime", "remove", ML).ok()  # every version (no terminal: no question)
    assert r.out == f"removed {ML}@1.3.2\nremoved {ML}@1.4.0-beta\n"
    r = lab.jbl("runtime", "list", "--json").ok()
    assert [x["name"] for x in json.loads(r.out)] == ["my-custom-runtime"]
    assert_one_line_error(lab.jbl("runtime", "info", f"{ML}@1.3.1"), 3, "not installed")


# --- argv shapes -------------------------------------------------------------------------------
def test_both_option_spellings_and_the_command_without_dashes(lab: Lab) -> None:
    lab.jbl("runtime", "install", f"{ML}@1.3.1", "--registry", "lab/runtimes").ok()
    lab.jbl("runtime", "install", f"{ML}@1.3.1", "--registry=lab/runtimes", "-f").ok()
    for args in ([f"--runtime={ML}@1.3.1", "--upload=script.py"],
                 ["--runtime", f"{ML}@1.3.1", "--upload", "script.py"],
                 ["--runtime", f"{ML}@1.3.1", "--upload", "script.py", "--"]):
        for spelling in (["job", "run"], ["run"]):
            # options after the command are the command's, even jbl's and Joblet's own
            argv = ["python", "script.py", "--runtime=x", "-e", "A=1", "--schedule=1h", "--"]
            assert ran(lab.jbl(*spelling, *args, *argv)) == ("1.3.1", argv[2:]), args
    a = lab.jbl("runtime", "list", "--registry", "lab/runtimes", "--json").ok()
    b = lab.jbl("runtime", "list", "--registry=lab/runtimes", "--json").ok()
    c = lab.jbl("store", "available", "--registry", "lab/runtimes", "--json").ok()
    assert a.out == b.out == c.out and ML in a.out
    lab.jbl("runtime", "remove", f"{ML}@1.3.1").ok()


@pytest.mark.parametrize("flag", [["--schedule=1hour"], ["--schedule", "30min"],
                                  ["--workflow=ml-pipeline.yaml"], ["--node=srv1"],
                                  ["--node", "srv1"], ["--config", "/etc/rnx.yaml"],
                                  ["--sched=1h"]])
def test_joblet_job_flags_jbl_lacks_are_refused(lab: Lab, flag: list[str]) -> None:
    for spelling in (["job", "run"], ["run"]):
        r = lab.jbl(*spelling, "--runtime=my-custom-runtime", *flag, "python", "script.py")
        assert_one_line_error(r, 2, "jbl does not support Joblet's --")
        assert r.out == ""
    name = flag[0].split("=")[0]
    assert name[:7] in r.err  # the flag as jbl knows it


def test_joblets_global_node_flag_before_the_command(lab: Lab) -> None:
    r = lab.jbl("--node=srv1", "job", "run", "--runtime=x", "true")
    assert_one_line_error(r, 2, "jbl does not support Joblet's --node: jbl runs jobs on this "
                                "machine")


@pytest.mark.parametrize("argv", [["runtime", "build", "./python-ml"],
                                  ["runtime", "test", ML], ["runtime", "validate", ML],
                                  ["job", "logs", "42"], ["job", "cancel", "42"]])
def test_joblet_subcommands_jbl_lacks_are_refused(lab: Lab, argv: list[str]) -> None:
    r = lab.jbl(*argv)
    assert_one_line_error(r, 2, f"jbl does not support Joblet's `{' '.join(argv[:2])}`: ")
    assert r.out == ""


def test_version() -> None:
    r = run_jbl("--version").ok()
    assert r.out == f"jbl {version('jbl')}\n" and r.err == ""


# --- install --force under the Joblet spelling ---------------------------------------------
def test_a_re_released_version_says_so_and_needs_force(lab: Lab, tmp_path: Path) -> None:
    repo = lab.server.root / "rerelease/runtimes/main"
    entry = publish(repo, "rr", "1.0.0")
    store = tmp_path / "store"
    spell = ["runtime", "install", "rr@1.0.0", "--registry=rerelease/runtimes", "--refresh"]
    Lab(lab.server, lab.home, lab.work, store).jbl(*spell).ok()
    files = runtime_files("rr", "1.0.0")
    files["isolated/etc/version"] = b"1.0.0 rebuilt\n"
    make_tarball(files, repo / "rr-1.0.0.tar.gz")
    new = publish(repo, "rr", "1.0.0", files=files)
    assert new["checksum"] != entry["checksum"]
    again = Lab(lab.server, lab.home, lab.work, store)
    r = again.jbl(*spell)
    assert_one_line_error(r, 4, "already installed from a different tarball")
    assert entry["checksum"][7:19] in r.err and new["checksum"][7:19] in r.err
    assert "--force" in r.err
    r = again.jbl(*spell, "--force").ok()
    assert r.out.startswith("replaced rr@1.0.0: ")
    info = json.loads(again.jbl("runtime", "info", "rr@1.0.0", "--json").ok().out)
    assert info["checksum"] == new["checksum"]
    assert_store_ok(store)
