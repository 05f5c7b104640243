"""runtime.yml as Joblet writes it, mount points anywhere, and Joblet's build-recipe tarballs.

Every runtime here is real (``rtbuild``: the host's own python and tools), packed with
``jbl pack``, imported into a real store and run by ``jbl run`` in real namespaces on the
store's FUSE view. The three runtime.yml shapes are the ones Joblet's own tools write:

* its setup scripts' heredoc (``setup-<os>-<arch>.sh``: ``isolated/...`` mounts, ``/tmp``
  and ``/proc`` in the table, a quoted version);
* its runtime builder's generated file: a fixed mount table, some of whose sources this
  runtime lacks, plus ``language``, ``packages``, ``requirements``, ``build_info``;
* a bare ``manifest.yaml`` (the registry repository's) used as runtime.yml: no mounts.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import Result, assert_one_line_error, run_jbl
from conftest_run import shared_dir, test_user, user_jbl  # noqa: F401 (fixtures)
from jbl.store.manifest import parse_manifest
from rtbuild import build_runtime

HEREDOC = """name: {name}
version: "3.11.9"
description: "Python 3.11 runtime with essential packages for general development"
type: "language-runtime"

mounts:
  - source: "isolated/bin"
    target: "/bin"
    readonly: true
  - source: "isolated/usr/bin"
    target: "/usr/bin"
    readonly: true
  - source: "isolated/lib"
    target: "/lib"
    readonly: true
  - source: "isolated/lib64"
    target: "/lib64"
    readonly: true
  - source: "isolated/usr/lib"
    target: "/usr/lib"
    readonly: true
  - source: "isolated/etc"
    target: "/etc"
    readonly: true
  - source: "isolated/tmp"
    target: "/tmp"
    readonly: false
  - source: "isolated/proc"
    target: "/proc"
    readonly: true

environment:
  PATH: "/usr/bin:/bin"
  PYTHONDONTWRITEBYTECODE: "1"
  OPENBLAS_NUM_THREADS: "1"
"""

# The builder's table lists the usual FHS directories whatever the runtime holds: this
# runtime has no isolated/opt, isolated/var/log or isolated/usr/local/lib (its isolated/sbin
# is a link to usr/sbin, followed inside the runtime).
BUILDER = """name: {name}
version: 1.10
description: Python 3.11 with ML packages
language: python
language_version: 3.10
mounts:
  - {{source: isolated/usr, target: /usr, readonly: true}}
  - {{source: isolated/bin, target: /bin, readonly: true}}
  - {{source: isolated/sbin, target: /sbin, readonly: true}}
  - {{source: isolated/lib, target: /lib, readonly: true}}
  - {{source: isolated/lib64, target: /lib64, readonly: true}}
  - {{source: isolated/usr/local/lib, target: /usr/local/lib, readonly: true}}
  - {{source: isolated/etc, target: /etc, readonly: true}}
  - {{source: isolated/opt, target: /opt, readonly: true}}
  - {{source: isolated/var/log, target: /var/log, readonly: false}}
  - {{source: isolated/tmp, target: /tmp, readonly: false}}
environment:
  PATH: /usr/bin:/bin
  PYTHONDONTWRITEBYTECODE: "1"
requirements:
  architectures: [x86_64, amd64]
  gpu: false
packages: [numpy==1.26.2, pandas==2.1.3]
libraries: [libopenblas0]
build_info:
  built_at: 2025-10-20T23:56:08Z
  builder: joblet-runtime-builder
  platform: ubuntu-amd64
x_lab_owner: ml-team
"""

MANIFEST_YAML = """# Joblet Runtime: {name}
name: {name}
version: 1.3.5
description: PyTorch-free test runtime
python_version: 3.11.7
platforms:
  - ubuntu-amd64
  - ubuntu-arm64
packages:
  - torch==2.1.0+cu118
"""

PROBE = ["python3", "-c", "import jblprobe, sys; print(jblprobe.VERSION, sys.version_info[0])"]


def _runtime(base: Path, name: str, yml: str, extra: dict[str, bytes] | None = None) -> Path:
    d = build_runtime(base / name, name, "0", probe=name, extra=extra)
    (d / "runtime.yml").write_text(yml.format(name=name))
    return d


def _install(store: Path, rtdir: Path) -> Result:
    tarball = rtdir.parent / f"{rtdir.name}.tar.gz"
    run_jbl("pack", rtdir, "-o", tarball).ok()
    return run_jbl("store", "import", tarball, store=store)


def _info(store: Path, spec: str) -> dict[str, object]:
    d: dict[str, object] = json.loads(run_jbl("store", "info", "--json", spec, store=store)
                                      .ok().out)
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("joblet")
    return d


# ---- the three shapes, each packed, installed and run --------------------------------------
@pytest.mark.parametrize("shape", ["heredoc", "builder", "manifest"])
def test_each_joblet_shape_packs_installs_and_runs(shape: str, base: Path,
                                                   store_dir: Path) -> None:
    yml = {"heredoc": HEREDOC, "builder": BUILDER, "manifest": MANIFEST_YAML}[shape]
    name = f"jl-{shape}"
    r = _install(store_dir, _runtime(base, name, yml)).ok()
    version = {"heredoc": "3.11.9", "builder": "1.10", "manifest": "1.3.5"}[shape]
    assert f"installed {name}@{version} " in r.out
    warned = [ln for ln in r.err.splitlines() if "sources the runtime lacks" in ln]
    if shape == "builder":  # one line for all of them, naming each
        assert len(warned) == 1, r.err
        for src in ("isolated/var/log", "isolated/usr/local/lib", "isolated/opt"):
            assert src in warned[0]
    else:
        assert warned == [], r.err
    job = run_jbl("run", "--runtime", f"{name}@{version}", "--", *PROBE, store=store_dir)
    assert job.rc == 0 and job.out.split() == [name, "3"], job


def test_version_is_kept_as_written(base: Path, store_dir: Path) -> None:
    m = parse_manifest("name: a\nversion: 1.10\npython_version: 3.10\n"
                       "build_info: {version: 1.20}\n")
    assert (m.version, m.extra["python_version"]) == ("1.10", "3.10")
    assert parse_manifest("name: a\nversion: '1.10'\n").version == "1.10"
    assert parse_manifest("name: a\nversion: 2\n").version == "2"
    # in the store, as listed, and the version a job is asked for
    _install(store_dir, _runtime(base, "jl-ver", BUILDER)).ok()
    rows = json.loads(run_jbl("store", "list", "--json", store=store_dir).ok().out)
    assert [(x["name"], x["version"]) for x in rows] == [("jl-ver", "1.10")]
    run_jbl("run", "--runtime", "jl-ver@1.10", "--", "true", store=store_dir).ok()
    assert run_jbl("run", "--runtime", "jl-ver@1.1", "--", "true", store=store_dir).rc == 3


def test_missing_sources_are_shown_by_info_and_skipped(base: Path, store_dir: Path) -> None:
    _install(store_dir, _runtime(base, "jl-miss", BUILDER)).ok()
    d = _info(store_dir, "jl-miss")
    mounts = {m["source"]: m for m in d["mounts"]}  # type: ignore[attr-defined]
    assert not mounts["isolated/opt"]["present"] and not mounts["isolated/var/log"]["present"]
    assert mounts["isolated/usr"]["present"] and mounts["isolated/sbin"]["present"]
    text = run_jbl("store", "info", "jl-miss", store=store_dir).ok().out
    assert "isolated/opt -> /opt (ro) - not in the runtime: skipped" in text
    # the job runs without them: no /opt, no /var/log; what exists is there
    job = run_jbl("run", "--runtime", "jl-miss", "--", "sh", "-c",
                  "ls -d /opt /var/log 2>&1; ls /sbin/ /usr/bin/python3", store=store_dir)
    assert job.rc == 0, job
    assert "/opt': No such file" in job.out and "/var/log': No such file" in job.out, job.out


def test_unknown_keys_are_kept_and_shown_bounded(base: Path, store_dir: Path) -> None:
    many = "".join(f"  - pkg{i}==1.0.{i}\n" for i in range(3000))
    yml = BUILDER.replace("packages: [numpy==1.26.2, pandas==2.1.3]\n", "packages:\n" + many)
    _install(store_dir, _runtime(base, "jl-keys", yml)).ok()
    extra = _info(store_dir, "jl-keys")["manifest_extra"]
    assert isinstance(extra, dict)
    assert extra["language"] == "python" and extra["x_lab_owner"] == "ml-team"
    assert extra["requirements"] == {"architectures": ["x86_64", "amd64"], "gpu": False}
    assert extra["build_info"]["built_at"] == "2025-10-20T23:56:08+00:00"  # YAML timestamp
    assert extra["libraries"] == ["libopenblas0"]
    assert isinstance(extra["packages"], str) and "more characters" in extra["packages"]
    text = run_jbl("store", "info", "jl-keys", store=store_dir).ok().out
    lines = {ln.split(":", 1)[0]: ln for ln in text.splitlines()}
    assert "joblet-runtime-builder" in lines["build_info"] and "ml-team" in lines["x_lab_owner"]
    assert len(lines["packages"]) < 4200 and "pkg0==1.0.0" in lines["packages"]


def test_empty_mounts_mean_the_whole_tree(base: Path, store_dir: Path) -> None:
    assert [(m.source, m.target) for m in parse_manifest(
        "name: a\nversion: 1.0.0\nmounts: []\n").default_mounts()] == [("isolated", "/")]
    yml = "name: {name}\nversion: 1.0.0\nmounts: []\n"
    _install(store_dir, _runtime(base, "jl-empty", yml,
                                 extra={"srv/data/hello.txt": b"whole tree\n"})).ok()
    job = run_jbl("run", "--runtime", "jl-empty", "--", "cat", "/srv/data/hello.txt",
                  store=store_dir)
    assert job.rc == 0 and job.out == "whole tree\n", job


def test_architectures_are_checked_at_install(base: Path, store_dir: Path) -> None:
    yml = BUILDER.replace("architectures: [x86_64, amd64]", "architectures: [arm64]")
    r = _install(store_dir, _runtime(base, "jl-arm", yml))
    assert_one_line_error(r, 3, "jl-arm@1.10 is built for arm64")
    assert "this host is amd64" in r.err
    rows = json.loads(run_jbl("store", "list", "--json", store=store_dir).ok().out)
    assert rows == []  # nothing stored
    # the legitimate use next to it: the same runtime for this host installs
    _install(store_dir, _runtime(base, "jl-x86", BUILDER)).ok()
    # and publishing the arm64 one for arm64 hosts is not this host's business
    reg = base / "reg-arm"
    run_jbl("registry", "add", base / "jl-arm.tar.gz", "--registry", reg, "--platform",
            "ubuntu-arm64").ok()


# ---- readonly: false ------------------------------------------------------------------------
def test_readonly_false_is_a_private_layer_per_job(base: Path, store_dir: Path,
                                                   shared_dir: Path) -> None:  # noqa: F811
    _install(store_dir, _runtime(base, "jl-rw", BUILDER,
                                 extra={"var/log/old.log": b"from the runtime\n"})).ok()
    sync = shared_dir / "sync"
    sync.mkdir()
    sync.chmod(0o777)
    # Each job writes into its layer, says so, waits for the other's word (both layers exist
    # at once), then shows what its /var/log holds.
    script = ("echo {me} > /var/log/{me}.log && echo more >> /var/log/old.log && "
              "touch /sync/{me} && i=0; while [ ! -e /sync/{other} ] && [ $i -lt 600 ]; "
              "do sleep 0.05; i=$((i+1)); done; ls /var/log; cat /var/log/old.log")
    out: dict[str, Result] = {}

    def job(me: str, other: str) -> None:
        out[me] = run_jbl("run", "--runtime", "jl-rw", "--volume", f"{sync}:/sync", "--",
                          "sh", "-c", script.format(me=me, other=other), store=store_dir)

    threads = [threading.Thread(target=job, args=p) for p in (("a", "b"), ("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for me in ("a", "b"):
        r = out[me]
        assert r.rc == 0, r
        assert r.out.split("\n")[:2] == [f"{me}.log", "old.log"], r.out  # not the other's
        assert r.out.endswith("from the runtime\nmore\n"), r.out
    assert sorted(os.listdir(sync)) == ["a", "b"]
    # nothing persisted: a later job sees the runtime's /var/log as installed
    r = run_jbl("run", "--runtime", "jl-rw", "--", "sh", "-c",
                "ls /var/log; cat /var/log/old.log", store=store_dir).ok()
    assert r.out == "old.log\nfrom the runtime\n", r.out
    # and the runtime itself stays read-only around the layer
    r = run_jbl("run", "--runtime", "jl-rw", "--", "sh", "-c", "touch /usr/x", store=store_dir)
    assert r.rc == 1 and "Read-only file system" in r.err, r


# ---- mount points anywhere ------------------------------------------------------------------
ANYWHERE = """name: {name}
version: 1.0.0
mounts:
  - {{source: isolated, target: /, readonly: true}}
environment: {{PATH: /usr/bin:/bin}}
"""


def test_mount_points_anywhere(base: Path, store_dir: Path, shared_dir: Path  # noqa: F811
                               ) -> None:
    _install(store_dir, _runtime(base, "jl-any", ANYWHERE,
                                 extra={"opt/tool/README": b"tool\n"})).ok()
    vol, up = shared_dir / "vol", shared_dir / "up"
    vol.mkdir()
    up.mkdir()
    (up / "input.txt").write_text("uploaded\n")
    new = shared_dir / "new"
    new.mkdir()
    script = ("set -e; pwd; cat input.txt; echo w > w.txt; echo v > /opt/x/v.txt; "
              "echo n > /data/new/n.txt; cat /opt/tool/README; "
              "for p in /opt/y /usr/bin/z /opt/tool/z /usr/local/q /data/z; do "
              "touch $p 2>/dev/null && echo WROTE $p || echo EROFS $p; done")
    r = run_jbl("run", "--runtime", "jl-any", "--volume", f"{vol}:/opt/x",
                "--volume", f"{new}:/data/new", "--workdir", "/usr/local/work/job",
                "--upload-dir", up, "--", "sh", "-c", script, store=store_dir)
    assert r.rc == 0, r
    assert r.out.splitlines()[:3] == ["/usr/local/work/job", "uploaded", "tool"], r.out
    assert [ln.split()[0] for ln in r.out.splitlines()[3:]] == ["EROFS"] * 5, r.out
    assert (vol / "v.txt").read_text() == "v\n" and (new / "n.txt").read_text() == "n\n"
    # the error the writes got is EROFS itself, not a permission refusal
    r = run_jbl("run", "--runtime", "jl-any", "--volume", f"{vol}:/opt/x", "--",
                "sh", "-c", "touch /opt/y", store=store_dir)
    assert r.rc == 1 and "Read-only file system" in r.err, r
    # the runtime is unchanged: a later job's /opt holds only what the tarball had
    r = run_jbl("run", "--runtime", "jl-any", "--", "sh", "-c", "ls /opt; ls -d /usr/local",
                store=store_dir)
    assert r.out == "tool\n" and "/usr/local': No such file" in r.err, r


def test_mount_points_anywhere_as_an_ordinary_user(base: Path, shared_dir: Path,  # noqa: F811
                                                   test_user: str) -> None:  # noqa: F811
    """Without root the same happens in a user namespace (overlayfs with userxattr)."""
    rt = _runtime(shared_dir, "jl-user", BUILDER.replace("isolated/opt, target: /opt",
                                                         "isolated/srv, target: /srv"),
                  extra={"srv/README": b"srv\n", "var/log/old.log": b"old\n"})
    vol = shared_dir / "uvol"
    vol.mkdir()
    os.chown(vol, *_ids(test_user))
    r = subprocess.run(["runuser", "-u", test_user, "--", user_jbl(), "run", "--runtime-dir",
                        str(rt), "--volume", f"{vol}:/srv/x", "--", "sh", "-c",
                        "echo u > /srv/x/f; echo mine > /var/log/mine.log; cat /srv/README;"
                        " ls /var/log; touch /srv/y 2>&1 || true"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r
    assert r.stdout.splitlines()[:3] == ["srv", "mine.log", "old.log"], r
    assert r.stdout.splitlines()[3:] == ["touch: cannot touch '/srv/y': Read-only file system"]
    assert (vol / "f").read_text() == "u\n"
    assert not (rt / "isolated/var/log/mine.log").exists()  # the lower layer is untouched


def _ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


# ---- build recipes --------------------------------------------------------------------------
def _recipe_tarball(base: Path, name: str) -> Path:
    d = base / "recipes" / name
    d.mkdir(parents=True)
    (d / "manifest.yaml").write_text(MANIFEST_YAML.format(name=name))
    for script in ("setup.sh", "setup-ubuntu-amd64.sh", "setup-rhel-arm64.sh"):
        (d / script).write_text("#!/bin/bash\nset -e\n# builds isolated/ and runtime.yml\n")
    (d / "versions.lock").write_text("torch==2.1.0+cu118\n")
    out = base / "recipes" / f"{name}-1.3.5.tar.gz"
    with tarfile.open(out, "w:gz") as tf:  # as Joblet's release workflow: tar -C runtimes NAME
        tf.add(d, arcname=name)
    return out


def test_build_recipe_tarball_is_refused_accurately(base: Path, store_dir: Path) -> None:
    tarball = _recipe_tarball(base, "python-3.11-pytorch-cuda")
    r = run_jbl("store", "import", tarball, store=store_dir)
    assert_one_line_error(r, 13, "a Joblet build recipe of runtime python-3.11-pytorch-cuda")
    assert "not a runtime root" in r.err and "unsafe" not in r.err, r.err
    assert "setup-ubuntu-amd64.sh" in r.err and "jbl pack" in r.err, r.err
    assert json.loads(run_jbl("store", "list", "--json", store=store_dir).ok().out) == []
    # publishing it is refused the same way
    r = run_jbl("registry", "add", tarball, "--registry", base / "reg-recipe")
    assert_one_line_error(r, 13, "build recipe")
    # a tarball with neither a runtime nor a recipe is still a malformed archive (exit 6)
    other = base / "recipes" / "junk.tar.gz"
    with tarfile.open(other, "w:gz") as tf:
        tf.add(base / "recipes" / "python-3.11-pytorch-cuda" / "versions.lock", "x/notes.txt")
    assert_one_line_error(run_jbl("store", "import", other, store=store_dir), 6)
    # the legitimate use next to it: a runtime imports into the same store
    _install(store_dir, _runtime(base, "jl-after-recipe", ANYWHERE)).ok()
