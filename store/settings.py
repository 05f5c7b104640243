"""Every setting jbl has, in one place: what it is called, what it means, its default, and the
one object that carries their values for a command.

Two kinds of setting exist:

* **config keys**, read from YAML files by ``store/config.py`` (which files, how they combine,
  and the bounds on them are documented there);
* **environment variables** (``JBL_*``), read once, at the CLI boundary.

``SETTINGS`` below is the table of both, each with its meaning and default; the README's
settings table is generated from it (``markdown_table``) and a test checks they agree. A
variable or key that is not in ``SETTINGS`` does not exist.

Priority, highest first: command-line flags > environment > the user's config > Joblet's
``~/.rnx/config.yaml`` (registries only) > the system config (/etc/jbl/config.yaml) > the
defaults below. One exception, for safety: ``admin_group`` comes only from the system config
(a user must not be able to name the group that messages and ``jbl setup`` treat as admins).

``resolve(env, ...)`` is called once by the CLI (``cli/options.py``) with ``os.environ``; the
resulting ``Settings`` is passed down (``args.settings``). Nothing in ``store/`` reads the
environment or ``sys.argv`` itself (a test scans for it). Values are parsed when first asked
for, so a malformed ``JBL_VIEW_LINGER`` fails ``jbl run`` (one line, exit 2) but not
``jbl store list``; the environment is the snapshot taken at ``resolve``.

Thread-safety: a ``Settings`` is immutable apart from its memoised config; build it on the
main thread before starting others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import Config

SYSTEM_STORE = Path("/var/lib/jbl")
DEFAULT_ADMIN_GROUP = "jbl-admin"
DEFAULT_VIEW_LINGER = 60.0  # seconds a lingering private view outlives its last job
# seconds; the default of removed_hold_limit (here, not in config.py: a mount daemon needs the
# number but not the YAML config code, which it never reads)
REMOVED_HOLD_LIMIT = 6 * 3600.0
NO_ACTION = "changing the store"  # the change a permission message names when none is known

Kind = Literal["config", "env"]


@dataclass(frozen=True)
class Setting:
    """One documented setting: a config key (dotted for nested ones) or an env variable."""

    name: str
    kind: Kind
    default: str
    meaning: str


def _c(name: str, default: str, meaning: str) -> Setting:
    return Setting(name, "config", default, meaning)


def _e(name: str, default: str, meaning: str) -> Setting:
    return Setting(name, "env", default, meaning)


SETTINGS: tuple[Setting, ...] = (
    # --- config keys (store/config.py reads them; where each is used is named) ---
    _c("registries", "none", "registries tried in order, each a URL, a path, `OWNER/REPO` or "
       "`{name, url, enabled}`; the user's file first, then the system's"),
    _c("runtimes.registries", "none", "Joblet's spelling of the same list (also read from "
       "`~/.rnx/config.yaml`, only when that file is the user's own)"),
    _c("store", "`/var/lib/jbl` for root, `$XDG_DATA_HOME/jbl` otherwise",
       "the store directory (after `--store` and `JBL_STORE`)"),
    _c("gc", "none", "the retention policy of `jbl store gc` (docs/gc.md); a flag replaces the "
       "same key"),
    _c("download.max_size", "8G", "largest tarball accepted when its registry entry gives no "
       "`size`"),
    _c("download.speed_limit", "1K", "bytes/s: a download slower than this for "
       "`download.speed_time` is ended (0: never)"),
    _c("download.speed_time", "60s", "the window of the stall rule (0: no stall rule)"),
    _c("download.timeout", "30s", "longest wait for a byte (`JBL_HTTP_TIMEOUT` wins)"),
    _c("download.connect_timeout", "10s", "longest wait to connect"),
    _c("removed_hold_limit", "6h", "how long a mount keeps serving a removed version someone "
       "still has open or cd'd into; `never` = no limit"),
    _c("github_raw_base", "`https://raw.githubusercontent.com`", "where `OWNER/REPO` "
       "registries are fetched from (a mirror; `JBL_GITHUB_RAW_BASE` wins)"),
    _c("mirrors", "none", "where a registry's content-addressed files are asked for before "
       "its origin, in order: each a URL (`http(s)://`, `s3://BUCKET/PREFIX`, a directory) "
       "for every registry, or `{url, registry}` for one (docs/fleet.md)"),
    _c("proxy", "none", "the HTTP proxy of registry downloads (`http://HOST:PORT`, e.g. a "
       "squid cache); `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` win, `NO_PROXY` applies"),
    _c("s3_endpoint", "`https://s3.amazonaws.com`", "the S3 API that `s3://BUCKET/PREFIX` "
       "names: read as unsigned HTTP(S) at `ENDPOINT/BUCKET/PREFIX/…` (`{bucket}` in it: "
       "virtual-hosted), published to with boto3"),
    _c("gpu_driver_root", "`/`", "test-only: the tree holding the GPU driver's files "
       "(`JBL_GPU_DRIVER_ROOT` wins)"),
    _c("admin_group", f"`{DEFAULT_ADMIN_GROUP}`", "the admin group `jbl setup --system` makes "
       "and messages name; read from /etc/jbl/config.yaml only"),
    # --- environment variables read by jbl ---
    _e("JBL_STORE", "unset", "the store directory (after `--store`, before config `store`)"),
    _e("JBL_CONFIG", "unset", "read exactly this config file instead of the usual ones; empty: "
       "no config file at all"),
    _e("JBL_GITHUB_RAW_BASE", "unset", "overrides config `github_raw_base`"),
    _e("JBL_HTTP_TIMEOUT", "unset", "overrides config `download.timeout`"),
    _e("JBL_MOUNT_ENGINE", "`raw`", "the FUSE engine of `jbl mount` and of private views: "
       "`raw` or `pyfuse3` (after `--engine`)"),
    _e("JBL_VIEW_LINGER", "`60`", "seconds (or a duration) a private view outlives its last "
       "job; 0 = a view per job"),
    _e("JBL_LAUNCHER", "unset", "`0`: `jbl run` never uses or starts the resident "
       "launcher (runner/launcher.py; read by runner/launchproto.switches, before any "
       "import); it outlives its last job by `JBL_VIEW_LINGER`"),
    _e("JBL_VOLUMES", "`/var/lib/jbl-volumes` for root, `$XDG_DATA_HOME/jbl-volumes` "
       "otherwise", "where `jbl volume` keeps volumes"),
    _e("JBL_REQUIRE_LIMITS", "unset", "`1`: refuse a job whose limits cannot be enforced "
       "(as `--require-limits`)"),
    _e("JBL_CGROUP_PARENT", "`jbl` (root) or the caller's own cgroup's parent",
       "the cgroup v2 parent of job cgroups"),
    _e("JBL_JOBS_DIR", "unset: `~/.local/state/jbl`, root's `/var/lib/jbl-jobs`",
       "where job records and logs live (`jobs.db`); used only when it is a 0700 directory "
       "of the caller's, ignored when it is someone else's (the test suite's own records)"),
    _e("JBL_DEBUG", "unset", "non-empty: debug logs and tracebacks (as `--debug`)"),
    _e("JBL_GPU_DRIVER_ROOT", "unset", "test-only: overrides config `gpu_driver_root`"),
    _e("JBL_SLIRP_HOST_LOOPBACK", "unset", "test-only: `1` lets an isolated job reach the "
       "host's loopback"),
    _e("JBL_CRASH_AT", "unset", "test-only: SIGKILL the process at this named crash point "
       "(store/crashpoints.py)"),
    _e("JBL_PAUSE_AT", "unset", "test-only: `NAME=DIR` pauses at crash point NAME until "
       "`DIR/NAME.PID` is removed"),
    _e("HTTP_PROXY", "unset", "proxy for http:// registry downloads (also `http_proxy`; "
       "wins over config `proxy`)"),
    _e("HTTPS_PROXY", "unset", "proxy for https:// registry downloads (also `https_proxy`)"),
    _e("ALL_PROXY", "unset", "proxy for both when the two above are unset (also `all_proxy`)"),
    _e("NO_PROXY", "unset", "hosts reached without a proxy, comma-separated (`*`: none; "
       "also `no_proxy`)"),
    _e("JBL_DEMO_DIR", "`/var/tmp/jbl-demo`", "where `make demo` builds and installs"),
    _e("JBL_JOB_ID", "—", "set by jbl in every job's environment (never read)"),
    _e("JBL_BENCH_CACHE", "`/var/tmp/jbl-bench`", "benchmarks only: their download and "
       "build cache"),
    _e("JBL_PREFIX", "`/opt/jbl`", "tests only: where `make install` put jbl"),
    _e("JBL_BINDIR", "`/usr/local/bin`", "tests only: where `make install` put the `jbl` "
       "link"),
)

ENV_NAMES = frozenset(s.name for s in SETTINGS if s.kind == "env")
# the top-level keys config.py knows (others are kept in Config.extra and ignored)
CONFIG_KEYS = frozenset(s.name.partition(".")[0] for s in SETTINGS if s.kind == "config")


def markdown_table() -> str:
    """The README's settings table (a test checks the README carries exactly this)."""
    rows = ["| setting | where | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        where = "config file" if s.kind == "config" else "environment"
        rows.append(f"| `{s.name}` | {where} | {s.default} | {s.meaning} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Settings:
    """The settings of one command, resolved at the CLI boundary (see the module docstring).

    ``env`` is the environment snapshot the CLI passed to ``resolve``; read it only through
    the properties below (or hand it to a function that documents which variables it reads).
    """

    env: Mapping[str, str] = field(default_factory=dict)
    store_flag: Path | None = None  # --store
    action: str = NO_ACTION  # what the command changes, for permission messages ("install")
    euid: int = 0
    home: str = "/"

    def var(self, name: str) -> str:
        """A ``JBL_*`` variable's value ("" when unset); only names in ``SETTINGS`` exist."""
        if name not in ENV_NAMES:
            raise KeyError(f"{name} is not a jbl setting (store/settings.py)")
        return self.env.get(name, "")

    @cached_property
    def config(self) -> Config:
        """The combined config files (read on first use; a malformed one: UsageError)."""
        from .config import load_config

        return load_config(self.env)

    @property
    def store(self) -> Path:
        """--store > JBL_STORE > config ``store`` > the default for this user."""
        if self.store_flag is not None:
            return self.store_flag
        if self.var("JBL_STORE"):
            return Path(self.var("JBL_STORE"))
        if self.config.store is not None:
            return self.config.store
        if self.euid == 0:
            return SYSTEM_STORE
        return Path(self.env.get("XDG_DATA_HOME") or os.path.join(self.home, ".local/share")) \
            / "jbl"

    @property
    def debug(self) -> bool:
        return bool(self.var("JBL_DEBUG"))

    @property
    def mount_engine(self) -> str | None:
        """JBL_MOUNT_ENGINE, or None for the engine's default (fusefs/mount.py)."""
        return self.var("JBL_MOUNT_ENGINE") or None

    @property
    def view_linger(self) -> float:
        """JBL_VIEW_LINGER in seconds (a duration; 0 = a view per job), else 60."""
        text = self.var("JBL_VIEW_LINGER").strip()
        if not text:
            return DEFAULT_VIEW_LINGER
        from .errors import UsageError
        from .units import parse_duration

        secs = float(parse_duration(text, what="JBL_VIEW_LINGER"))
        if secs < 0:
            raise UsageError(f"invalid JBL_VIEW_LINGER {text!r}: must be 0 or more")
        return secs

    @property
    def require_limits(self) -> bool:
        return self.var("JBL_REQUIRE_LIMITS") == "1"

    @property
    def slirp_host_loopback(self) -> bool:
        return self.var("JBL_SLIRP_HOST_LOOPBACK") == "1"

    @property
    def cgroup_parent(self) -> str | None:
        return self.var("JBL_CGROUP_PARENT") or None

    @property
    def gpu_driver_root(self) -> str | None:
        """JBL_GPU_DRIVER_ROOT, else config ``gpu_driver_root`` (the config is read only when
        the variable is unset); None = the real root."""
        return self.var("JBL_GPU_DRIVER_ROOT") or self.config.gpu_driver_root

    @property
    def demo_dir(self) -> Path:
        return Path(self.var("JBL_DEMO_DIR") or "/var/tmp/jbl-demo")

    @property
    def registry_cache(self) -> Path:
        """The user's registry cache (``$XDG_CACHE_HOME/jbl/registries``)."""
        base = self.env.get("XDG_CACHE_HOME") or os.path.join(self.home, ".cache")
        return Path(base) / "jbl" / "registries"

    @property
    def admin_group(self) -> str:
        """``admin_group`` from /etc/jbl/config.yaml only, else ``jbl-admin``."""
        from .config import system_admin_group

        return system_admin_group()


def resolve(env: Mapping[str, str], *, store: Path | str | None = None,
            action: str = NO_ACTION, euid: int | None = None,
            home: str | None = None) -> Settings:
    """The settings for one command: ``env`` is the process environment (the caller's
    ``os.environ``), ``store`` the ``--store`` flag, ``action`` what the command changes."""
    snapshot = dict(env)
    return Settings(env=snapshot, store_flag=Path(store) if store else None, action=action,
                    euid=os.geteuid() if euid is None else euid,
                    home=home if home is not None else
                    (snapshot.get("HOME") or os.path.expanduser("~")))
