"""The pure planner: order of steps, what the rootfs becomes, and bad requests. No root."""

from __future__ import annotations

import marshal
from pathlib import Path

import pytest
from jbl.runner import plan as P
from jbl.store.errors import UsageError
from jbl.store.manifest import Manifest, Mount, parse_manifest

ROOTFS = [P.RootfsEntry("bin", "symlink", "usr/bin"), P.RootfsEntry("etc", "dir"),
          P.RootfsEntry("usr", "dir"), P.RootfsEntry("tmp", "dir"), P.RootfsEntry("proc", "dir"),
          P.RootfsEntry("dev", "dir"), P.RootfsEntry("work", "dir"),
          P.RootfsEntry("VERSION", "file")]
MANIFEST = parse_manifest("name: rt\nversion: 1.0.0\nmounts:\n - {source: isolated, target: /}\n"
                          "environment: {PATH: /usr/bin, A: from-runtime}\n")
ROOT = P.Ids(0, 0, userns=False)


def plan(ids: P.Ids = ROOT, manifest: Manifest = MANIFEST, **kw: object) -> P.Plan:
    req = P.JobRequest(Path("/rt"), ("python3", "x.py"), job_id="job-1", **kw)  # type: ignore[arg-type]
    return P.build_plan(req, manifest, {"isolated": ROOTFS}, ids)


def ops(p: P.Plan) -> list[str]:
    return [s.op for s in p.steps]


def test_bubblewrap_order() -> None:
    o = ops(plan())
    order = ["no_new_privs", "join_cgroup", "unshare", "fork_init", "root_tmpfs", "proc",
             "pivot_root", "hostname", "fork_job", "drop_caps", "env", "chdir", "exec"]
    assert [x for x in o if x in order] == order
    assert o.index("bind_ro") < o.index("pivot_root")
    assert o[-1] == "exec"


def test_rootfs_entries_become_binds_and_symlinks() -> None:
    steps = plan().steps
    assert P.BindRO("/rt/isolated/usr", "/usr") in steps
    assert P.BindRO("/rt/isolated/etc", "/etc") in steps
    assert P.BindRO("/rt/isolated/VERSION", "/VERSION") in steps
    assert P.Symlink("usr/bin", "/bin") in steps
    targets = {getattr(s, "target", None) for s in steps if isinstance(s, P.BindRO)}
    assert not targets & {"/tmp", "/proc", "/dev", "/work"}  # the job's own, never the runtime's
    assert P.Tmpfs("/tmp", 0o1777) in steps
    assert P.Tmpfs("/work") in steps


def test_explicit_manifest_mounts() -> None:
    m = Manifest("rt", "1", mounts=(Mount("isolated/usr", "/usr"), Mount("data", "/data", False),
                                    Mount("isolated/tmp", "/tmp")))
    steps = plan(manifest=m).steps
    assert P.BindRO("/rt/isolated/usr", "/usr") in steps
    # readonly: false is a private overlay layer over the runtime path, never a plain bind
    assert P.Overlay("/rt/data", "/data") in steps
    assert not [s for s in steps if isinstance(s, P.Bind) and s.source == "/rt/data"]
    assert not [s for s in steps if getattr(s, "source", "") == "/rt/isolated/tmp"]


def test_readonly_false_layers_skipped_sources_and_owner() -> None:
    m = parse_manifest("name: rt\nversion: 1.0.0\nmounts:\n"
                       " - {source: isolated, target: /, readonly: false}\n"
                       " - {source: isolated/opt, target: /opt}\n")
    req = P.JobRequest(Path("/rt"), ("true",), job_id="job-1")
    user = P.Ids(0, 0, userns=False, job_uid=1000, job_gid=100)
    steps = P.build_plan(req, m, {"isolated": ROOTFS}, user, skip_sources={"isolated/opt"}).steps
    assert P.Overlay("/rt/isolated/usr", "/usr", 1000, 100) in steps  # the user's layer top
    assert P.BindRO("/rt/isolated/VERSION", "/VERSION") in steps  # a file: no layer
    assert not [s for s in steps if getattr(s, "target", "") == "/opt"]  # skipped source


def test_mount_points_below_runtime_dirs_keep_the_runtime_dir() -> None:
    # /usr/local/w needs /usr: the runtime's /usr stays (the helper layers it); only a
    # target that is itself a top-level name replaces the runtime's entry
    vols = (P.Volume(Path("/srv/v"), "/etc/x"), P.Volume(Path("/srv/w"), "/usr"))
    steps = plan(volumes=vols, workdir="/usr/local/w").steps
    assert P.BindRO("/rt/isolated/etc", "/etc") in steps and P.Bind("/srv/v", "/etc/x") in steps
    assert not [s for s in steps if isinstance(s, P.BindRO) and s.target == "/usr"]
    assert P.Tmpfs("/usr/local/w") in steps


def test_network_none_unshares_net_and_brings_up_lo() -> None:
    p = plan()
    assert P.Unshare(user=False, net=True) in p.steps and P.LoopbackUp() in p.steps
    host = plan(network="host")
    assert P.Unshare(user=False, net=False) in host.steps
    assert P.LoopbackUp() not in host.steps


def test_userns_maps_ids_and_skips_proc_protection() -> None:
    p = plan(P.Ids(1000, 1000, userns=True))
    assert P.Unshare(user=True, net=True) in p.steps
    assert p.steps[ops(p).index("unshare") + 1] == P.IdMap(1000, 1000)
    assert "protect_proc" not in ops(p)
    assert "protect_proc" in ops(plan())


def test_root_user_switch_before_dropping_caps() -> None:
    p = plan(P.Ids(0, 0, userns=False, job_uid=1000, job_gid=100, job_groups=(100, 5)))
    o = ops(p)
    assert o.index("fork_job") < o.index("set_user") < o.index("drop_caps")
    assert P.SetUser(1000, 100, (100, 5)) in p.steps
    assert P.Tmpfs("/work", 0o755, 1000, 100) in p.steps


def test_volumes_uploads_and_workdir() -> None:
    vols = (P.Volume(Path("/home/u/data"), "/data", True), P.Volume(Path("/srv/w"), "/w"))
    p = plan(volumes=vols, uploads=(Path("/home/u/x.py"),), workdir="/w")
    assert P.BindRO("/home/u/data", "/data") in p.steps
    assert P.Bind("/srv/w", "/w") in p.steps
    assert not [s for s in p.steps if isinstance(s, P.Tmpfs) and s.target == "/w"]
    assert P.CopyIn("/home/u/x.py", "/w/x.py") in p.steps
    o = ops(p)
    assert o.index("bind") < o.index("copy_in") < o.index("pivot_root")
    assert p.find(P.Chdir) == [P.Chdir("/w")]


def test_env_precedence() -> None:
    env = dict(plan(env=(("A", "from-cli"), ("B", "b"))).find(P.Env)[0].vars)  # type: ignore[attr-defined]
    assert env["A"] == "from-cli" and env["B"] == "b" and env["PATH"] == "/usr/bin"
    assert env["HOSTNAME"] == "job-1" and env["HOME"] == "/work"


@pytest.mark.parametrize("kw", [{"workdir": "rel"}, {"workdir": "/"}, {"workdir": "/tmp/x"},
                                {"workdir": "/a/../b"},
                                {"volumes": (P.Volume(Path("/x"), "/proc/x"),)},
                                {"volumes": (P.Volume(Path("/x"), "y"),)}])
def test_bad_requests(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        plan(**kw)


def test_no_command() -> None:
    req = P.JobRequest(Path("/rt"), ())
    with pytest.raises(UsageError, match="no command"):
        P.build_plan(req, MANIFEST, {"isolated": ROOTFS}, ROOT)


def test_wire_round_trips_through_marshal() -> None:
    p = plan().with_cgroup(["/sys/fs/cgroup/x/cgroup.procs"])
    wire = marshal.loads(marshal.dumps(p.to_wire()))
    assert wire["job_id"] == "job-1"
    assert {"op": "join_cgroup", "procs_files": ["/sys/fs/cgroup/x/cgroup.procs"]} in wire["steps"]
    assert wire["steps"][-1] == {"op": "exec", "argv": ["python3", "x.py"]}


def test_limits_requested() -> None:
    assert P.Limits().requested() == []
    assert P.Limits(memory=1, pids=3).requested() == ["memory", "pids"]


def test_job_id_is_a_hostname() -> None:
    jid = P.new_job_id()
    assert len(jid) <= 63 and jid.replace("-", "").isalnum()
