"""jbl's YAML configuration: where it is, how files combine, and what each key means.

Files, lowest priority first (later ones override earlier ones)::

    /etc/jbl/config.yaml                         the admin's (system-wide)
    $XDG_CONFIG_HOME/jbl/config.yaml             the user's (default ~/.config/jbl/config.yaml)

``JBL_CONFIG=FILE`` replaces both with exactly that one file (``JBL_CONFIG=`` empty: none).

Keys::

    registries:                  # tried in order; the first that offers a NAME serves it
      - https://example.org/runtimes/registry.json
      - {name: lab, url: /srv/runtimes}          # a dir holding registry.json, or a file
    store: /var/lib/jbl          # default for --store (after --store and JBL_STORE)
    gc: {...}                    # retention policy; read by store/gc, passed through as a dict

How files combine: ``registries`` lists are concatenated, the user's first (so a user can put
a registry in front of the admin's; duplicates dropped); ``store`` is overridden; ``gc`` is a
shallow merge (a user's key replaces the admin's). A relative path in ``registries`` is taken
relative to the file that names it. Unknown keys are kept in ``extra`` and ignored.

A missing file is not an error; a malformed one is (UsageError naming the file and the key).
Pure apart from reading the files; thread-safe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

SYSTEM_CONFIG = Path("/etc/jbl/config.yaml")
ENV_CONFIG = "JBL_CONFIG"
_KNOWN = {"registries", "store", "gc"}


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
class Config:
    registries: tuple[RegistrySource, ...] = ()
    store: Path | None = None
    gc: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # the files actually read, in priority order (lowest first)
    extra: dict[str, Any] = field(default_factory=dict)


def config_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The files consulted, lowest priority first (whether or not they exist)."""
    env = os.environ if env is None else env
    if ENV_CONFIG in env:
        return [Path(env[ENV_CONFIG])] if env[ENV_CONFIG] else []
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [SYSTEM_CONFIG, Path(xdg) / "jbl" / "config.yaml"]


def _is_url(text: str) -> bool:
    return "://" in text


def _registry_item(item: Any, i: int, path: Path) -> RegistrySource:
    where = f"{path}: registries[{i}]"
    if isinstance(item, str):
        url, name = item, ""
    elif isinstance(item, dict) and isinstance(item.get("url"), str):
        url, name = item["url"], str(item.get("name") or "")
    else:
        raise UsageError(f"{where} must be a URL/path or a mapping with 'url'")
    url = url.strip()
    if not url:
        raise UsageError(f"{where} is empty")
    if not _is_url(url):
        p = Path(os.path.expanduser(url))
        url = str(p if p.is_absolute() else (path.parent / p).resolve())
    return RegistrySource(url, name, str(path))


def _load_file(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
    import yaml  # only when a config file exists: ~12 ms of every `jbl run` otherwise

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"config {path} is not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(f"config {path} must be a mapping (keys: registries, store, gc)")
    return doc


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Read and combine the config files (see the module docstring)."""
    registries: list[RegistrySource] = []
    store: Path | None = None
    gc: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    read: list[Path] = []
    for path in config_paths(env):
        doc = _load_file(path)
        if doc is None:
            continue
        read.append(path)
        regs = doc.get("registries")
        if regs is not None:
            if isinstance(regs, str):
                regs = [regs]
            if not isinstance(regs, list):
                raise UsageError(f"config {path}: 'registries' must be a list")
            # the later (higher-priority) file's registries go first
            registries = [_registry_item(x, i, path) for i, x in enumerate(regs)] + registries
        if doc.get("store") is not None:
            if not isinstance(doc["store"], str) or not doc["store"].strip():
                raise UsageError(f"config {path}: 'store' must be a directory path")
            store = Path(os.path.expanduser(doc["store"]))
        if doc.get("gc") is not None:
            if not isinstance(doc["gc"], dict):
                raise UsageError(f"config {path}: 'gc' must be a mapping")
            gc.update(doc["gc"])
        extra.update({k: v for k, v in doc.items() if k not in _KNOWN})
    seen: set[str] = set()
    unique = []
    for r in registries:
        if r.url not in seen:
            seen.add(r.url)
            unique.append(r)
    return Config(tuple(unique), store, gc, tuple(read), extra)
