"""jbl's YAML configuration: where it is, how files combine, and what each key means.

Files, lowest priority first (later ones override earlier ones)::

    /etc/jbl/config.yaml                         the admin's (system-wide)
    $XDG_CONFIG_HOME/jbl/config.yaml             the user's (default ~/.config/jbl/config.yaml)

Between the two, Joblet's ``~/.rnx/config.yaml`` (``store/rnxconfig.py``): only its
``runtimes: {registries: [...]}`` block is read, and only from a file that is the user's own.
``JBL_CONFIG=FILE`` replaces all of them with exactly that one file (``JBL_CONFIG=`` empty:
none).

Keys::

    registries:                  # tried in order; the first that offers a NAME serves it
      - https://example.org/runtimes/registry.json
      - {name: lab, url: /srv/runtimes}          # a dir holding registry.json, or a file
      - {url: mycompany/joblet-runtimes, enabled: false}   # GitHub OWNER/REPO; off
    runtimes:                    # Joblet's spelling of the same list, read after registries:
      registries: [{name: company, url: https://github.com/mycompany/joblet-runtimes}]
    github_raw_base: https://mirror.example.org   # replaces https://raw.githubusercontent.com
                                 # for OWNER/REPO registries (env JBL_GITHUB_RAW_BASE wins)
    store: /var/lib/jbl          # default for --store (after --store and JBL_STORE)
    gc: {...}                    # retention policy; read by store/gc, passed through as a dict
    removed_hold_limit: 6h       # how long a mount keeps holding a removed version someone
                                 # still has open or cd'd into (fusefs/leases.py); never = no limit
    download: {...}              # download bounds; read by store/registry (DownloadSettings)
    mirrors:                     # asked before a registry's origin for its content-addressed
      - http://cache.lab:8080/runtimes             # files (store/transport.py), in order:
      - {url: /srv/mirror, registry: https://origin.example.org/runtimes}  # for one only
    proxy: http://squid.lab:3128 # HTTP proxy of downloads (HTTP(S)_PROXY/ALL_PROXY win)
    s3_endpoint: https://s3.eu-west-1.amazonaws.com   # what s3://BUCKET/PREFIX reaches
    gpu_driver_root: /srv/fake   # test-only: where jbl looks for proc/driver/nvidia, dev/nvidia*,
                                 # etc/ld.so.cache, usr/bin/nvidia-smi (runner/gpu.py; env
                                 # JBL_GPU_DRIVER_ROOT wins); default /
    admin_group: jbl-admin       # read from the system file only (system_admin_group)

Every key and variable, with its meaning and default, is listed once in ``store/settings.py``
(``SETTINGS``); the README's table is generated from it.

How files combine: ``registries`` lists are concatenated, the user's first (so a user can put
a registry in front of the admin's; duplicates dropped, and the first mention of a URL
decides whether it is ``enabled``, so a user can switch off an admin's registry); ``store``
is overridden; ``gc`` and
``download`` are shallow merges (a user's key replaces the admin's); ``mirrors`` are
concatenated, the user's first; ``proxy`` and ``s3_endpoint`` are overridden. A relative path in
``registries`` is taken relative to the file that names it, unless it has the shape
``OWNER/REPO`` and no such path exists there: then it is that GitHub repository
(``https://github.com/OWNER/REPO``; registry.py maps it to its raw registry.json).
Unknown keys are kept in ``extra`` and ignored.

A missing file is not an error; a malformed one is (UsageError naming the file and the key).
A config file must be a regular file of at most 1 MiB; its YAML is parsed with bounds
(``CONFIG_BOUNDS``: anchors and aliases allowed, but their expansion is capped).
The environment is never read here: callers pass the one ``Settings`` snapshot's ``env``.
Pure apart from reading the files; thread-safe.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .boundedyaml import Bounds, YamlBoundError
from .boundedyaml import load as load_bounded
from .errors import UsageError
from .settings import CONFIG_KEYS, DEFAULT_ADMIN_GROUP, REMOVED_HOLD_LIMIT

SYSTEM_CONFIG = Path("/etc/jbl/config.yaml")
ENV_CONFIG = "JBL_CONFIG"
CONFIG_BOUNDS = Bounds(max_bytes=1 << 20, max_depth=32, max_nodes=100_000, allow_aliases=True)
_KNOWN = CONFIG_KEYS  # store/settings.py documents each
ENV_GITHUB_RAW_BASE = "JBL_GITHUB_RAW_BASE"
GITHUB_RAW_BASE = "https://raw.githubusercontent.com"
# A GitHub repository as Joblet names a registry ("mycompany/joblet-runtimes"); a name ending
# in .json is a registry file's path, never a repository.
GITHUB_REPO_RE = re.compile(r"[A-Za-z0-9-]+/(?!\.\.?$)(?![^/]*\.json$)[A-Za-z0-9._-]+")
MAX_REGISTRIES = 256  # per file: a list longer than this is a mistake, not a setup
MAX_MIRRORS = 16  # per file: each is asked in turn for a missing file


@dataclass(frozen=True)
class RegistrySource:
    """One configured registry: a URL (http(s)://, file://) or a path; ``name`` for display."""

    url: str
    name: str = ""
    origin: str = ""  # the config file (or "--registry") that named it

    @property
    def label(self) -> str:
        return self.name or self.url


@dataclass(frozen=True)
class Mirror:
    """One configured mirror: a URL or directory, for every registry (``registry`` empty) or
    for the one whose base URL (or registry.json URL) is ``registry``."""

    url: str
    registry: str = ""
    origin: str = ""  # the config file that named it


@dataclass(frozen=True)
class Config:
    registries: tuple[RegistrySource, ...] = ()
    store: Path | None = None
    gc: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # the files actually read, in priority order (lowest first)
    extra: dict[str, Any] = field(default_factory=dict)
    # registry.DownloadSettings keys: key -> (value, the file that set it, for messages)
    download: dict[str, tuple[Any, str]] = field(default_factory=dict)
    removed_hold_limit: float | None = REMOVED_HOLD_LIMIT  # seconds; None = never released
    gpu_driver_root: str | None = None  # test-only fake driver tree (runner/gpu.py)
    github_raw_base: str = GITHUB_RAW_BASE  # where OWNER/REPO registries are fetched from
    mirrors: tuple[Mirror, ...] = ()  # store/transport.py, before each registry's origin
    proxy: str | None = None  # HTTP proxy of downloads (the environment's proxies win)
    s3_endpoint: str | None = None  # what s3:// names (None: transport's AWS default)


def config_paths(env: Mapping[str, str]) -> list[Path]:
    """The files consulted, lowest priority first (whether or not they exist)."""
    if ENV_CONFIG in env:
        return [Path(env[ENV_CONFIG])] if env[ENV_CONFIG] else []
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [SYSTEM_CONFIG, Path(xdg) / "jbl" / "config.yaml"]


def _is_url(text: str) -> bool:
    return "://" in text


def _registry_item(item: Any, where: str, path: Path) -> tuple[RegistrySource, bool]:
    """One entry of a registries list -> (the registry, whether it is enabled)."""
    enabled: Any = True
    if isinstance(item, str):
        url, name = item, ""
    elif isinstance(item, dict) and isinstance(item.get("url"), str):
        url, name = item["url"], str(item.get("name") or "")[:200]
        enabled = item.get("enabled", True)
        if not isinstance(enabled, bool):
            raise UsageError(f"{where}: 'enabled' must be true or false")
    else:
        raise UsageError(f"{where} must be a URL/path or a mapping with 'url'")
    url = url.strip()
    if not url:
        raise UsageError(f"{where} is empty")
    if not _is_url(url):
        p = Path(os.path.expanduser(url))
        if not p.is_absolute() and GITHUB_REPO_RE.fullmatch(url) \
                and not os.path.lexists(path.parent / p):
            url = f"https://github.com/{url}"  # Joblet's OWNER/REPO (an existing path wins)
        else:
            url = str(p if p.is_absolute() else (path.parent / p).resolve())
    return RegistrySource(url, name, str(path)), enabled


def _registry_list(value: Any, key: str, path: Path) -> list[tuple[RegistrySource, bool]]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UsageError(f"config {path}: '{key}' must be a list")
    if len(value) > MAX_REGISTRIES:
        raise UsageError(f"config {path}: '{key}' lists more than {MAX_REGISTRIES} registries")
    return [_registry_item(x, f"{path}: {key}[{i}]", path) for i, x in enumerate(value)]


def file_registries(doc: Mapping[str, Any], path: Path) -> list[tuple[RegistrySource, bool]]:
    """One file's registries, in order: jbl's ``registries:``, then Joblet's
    ``runtimes: {registries: [{name, url, enabled}]}``; each with whether it is enabled."""
    out = []
    if doc.get("registries") is not None:
        out += _registry_list(doc["registries"], "registries", path)
    block = doc.get("runtimes")
    if block is not None:
        if not isinstance(block, dict):
            raise UsageError(f"config {path}: 'runtimes' must be a mapping (Joblet's "
                             "runtimes: {registries: [{name, url, enabled}]})")
        if block.get("registries") is not None:
            out += _registry_list(block["registries"], "runtimes.registries", path)
    return out


def _raw_base(value: Any, what: str) -> str:
    """``github_raw_base`` / JBL_GITHUB_RAW_BASE: an http(s) URL without query or fragment."""
    return _http_url(value, what, GITHUB_RAW_BASE)


def _http_url(value: Any, what: str, example: str) -> str:
    """An http(s) URL without query, fragment or spaces, else UsageError with ``example``."""
    text = value.strip().rstrip("/") if isinstance(value, str) else ""
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in ("http", "https") or not rest or len(text) > 2048 \
            or any(c in text for c in "?# ") or not text.isprintable():
        raise UsageError(f"{what} must be an http(s) URL such as {example} "
                         f"(got {str(value)[:200]!r})")
    return text


def _files(env: Mapping[str, str]) -> list[tuple[Path, bool]]:
    """(file, is it Joblet's ~/.rnx/config.yaml), lowest priority first."""
    paths = config_paths(env)
    if ENV_CONFIG in env:
        return [(p, False) for p in paths]
    from .rnxconfig import rnx_config_path

    return [(paths[0], False), (rnx_config_path(env), True), *((p, False) for p in paths[1:])]


def _read_bounded(path: Path) -> str | None:
    """The file's text; None if missing. Non-blocking and type-checked: a FIFO or a device
    named as a config must not hang or spin jbl."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"config {path} is not a regular file")
        data = f.read(CONFIG_BOUNDS.max_bytes + 1)
    if len(data) > CONFIG_BOUNDS.max_bytes:
        raise UsageError(f"config {path} is larger than {CONFIG_BOUNDS.max_bytes >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"config {path} is not UTF-8") from None


def _load_file(path: Path, joblet: bool = False) -> dict[str, Any] | None:
    if joblet:
        from .rnxconfig import read_own

        text = read_own(path, CONFIG_BOUNDS.max_bytes)
    else:
        text = _read_bounded(path)
    if text is None:
        return None
    import yaml  # only when a config file exists: ~12 ms of every `jbl run` otherwise

    try:
        doc = load_bounded(text, CONFIG_BOUNDS)
    except YamlBoundError as e:
        raise UsageError(f"config {path} {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"config {path} is not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(f"config {path} must be a mapping (keys: registries, store, gc)")
    return doc


def load_config(env: Mapping[str, str]) -> Config:
    """Read and combine the config files (see the module docstring); ``env`` is the
    environment the CLI resolved (``Settings.env``)."""
    registries: list[tuple[RegistrySource, bool]] = []
    raw_base = GITHUB_RAW_BASE
    store: Path | None = None
    gc: dict[str, Any] = {}
    download: dict[str, tuple[Any, str]] = {}
    extra: dict[str, Any] = {}
    hold: float | None = REMOVED_HOLD_LIMIT
    gpu_root: str | None = None
    fleet: dict[str, Any] = {"mirrors": [], "proxy": None, "s3_endpoint": None}
    read: list[Path] = []
    for path, joblet in _files(env):
        doc = _load_file(path, joblet)
        if doc is None:
            continue
        read.append(path)
        # the later (higher-priority) file's registries go first
        registries = file_registries(doc, path) + registries
        if joblet:
            continue  # nothing else is read from Joblet's file
        if doc.get("github_raw_base") is not None:
            raw_base = _raw_base(doc["github_raw_base"], f"config {path}: 'github_raw_base'")
        if doc.get("store") is not None:
            if not isinstance(doc["store"], str) or not doc["store"].strip():
                raise UsageError(f"config {path}: 'store' must be a directory path")
            store = Path(os.path.expanduser(doc["store"]))
        if doc.get("gc") is not None:
            if not isinstance(doc["gc"], dict):
                raise UsageError(f"config {path}: 'gc' must be a mapping")
            gc.update(doc["gc"])
        if doc.get("download") is not None:
            if not isinstance(doc["download"], dict):
                raise UsageError(f"config {path}: 'download' must be a mapping")
            download.update({k: (v, str(path)) for k, v in doc["download"].items()})
        if doc.get("gpu_driver_root") is not None:
            gpu_root = doc["gpu_driver_root"]
            if not isinstance(gpu_root, str) or not gpu_root.startswith("/"):
                raise UsageError(f"config {path}: 'gpu_driver_root' must be an absolute path")
        if doc.get("removed_hold_limit") is not None:
            hold = _hold_limit(doc["removed_hold_limit"], path)
        _fleet_keys(doc, path, fleet)
        extra.update({k: v for k, v in doc.items() if k not in _KNOWN})
    if env.get(ENV_GITHUB_RAW_BASE):
        raw_base = _raw_base(env[ENV_GITHUB_RAW_BASE], ENV_GITHUB_RAW_BASE)
    seen: set[str] = set()
    unique = []
    for r, enabled in registries:
        if r.url not in seen:  # the highest-priority mention decides, enabled or not
            seen.add(r.url)
            if enabled:
                unique.append(r)
    return Config(tuple(unique), store, gc, tuple(read), extra, download=download,
                  removed_hold_limit=hold, gpu_driver_root=gpu_root, github_raw_base=raw_base,
                  mirrors=tuple(fleet["mirrors"]), proxy=fleet["proxy"],
                  s3_endpoint=fleet["s3_endpoint"])


def _fleet_keys(doc: Mapping[str, Any], path: Path, fleet: dict[str, Any]) -> None:
    """``mirrors`` (this file's go first), ``proxy`` and ``s3_endpoint`` into ``fleet``."""
    if doc.get("proxy") is not None:
        fleet["proxy"] = _http_url(doc["proxy"], f"config {path}: 'proxy'",
                                   "http://squid.example.org:3128")
    if doc.get("s3_endpoint") is not None:
        fleet["s3_endpoint"] = _http_url(doc["s3_endpoint"], f"config {path}: 's3_endpoint'",
                                         "https://s3.eu-west-1.amazonaws.com")
    value = doc.get("mirrors")
    if value is None:
        return
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_MIRRORS:
        raise UsageError(f"config {path}: 'mirrors' must be a list of at most {MAX_MIRRORS}")
    mine = []
    for i, item in enumerate(value):
        where = f"config {path}: mirrors[{i}]"
        url: Any = None
        registry: Any = ""
        if isinstance(item, str):
            url = item
        elif isinstance(item, dict):
            url, registry = item.get("url"), item.get("registry", "")
        if not isinstance(url, str) or not url.strip() or not isinstance(registry, str):
            raise UsageError(f"{where} must be a URL/directory or a mapping with 'url' (and "
                             "'registry')")
        mine.append(Mirror(_place(url.strip(), path), _place(registry.strip(), path)
                           if registry.strip() else "", str(path)))
    fleet["mirrors"] = mine + fleet["mirrors"]


def _place(text: str, path: Path) -> str:
    """A URL as it is; a path made absolute relative to the config file naming it."""
    if _is_url(text) or len(text) > 2048:
        return text[:2048]
    p = Path(os.path.expanduser(text))
    return str(p if p.is_absolute() else (path.parent / p).resolve())


def _hold_limit(value: Any, path: Path) -> float | None:
    """``removed_hold_limit``: a duration (``90s``, ``6h``; a bare number is seconds) or
    ``never``."""
    from .units import parse_duration

    if isinstance(value, str) and value.strip().lower() == "never":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UsageError(f"config {path}: 'removed_hold_limit' must be a duration or never")
    secs = float(value) if not isinstance(value, str) else \
        parse_duration(value, what=f"removed_hold_limit in {path}")
    if not secs >= 0 or secs == float("inf"):
        raise UsageError(f"config {path}: 'removed_hold_limit' must be 0 or more")
    return secs


def system_admin_group() -> str:
    """``admin_group`` from the system config, else ``jbl-admin``.

    Only the system file is read, whatever JBL_CONFIG says: a user's own config must not be
    able to name the group that the error message (and ``jbl setup``) treats as the admins.
    A missing or malformed file gives the default (its owner, an admin, sees the error from
    every other command).
    """
    try:
        doc = _load_file(SYSTEM_CONFIG)
    except Exception:  # unreadable or malformed: as before issue 12, never fatal here
        return DEFAULT_ADMIN_GROUP
    name = doc.get("admin_group") if doc is not None else None
    return name if isinstance(name, str) and name else DEFAULT_ADMIN_GROUP
