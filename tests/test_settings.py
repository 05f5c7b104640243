"""One settings object (store/settings.py): every key and variable defined once, the README's
table generated from it, nothing in store/ reading the environment or argv, the priority
order, the admin group from the system config only, and the demo free of tests/."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jbl.cli.main import action_of
from jbl.store import config, settings
from jbl.store.settings import ENV_NAMES, SETTINGS, resolve

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "fusefs", "runner", "cli")
# os.environ.get("JBL_…") or os.environ["JBL_…"] not followed by "=" (an assignment)
READ_JBL = r"""environ\.get\(\s*["']JBL_|environ\[\s*["']JBL_\w+["']\](?!\s*=)"""


def _sources(*pkgs: str) -> list[Path]:
    return sorted(p for pkg in pkgs for p in (ROOT / pkg).rglob("*.py"))


def _env_reads(tree: ast.AST) -> list[str]:
    """``os.environ``, ``os.environb``, ``os.getenv``, ``sys.argv`` (attribute or imported)."""
    found = []
    for node in ast.walk(tree):
        # any `.environ`, `.environb`, `.getenv`, `.argv`, whatever it is taken from (an
        # alias, `__import__("os")`): store/ has no other attribute of those names
        if isinstance(node, ast.Attribute) and \
                node.attr in ("environ", "environb", "getenv", "argv"):
            found.append(f".{node.attr} (line {node.lineno})")
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "sys"):
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if a.name in ("environ", "environb", "getenv", "argv")]
    return found


def test_nothing_in_store_reads_the_environment_or_argv() -> None:
    bad = {str(p.relative_to(ROOT)): r for p in _sources("store")
           if (r := _env_reads(ast.parse(p.read_text())))}
    assert bad == {}
    # the scan itself can fail: the code this issue removed is caught
    assert _env_reads(ast.parse("import sys\nargv = sys.argv if a is None else a\n"))
    assert _env_reads(ast.parse("import os\nx = os.environ.get('JBL_CRASH_AT')\n"))


def test_every_jbl_variable_the_package_names_is_a_documented_setting() -> None:
    named = {m for p in _sources(*PACKAGES) for m in re.findall(r"\bJBL_[A-Z_]+[A-Z]",
                                                                p.read_text())}
    assert named - ENV_NAMES == set()
    # and JBL_MOUNT_ENGINE is read in one place (its Settings property), no longer twice
    reads = [str(p.relative_to(ROOT)) for p in _sources(*PACKAGES)
             if re.search(READ_JBL, p.read_text())]  # a write (the demo's) is fine
    # The one exception: the light start of `jbl job list|status|log` reads JBL_JOBS_DIR and
    # JBL_DEBUG itself (importing store/settings.py costs ~14 ms of its ~67); its Env is
    # Settings.var for those two, and tests/test_job_list.py holds both paths to one output.
    assert [r for r in reads if r != "cli/job_light.py"] == []


def test_every_config_key_is_a_documented_setting() -> None:
    """The keys config.py reads (``doc.get("K")`` / ``doc["K"]``) are the table's keys."""
    read: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "store" / "config.py").read_text())):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "get" and isinstance(node.func.value, ast.Name) and \
                node.func.value.id in ("doc", "data", "block") and node.args:
            target = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and \
                node.value.id == "doc":
            target = node.slice
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            read.add(target.value)
    read.discard("url")  # a registry item's own field, not a key
    read.discard("name")
    read.discard("enabled")
    keys = {s.name.partition(".")[0] for s in SETTINGS if s.kind == "config"}
    assert read - keys == set()
    assert "admin_group" in keys and keys == config._KNOWN
    assert all(s.meaning and s.default for s in SETTINGS)
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)


def test_readme_settings_table_is_the_modules() -> None:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- settings table:[^\n]*-->\n(.*?)\n<!-- end of settings table -->",
                  text, re.S)
    assert m is not None, "README lost its settings table"
    assert m.group(1) == settings.markdown_table(), \
        "README's settings table differs: paste store/settings.py markdown_table() output"


def test_priority_flag_env_config_default(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"store: {tmp_path / 'from-config'}\n")
    env = {"JBL_CONFIG": str(cfg), "HOME": str(tmp_path)}
    assert resolve(env, euid=1000).store == tmp_path / "from-config"
    assert resolve({**env, "JBL_STORE": "/srv/env"}, euid=1000).store == Path("/srv/env")
    assert resolve({**env, "JBL_STORE": "/srv/env"}, store="/srv/flag").store == \
        Path("/srv/flag")
    none = {"JBL_CONFIG": "", "HOME": str(tmp_path)}
    assert resolve(none, euid=0).store == Path("/var/lib/jbl")
    assert resolve(none, euid=1000).store == tmp_path / ".local/share/jbl"
    assert resolve({**none, "XDG_DATA_HOME": "/x"}, euid=1000).store == Path("/x/jbl")
    # the environment is a snapshot: later changes to the mapping do not leak in
    live = dict(none)
    s = resolve(live, euid=1000)
    live["JBL_STORE"] = "/late"
    assert s.store == tmp_path / ".local/share/jbl"
    # only documented variables can be asked for
    with pytest.raises(KeyError):
        s.var("JBL_NO_SUCH_THING")


def test_values_parse_when_used_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    s = resolve({"JBL_VIEW_LINGER": "2m", "JBL_MOUNT_ENGINE": "pyfuse3",
                 "JBL_REQUIRE_LIMITS": "1", "JBL_CONFIG": ""})
    assert (s.view_linger, s.mount_engine, s.require_limits) == (120.0, "pyfuse3", True)
    assert resolve({}).view_linger == 60.0 and resolve({}).mount_engine is None
    from jbl.store.errors import UsageError

    with pytest.raises(UsageError, match="JBL_VIEW_LINGER"):
        _ = resolve({"JBL_VIEW_LINGER": "-5"}).view_linger
    # a bad value of one setting does not break a command that does not use it
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [\n")
    out = subprocess.run([sys.executable, "-m", "jbl.cli.main", "--version"],
                         env={**os.environ, "JBL_CONFIG": str(bad), "JBL_VIEW_LINGER": "x"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("jbl ")
    r = subprocess.run([sys.executable, "-m", "jbl.cli.main", "store", "list"],
                       env={**{k: v for k, v in os.environ.items() if k != "JBL_STORE"},
                            "JBL_CONFIG": str(bad)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr, r.stderr


def test_admin_group_comes_only_from_the_system_config(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "etc-jbl-config.yaml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)  # the real /etc is shared
    user = tmp_path / "user.yaml"
    user.write_text("admin_group: mallory\n")
    env = {"JBL_CONFIG": str(user)}
    assert resolve(env).admin_group == "jbl-admin"  # no system file: the default
    assert "admin_group" not in resolve(env).config.extra  # a known key, never 'extra'
    system.write_text("admin_group: labadmins\n")
    assert resolve(env).admin_group == "labadmins"
    system.write_text("admin_group: [\n")  # malformed: the default, not a crash
    assert resolve(env).admin_group == "jbl-admin"
    system.unlink()
    os.mkfifo(system)  # a FIFO must not hang jbl (non-blocking open, regular files only)
    assert resolve(env).admin_group == "jbl-admin"


def test_action_names_the_command() -> None:
    assert action_of(["store", "install", "x"]) == "install"
    assert action_of(["--store", "/s", "store", "gc", "--dry-run"]) == "gc"
    assert action_of(["--store", "store", "store", "rm", "a@1"]) == "rm"
    assert action_of(["run", "--runtime", "a", "--", "true"]) == "run"
    assert action_of([]) == "changing the store"


def test_demo_does_not_load_from_tests() -> None:
    for p in _sources(*PACKAGES):
        text = p.read_text()
        assert "spec_from_file_location" not in text, p
        assert not re.search(r"""["']tests["']""", text), p
    # the demo module imports with tests/ nowhere on the path
    out = subprocess.run([sys.executable, "-c", "import sys; import jbl.cli.demo as d; "
                          "assert not any('tests' in m for m in sys.modules "
                          "if m.startswith('rtbuild')); print(d.build_runtime.__module__)"],
                         cwd="/", env={**os.environ, "PYTHONPATH": ""},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "jbl.cli.hostruntime"
