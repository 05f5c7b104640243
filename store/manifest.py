"""The ``runtime.yml`` model (Joblet's format) and its validation.

A runtime directory holds ``runtime.yml`` and ``isolated/`` (the root filesystem)::

    name: python-3.11-ml
    version: 1.3.2
    description: Python 3.11 with numpy and pandas
    mounts:                       # runtime-relative source -> absolute target in the job
      - {source: isolated/usr, target: /usr, readonly: true}
    environment: {PATH: /usr/bin:/bin, PYTHONDONTWRITEBYTECODE: "1"}
    requirements: {architectures: [amd64], gpu: false}   # optional
    language: python            # these and any other keys: kept in ``extra``, shown by info
    packages: [numpy]
    build_info: {built_at: 2025-01-01T00:00:00Z}

Joblet writes runtime.yml in three shapes, all accepted as written: its setup scripts'
heredoc (a mount table of ``isolated/...`` directories, ``/tmp`` read-write), its builder's
generated file (a fixed mount table that may name directories the runtime lacks, plus
``language``/``packages``/``requirements``/``build_info``), and a bare ``manifest.yaml``
copied as runtime.yml (no mounts: the whole ``isolated/`` tree is ``/``).

Rules: ``version`` (and any ``*_version``) keeps its text as written, so an unquoted
``1.10`` is ``"1.10"`` (boundedyaml ``text_keys``). A mount's source may be missing from the
runtime: jobs skip it (as Joblet does; ingest notes it once, ``info`` shows it).
``readonly: false`` means a per-job writable layer over that path (runner/plan.py).
``requirements.architectures`` is checked against the host at install (``arch_mismatch``);
``requirements.gpu`` is kept in ``requires_gpu``.

Validation is strict where the value is used for a mount (a source that leaves the runtime,
a target that is not an absolute clean path are rejected) and lenient elsewhere (unknown
keys are kept in ``extra``). The YAML itself is bounded (``RUNTIME_YML_BOUNDS``: 1 MiB, no
aliases or anchors, 32 levels of nesting) because it comes from an untrusted tarball. Names
and versions are matched in full (``re.fullmatch``: ``$`` would accept a trailing newline).
Pure and thread-safe.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .boundedyaml import Bounds, YamlBoundError
from .boundedyaml import load as load_bounded
from .errors import UnsafeArchive, UsageError

MANIFEST_NAME = "runtime.yml"
ROOTFS_DIR = "isolated"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # always fullmatch
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_MANIFEST_BYTES = 1 << 20  # runtime.yml is a few KiB in practice
# Joblet's runtime.yml files use no aliases; refusing them is simpler than capping expansion.
RUNTIME_YML_BOUNDS = Bounds(max_bytes=MAX_MANIFEST_BYTES, max_depth=32, max_nodes=100_000,
                            allow_aliases=False, text_keys=("version",))
# What ``info`` shows of one free-form value (packages, build_info, ...): runtime.yml may be
# 1 MiB, a listing line should not be. The whole text stays in ``info --json``'s manifest.
MAX_SHOWN_VALUE = 4096
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True)
class Mount:
    source: str  # clean, relative to the runtime directory (e.g. "isolated/usr")
    target: str  # clean, absolute in the job (e.g. "/usr")
    readonly: bool = True


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    description: str = ""
    mounts: tuple[Mount, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # every other key, as loaded
    architectures: tuple[str, ...] = ()  # requirements.architectures, as written
    requires_gpu: bool = False  # requirements.gpu

    def default_mounts(self) -> tuple[Mount, ...]:
        """The mounts a job gets: runtime.yml's, or the whole ``isolated/`` tree as ``/``."""
        return self.mounts or (Mount(ROOTFS_DIR, "/", True),)


def arch_mismatch(m: Manifest, host: str) -> str | None:
    """Why this host cannot run ``m`` (``requirements.architectures`` names others), or None.
    ``host`` is a normalised architecture (``amd64``, ``arm64``); names are compared after
    the same normalisation as registry platforms (``x86_64`` = ``amd64``)."""
    if not m.architectures:
        return None
    from .regformat import normalize_arch  # regformat imports this module: import late

    wanted = {normalize_arch(a) or a.lower() for a in m.architectures}
    if host in wanted:
        return None
    return (f"{m.name}@{m.version} is built for {', '.join(m.architectures)} "
            f"(runtime.yml requirements.architectures) and this host is {host}")


def jsonable(value: Any, budget: int = MAX_SHOWN_VALUE) -> Any:
    """``value`` (a loaded YAML value) as plain JSON data, at most ~``budget`` characters:
    YAML timestamps become ISO text, sets lists, binary its size; anything longer is cut to
    a string that says so (runtime.yml itself, in full, is in ``info --json``)."""
    import datetime as dt
    import json

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return [plain(x) for x in v]
        if isinstance(v, (dt.date, dt.datetime)):
            return v.isoformat()
        if isinstance(v, bytes):
            return f"<{len(v)} bytes of binary>"
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return str(v)
        return v

    out = plain(value)
    text = json.dumps(out, ensure_ascii=False)
    if len(text) > budget:
        return text[:budget] + f"… ({len(text) - budget} more characters)"
    return out


def _flag(v: Any) -> bool:
    """A YAML boolean, also when quoted (``readonly: "false"``)."""
    if isinstance(v, str):
        return v.strip().lower() not in _FALSE_WORDS
    return bool(v)


def _requirements(doc: dict[str, Any], source: str) -> tuple[tuple[str, ...], bool]:
    req = doc.get("requirements")
    if req is None:
        return (), False
    if not isinstance(req, dict):
        raise UnsafeArchive(f"{source}: 'requirements' must be a mapping")
    archs = req.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs):
        raise UnsafeArchive(f"{source}: requirements.architectures must be a list of names")
    return tuple(archs), _flag(req.get("gpu", False))


# (parent handle, name) -> (handle, kind, symlink target or "") or None; kind is "dir",
# "file" or "symlink". Ingest walks its tree with it, info the index's entries.
Lookup = Callable[[Any, str], "tuple[Any, str, str] | None"]
_MAX_HOPS = 40  # symlinks followed while resolving one source (the kernel's limit)


def source_present(lookup: Lookup, root: Any, source: str) -> bool:
    """Whether a mount ``source`` (clean, relative) names something inside the runtime whose
    top is ``root``: relative symlinks are followed within the runtime, an absolute one or
    one that climbs out of it counts as absent (a job never follows it out: it is skipped)."""
    todo = [p for p in source.split("/") if p not in ("", ".")]
    stack: list[tuple[Any, str]] = [(root, "")]  # the directories walked so far
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if len(stack) == 1:
                return False
            stack.pop()
            continue
        found = lookup(stack[-1][0], part)
        if found is None:
            return False
        handle, kind, target = found
        if kind == "symlink":
            hops += 1
            if hops > _MAX_HOPS or not target or target.startswith("/"):
                return False
            todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
            continue
        if kind != "dir" and todo:
            return False
        stack.append((handle, part))
    return True


def check_name(name: str, what: str = "runtime name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid {what} {name!r}: use letters, digits, '.', '_', '+', '-' "
                         "(at most 128, not starting with a punctuation mark)")
    return name


def _clean_source(src: str) -> str:
    if not isinstance(src, str) or not src or src.startswith("/") or "\0" in src:
        raise UnsafeArchive("runtime.yml mount source must be a relative path inside the runtime",
                            str(src))
    norm = posixpath.normpath(src)
    if norm == ".." or norm.startswith("../"):
        raise UnsafeArchive("runtime.yml mount source leaves the runtime", src)
    return norm


def _clean_target(dst: str) -> str:
    if not isinstance(dst, str) or not dst.startswith("/") or "\0" in dst:
        raise UnsafeArchive("runtime.yml mount target must be an absolute path", str(dst))
    parts = dst.split("/")[1:]
    if dst != "/" and any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchive("runtime.yml mount target is not a clean absolute path", dst)
    return dst


def parse_manifest(data: bytes | str, *, source: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate runtime.yml; raise UnsafeArchive with a one-line reason."""
    return manifest_from_doc(load_yaml(data, source=source), source=source)


def load_yaml(data: bytes | str, *, source: str = MANIFEST_NAME) -> Any:
    """runtime.yml's YAML document, unvalidated but bounded (``RUNTIME_YML_BOUNDS``).
    ``yaml`` is imported here, not at the top: it costs ~12 ms, and ``jbl run`` takes parsed
    manifests from a cache (runner/manifests.py)."""
    import yaml

    try:
        return load_bounded(data, RUNTIME_YML_BOUNDS)
    except YamlBoundError as e:
        raise UnsafeArchive(f"{source} {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UnsafeArchive(f"{source} is not valid YAML{where}") from None


def manifest_from_doc(doc: Any, *, source: str = MANIFEST_NAME) -> Manifest:
    """Validate a loaded runtime.yml document (see ``parse_manifest``)."""
    if not isinstance(doc, dict):
        raise UnsafeArchive(f"{source} must be a mapping with name and version")
    name, version = doc.get("name"), doc.get("version")
    if name is None or version is None:
        raise UnsafeArchive(f"{source} lacks 'name' or 'version'")
    name, version = str(name), str(version)
    try:
        check_name(name)
        check_name(version, "version")
    except UsageError as e:
        raise UnsafeArchive(f"{source}: {e.message}") from None
    mounts = []
    for i, m in enumerate(doc.get("mounts") or []):
        if not isinstance(m, dict) or "source" not in m or "target" not in m:
            raise UnsafeArchive(f"{source}: mounts[{i}] needs 'source' and 'target'")
        mounts.append(Mount(_clean_source(m["source"]), _clean_target(m["target"]),
                            _flag(m.get("readonly", True))))
    env_doc = doc.get("environment") or {}
    if not isinstance(env_doc, dict):
        raise UnsafeArchive(f"{source}: 'environment' must be a mapping")
    env = {}
    for k, v in env_doc.items():
        if not isinstance(k, str) or not ENV_KEY_RE.fullmatch(k):
            raise UnsafeArchive(f"{source}: invalid environment variable name", str(k))
        env[k] = "" if v is None else str(v)
    known = {"name", "version", "description", "mounts", "environment"}
    extra = {k: v for k, v in doc.items() if k not in known}
    archs, gpu = _requirements(doc, source)
    return Manifest(name, version, str(doc.get("description") or ""), tuple(mounts), env, extra,
                    archs, gpu)
