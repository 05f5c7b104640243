"""A job's user has a name: real jobs of an ordinary user and of root's ``--user NAME``
see themselves in /etc/passwd and /etc/group (the runtime's entries plus theirs, from the
host's database), read-only; the runtime's own files are never changed; a uid the runtime
already names keeps the runtime's entry; root's own jobs need nothing written at all.
The pure merge (``identity.passwd_group``) is checked without root at the end."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest_run import jbl
from fixtures_names import names_runtime, tree
from jbl.runner.identity import JobUser, RuntimeEtc, passwd_group

test_user = conftest_run.test_user

RT_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nrtdaemon:x:101:101::/nonexistent:/bin/false\n"
RT_GROUP = b"root:x:0:\nrtdaemon:x:101:\n"
WHO = ("whoami; id -un; id -gn; python3 -c 'import os, pwd; p = pwd.getpwuid(os.getuid()); "
       "print(p.pw_name, p.pw_dir)'; echo x >> /etc/passwd || echo passwd-read-only; "
       "echo ---; cat /etc/passwd; echo ---; cat /etc/group")


@pytest.fixture(scope="module")
def rts() -> Iterator[dict[str, Path]]:
    base = Path(tempfile.mkdtemp(prefix="jbl-idrt-"))
    base.chmod(0o755)
    yield {"plain": names_runtime(base / "plain", {"passwd": RT_PASSWD, "group": RT_GROUP})}
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _split(out: str) -> tuple[list[str], str, str]:
    head, passwd, group = out.split("---\n")
    return head.splitlines(), passwd, group


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the test user")


@needs_root
def test_an_ordinary_users_job_knows_its_name(rts: dict[str, Path], test_user: str) -> None:
    pw = pwd.getpwnam(test_user)
    gname = grp.getgrgid(pw.pw_gid).gr_name
    before = tree(rts["plain"])
    r = jbl("run", "--runtime-dir", str(rts["plain"]), "--", "sh", "-c", WHO, user=test_user)
    assert r.returncode == 0, r.stderr
    head, passwd, group = _split(r.stdout)
    assert head == [test_user, test_user, gname, f"{test_user} /work", "passwd-read-only"]
    assert passwd == RT_PASSWD.decode() + (
        f"{test_user}:x:{pw.pw_uid}:{pw.pw_gid}:{pw.pw_gecos}:/work:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    assert group == RT_GROUP.decode() + f"{gname}:x:{pw.pw_gid}:\nnogroup:x:65534:\n"
    assert tree(rts["plain"]) == before  # the runtime's files are untouched


@needs_root
def test_root_user_option_gets_a_name_and_its_groups(rts: dict[str, Path],
                                                     test_user: str) -> None:
    pw = pwd.getpwnam(test_user)
    gname = grp.getgrgid(pw.pw_gid).gr_name
    r = jbl("run", "--runtime-dir", str(rts["plain"]), "--user", test_user, "--workdir",
            "/home/x", "--", "sh", "-c", WHO)
    assert r.returncode == 0, r.stderr
    head, passwd, group = _split(r.stdout)
    assert head == [test_user, test_user, gname, f"{test_user} /home/x", "passwd-read-only"]
    assert passwd.endswith(f"{test_user}:x:{pw.pw_uid}:{pw.pw_gid}:{pw.pw_gecos}:/home/x:"
                           "/bin/sh\n")
    assert "nobody" not in passwd  # no user namespace: every id is what it is on the host
    assert group == RT_GROUP.decode() + f"{gname}:x:{pw.pw_gid}:\n"


@needs_root
def test_roots_own_job_keeps_the_runtimes_files_unmounted(rts: dict[str, Path]) -> None:
    r = jbl("run", "--runtime-dir", str(rts["plain"]), "--", "sh", "-c",
            "whoami; cat /etc/passwd; grep -c ' /etc/passwd ' /proc/self/mountinfo")
    assert r.stdout == "root\n" + RT_PASSWD.decode() + "0\n", r.stderr


@needs_root
def test_a_uid_the_runtime_names_keeps_its_entry(test_user: str) -> None:
    pw = pwd.getpwnam(test_user)
    base = Path(tempfile.mkdtemp(prefix="jbl-idrt2-"))
    base.chmod(0o755)
    try:
        own = RT_PASSWD + f"builder:x:{pw.pw_uid}:{pw.pw_gid}::/opt:/bin/sh\n".encode()
        rt = names_runtime(base / "rt", {"passwd": own, "group": RT_GROUP +
                                         f"builders:x:{pw.pw_gid}:\n".encode()})
        r = jbl("run", "--runtime-dir", str(rt), "--", "sh", "-c",
                "whoami; id -gn; cat /etc/passwd", user=test_user)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "builder\nbuilders\n" + own.decode()  # nothing added at all
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_merge_is_pure_and_keeps_runtime_bytes() -> None:
    rt = RuntimeEtc("dir", {"passwd": b"root:x:0:0::/root:/bin/sh", "group": b""})
    names = {1000: ("al:ice", "Alice"), 1001: ("bob", "B\nob:x")}
    files = dict(passwd_group(rt, JobUser(1001, 50, (7, 50)), "/work",
                              lambda uid: names.get(uid), {50: "staff", 7: "lp"}.get))
    assert files["passwd"] == b"root:x:0:0::/root:/bin/sh\nbob:x:1001:50:Bobx:/work:/bin/sh\n"
    assert files["group"] == b"staff:x:50:\nlp:x:7:bob\n"
    # nameless on the host: nothing to add, nothing written
    assert passwd_group(rt, JobUser(4242, 4242), "/w", lambda _: None, lambda _: None) == []
