"""What a helper made ahead still has to do of a plan (runner/warm.py ``Helper.remaining``):
pure, no root. The real helpers are tested in tests/test_launcher_ahead.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from jbl.runner import plan as P
from jbl.runner.warm import Helper, ahead_steps
from test_plan import MANIFEST, ROOTFS

ROOT, USER = P.Ids(0, 0, userns=False), P.Ids(1000, 1000, userns=True)


def plan(ids: P.Ids, **kw: object) -> P.Plan:
    req = P.JobRequest(Path("/rt"), ("true",), job_id="job-1", **kw)  # type: ignore[arg-type]
    return P.build_plan(req, MANIFEST, {"isolated": ROOTFS}, ids)


def helper(uid: int, netns: bool) -> Helper:
    h = Helper(0, None, None)  # type: ignore[arg-type]
    h.ahead, h.netns = ahead_steps(uid, uid), netns
    return h


def after_init(steps: tuple[P.Step, ...], *drop: type[P.Step]) -> list[P.Step]:
    """``steps`` after the fork of init, without those of the ``drop`` kinds."""
    return [s for s in steps[steps.index(P.ForkInit()) + 1:] if not isinstance(s, drop)]


def test_roots_helper_keeps_its_network_namespace_and_leaves_the_rest() -> None:
    p = plan(ROOT)
    rest = helper(0, netns=True).remaining(p.steps)
    assert rest == [P.UnshareLate(mount=True), *after_init(p.steps, P.LoopbackUp)]
    assert rest[1] == P.RootTmpfs() and rest[-1] == P.Exec(("true",))
    assert P.NewSession(False) in rest  # the job's own session, after the request
    # --network host cannot use a helper in a network namespace of its own
    assert helper(0, netns=True).remaining(plan(ROOT, network="host").steps) is None
    # one whose network namespace could not be made: init makes it
    assert helper(0, netns=False).remaining(p.steps) == [P.UnshareLate(mount=True, net=True),
                                                         *after_init(p.steps)]


def test_root_user_switch_fits_and_keeps_its_steps() -> None:
    p = plan(P.Ids(0, 0, userns=False, job_uid=1000, job_gid=1000, job_groups=(1000,)))
    rest = helper(0, netns=True).remaining(p.steps)
    assert rest == [P.UnshareLate(mount=True), *after_init(p.steps, P.LoopbackUp)]
    assert P.SetUser(1000, 1000, (1000,)) in rest


def test_a_users_helper_gets_its_network_namespace_from_init_unless_host() -> None:
    p = plan(USER)
    assert helper(1000, netns=False).remaining(p.steps) == [P.UnshareLate(mount=True, net=True),
                                                            *after_init(p.steps)]
    host = plan(USER, network="host")
    assert helper(1000, netns=False).remaining(host.steps) == [P.UnshareLate(mount=True),
                                                               *after_init(host.steps)]


@pytest.mark.parametrize("uid,ids", [(1000, P.Ids(1001, 1001, userns=True)),  # other ids
                                     (1000, ROOT), (0, USER)])
def test_a_plan_of_other_namespaces_or_ids_does_not_fit(uid: int, ids: P.Ids) -> None:
    assert helper(uid, netns=False).remaining(plan(ids).steps) is None


def test_the_mount_namespace_is_always_made_by_init() -> None:
    """Made ahead, it would be a copy of the host's mounts as they were then."""
    assert all(not (isinstance(s, P.Unshare) and s.mount) for s in ahead_steps(0, 0))
    assert all(not (isinstance(s, P.Unshare) and s.mount) for s in ahead_steps(1000, 1000))
    p = plan(ROOT)
    no_mount = tuple(P.Unshare(s.user, s.net, False) if isinstance(s, P.Unshare) else s
                     for s in p.steps)
    assert helper(0, netns=True).remaining(no_mount) is None


@pytest.mark.parametrize("uid,ids", [(0, ROOT), (1000, USER)])
def test_an_isolated_jobs_plan_does_not_fit(uid: int, ids: P.Ids) -> None:
    """slirp4netns joins the helper's namespaces once the plan says so (NetReady)."""
    p = plan(ids, network="isolated")
    assert P.NetReady() in p.steps
    assert helper(uid, netns=False).remaining(p.steps) is None
