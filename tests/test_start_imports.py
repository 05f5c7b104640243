"""What a job's start does not import (issue 13: the first job waits for a mount daemon's
Python to import what it serves with; every ``jbl run`` as root opens the store for a lease).

Each check runs a fresh interpreter and reads its ``sys.modules``: the modules named here cost
milliseconds each (``python -X importtime``) and are needed only later, or on another path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _imported(code: str, names: list[str]) -> list[str]:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([n for n in {names!r} if n in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out: list[str] = json.loads(r.stdout.splitlines()[-1])
    return out


# What the mount daemon imports before it mounts and says "ready": its entry point, the raw
# engine, the request loop and the view it serves (fusefs/rawmount.RawEngine imports those
# two when it is made), and its argument parser at work (--help: every option formatted).
DAEMON = ("import contextlib, jbl.fusefs.daemon, jbl.fusefs.rawmount, jbl.fusefs.rawfs, "
          "jbl.store.view\n"
          "with contextlib.suppress(SystemExit):\n"
          "    jbl.fusefs.daemon.main(['--help'])")


@pytest.mark.parametrize("module", [
    "jbl.store.config",  # the YAML config code: the daemon is handed its one setting
    "subprocess",  # fusermount3 (not root), force_unmount, spawn: never before the mount
    "socket",  # fusermount3's socketpair (not root)
    "shutil",  # argparse's terminal width (with zlib, bz2, lzma)
    "secrets",  # a staged blob's name (hmac, OpenSSL): the daemon writes none
])
def test_the_mount_daemon_starts_without(module: str) -> None:
    assert _imported(DAEMON, [module]) == []


@pytest.mark.parametrize("module", ["zstandard", "secrets"])
def test_opening_the_store_does_not_load_the_blob_codec(module: str) -> None:
    # jbl run (root) opens the store for a lease and never encodes or decodes a blob
    assert _imported("import jbl.store.store", [module]) == []


def test_blobs_still_encode_and_decode() -> None:
    code = ("from jbl.store.blobs import BlobStore, CODEC_ZSTD\n"
            "data = b'jbl ' * 1000\n"
            "codec, stored = BlobStore.encode(data)\n"
            "assert codec == CODEC_ZSTD and len(stored) < len(data)\n"
            "assert BlobStore.decode(bytes(stored), codec, len(data)) == data")
    assert _imported(code, ["zstandard"]) == ["zstandard"]


def test_the_plan_compiles_no_dataclass_it_need_not() -> None:
    # each @dataclass execs six methods at import (~0.45 ms): only the two records callers
    # dataclasses.replace/asdict stay dataclasses
    import dataclasses

    from jbl.runner import plan

    made = {n for n, v in vars(plan).items() if isinstance(v, type)
            and v.__module__ == plan.__name__ and dataclasses.is_dataclass(v)}
    assert made == {"JobRequest", "Limits"}


def test_the_plans_records_behave_as_frozen_dataclasses() -> None:
    import dataclasses
    from pathlib import Path

    from jbl.runner.plan import JoinCgroup, Limits, Plan, Volume

    v = Volume(Path("/srv/data"), "/data")
    assert v == Volume(source=Path("/srv/data"), target="/data", readonly=False)
    assert v != Volume(Path("/srv/data"), "/data", True)
    assert hash(v) == hash(Volume(Path("/srv/data"), "/data"))
    assert repr(v) == "Volume(source=PosixPath('/srv/data'), target='/data', readonly=False)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.readonly = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        Volume(Path("/srv/data"))  # type: ignore[call-arg]
    p = Plan((JoinCgroup(),), Limits(memory=1 << 20), "job-1", ("c 1:3 rwm",))
    q = p.with_cgroup(["/sys/fs/cgroup/x/cgroup.procs"])
    assert q.find(JoinCgroup) == [JoinCgroup(("/sys/fs/cgroup/x/cgroup.procs",))]
    assert (q.limits, q.job_id, q.devices) == (p.limits, p.job_id, p.devices)
