"""``registry.json`` (Joblet's format): the one model of it, for reading and for writing.

Owns what a registry document may hold and how it is checked (``parse_registry``: every
field, bound and message), the architecture table (platform strings such as ``ubuntu-amd64``
-> an architecture, and back to the platform name jbl publishes for this host), and how a
publisher's entry and document are written (``entry_doc``, ``dump_registry``). Reading
(store/registry.py) and writing (store/pack.py, ``jbl registry add``) both go through this
module, and ``dump_registry`` runs the reader's checks on what it is about to write, so jbl
never publishes a registry it would refuse to read.

Pure: no network, no files; thread-safe.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from .errors import RegistryError, UsageError
from .manifest import check_name

MAX_INDEX_BYTES = 32 << 20
MAX_JSON_DEPTH = 32  # registry.json needs 5 levels; more is an attack or a mistake
MAX_URL_LEN = 8192
MAX_DESCRIPTION_LEN = 64 << 10
_CHECKSUM_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")  # always fullmatch
_TREE_URL_RE = re.compile(r"trees/([0-9a-f]{64})")  # always fullmatch: beside registry.json
MAX_TREE_SIZE = 256 << 20  # a tree's compressed bytes (store/casformat.py MAX_TREE_STORED)
INDEX_NAME = "registry.json"

# CPU architecture names as they appear in platform strings ("ubuntu-amd64", "linux/arm64",
# "x86_64"); a runtime brings its own userland, so only the architecture matters.
_ARCH_ALIASES = {
    "amd64": "amd64", "x86_64": "amd64", "x86-64": "amd64", "x64": "amd64",
    "arm64": "arm64", "aarch64": "arm64",
    "armhf": "arm", "armv7": "arm", "armv7l": "arm", "armel": "arm",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}
_ARCH_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, _ARCH_ALIASES),
                                                          key=len, reverse=True))
                      + r")(?![a-z0-9])")


# --- architectures -------------------------------------------------------------------------
def normalize_arch(text: str) -> str | None:
    """The architecture a platform string names (``ubuntu-amd64`` -> ``amd64``), or None."""
    m = _ARCH_RE.search(text.lower())
    return _ARCH_ALIASES[m.group(1)] if m else None


def host_arch() -> str:
    machine = platform.machine()
    return normalize_arch(machine) or machine.lower()


# --- the model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeRef:
    """A version's content-addressed form (store/casformat.py): its tree, beside
    registry.json like the objects and packs it names."""
    url: str      # absolute
    sha256: bytes
    size: int


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: str
    description: str
    download_url: str  # absolute (resolved against the registry's URL)
    checksum: str  # "sha256:<64 lowercase hex>"
    size: int | None
    platforms: tuple[str, ...]
    registry: str  # the registry.json URL it came from
    tree: TreeRef | None = None  # jbl's extra key; Joblet's readers ignore it

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def architectures(self) -> frozenset[str]:
        """Architectures offered; empty = no architecture named (runs anywhere)."""
        return frozenset(a for p in self.platforms if (a := normalize_arch(p)))

    def runs_on(self, arch: str) -> bool:
        archs = self.architectures
        return not archs or arch in archs


@dataclass(frozen=True)
class Registry:
    url: str
    label: str
    updated_at: str
    runtimes: dict[str, dict[str, RegistryEntry]] = field(default_factory=dict)



def _fail(url: str, where: str, what: str) -> RegistryError:
    return RegistryError(f"registry {url}: {where}: {what}")


def registry_dir(registry_url: str) -> str:
    """The directory of a ``file://`` registry.json: the only place its tarballs may be."""
    return os.path.dirname(unquote(urlsplit(registry_url).path))


def _confined(url: str, where: str, dl: str, dl_url: str) -> None:
    """A ``file://`` registry's download_url must name a file inside the registry's
    directory: no ``..``, no absolute path or ``file://`` URL elsewhere (``/dev/zero``
    would spin, a FIFO hang, and a checksum error would print a digest of any host file).
    Symlinks are checked when the file is opened (``_open_confined``)."""
    base = registry_dir(url)
    path = unquote(urlsplit(dl_url).path)
    if ".." in unquote(dl).split("/") or os.path.normpath(path) != path or \
            not path.startswith(base.rstrip("/") + "/"):
        raise _fail(url, where, f"download_url {dl!r} leaves the registry's directory {base}")


def _entry(url: str, name: str, ver: str, doc: Any, allow_file: bool) -> RegistryEntry:
    where = f"runtimes.{name}.{ver}"
    if not isinstance(doc, dict):
        raise _fail(url, where, "must be an object")
    if "version" in doc and str(doc["version"])[:200] != ver:
        raise _fail(url, where, f"'version' says {str(doc['version'])[:200]!r}")
    checksum = doc.get("checksum")
    m = _CHECKSUM_RE.fullmatch(checksum) if isinstance(checksum, str) else None
    if m is None:
        got = "missing" if checksum is None else f"got {str(checksum)[:80]!r}"
        raise _fail(url, where, f"checksum must be 'sha256:' and 64 hex digits ({got})")
    dl = doc.get("download_url")
    if not isinstance(dl, str) or not dl.strip():
        raise _fail(url, where, "download_url is missing")
    if len(dl) > MAX_URL_LEN or any(ord(c) < 0x20 or ord(c) == 0x7f for c in dl):
        raise _fail(url, where, f"download_url is longer than {MAX_URL_LEN} characters or "
                                "holds control characters")
    dl_url = urljoin(url, dl.strip())
    scheme = urlsplit(dl_url).scheme.lower()
    if scheme not in ("http", "https", "file") or (scheme == "file" and not allow_file):
        # a remote registry must not make us read local files (even checksum-guarded)
        raise _fail(url, where, f"download_url {dl[:200]!r} has an unsupported scheme")
    if scheme == "file":
        _confined(url, where, dl.strip(), dl_url)
    description = doc.get("description")
    if description is not None and (not isinstance(description, str)
                                    or len(description) > MAX_DESCRIPTION_LEN):
        raise _fail(url, where, f"description must be a string of at most "
                                f"{MAX_DESCRIPTION_LEN} characters")
    size = doc.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _fail(url, where, f"size must be a non-negative integer (got {size!r})")
    plats = doc.get("platforms") or []
    if not isinstance(plats, list) or not all(isinstance(p, str) and len(p) <= 128
                                              for p in plats) or len(plats) > 64:
        raise _fail(url, where, "platforms must be a list of at most 64 strings of at most "
                                "128 characters")
    return RegistryEntry(name, ver, str(doc.get("description") or ""), dl_url,
                         "sha256:" + m.group(1).lower(), size, tuple(plats), url,
                         _tree(url, where, doc.get("tree")))


def _tree(url: str, where: str, ref: Any) -> TreeRef | None:
    """The optional ``tree`` key: ``{"url": "trees/<hex>", "sha256": "<hex>", "size": N}``,
    the tree beside registry.json and named by its digest."""
    if ref is None:
        return None
    m = _TREE_URL_RE.fullmatch(ref.get("url", "")) if isinstance(ref, dict) and \
        isinstance(ref.get("url"), str) else None
    size = ref.get("size") if isinstance(ref, dict) else None
    if m is None or ref.get("sha256") != m.group(1) or isinstance(size, bool) or \
            not isinstance(size, int) or not 0 < size <= MAX_TREE_SIZE:
        raise _fail(url, where, "tree must be {\"url\": \"trees/<64 hex>\", \"sha256\": "
                                f"the same hex, \"size\": 1..{MAX_TREE_SIZE}}}")
    return TreeRef(urljoin(url, m.group(0)), bytes.fromhex(m.group(1)), size)


def parse_registry(data: bytes, url: str, label: str = "") -> Registry:
    """Validate a Joblet-format registry.json strictly; RegistryError names what is wrong."""
    if len(data) > MAX_INDEX_BYTES:
        raise RegistryError(f"registry {url} is larger than {MAX_INDEX_BYTES >> 20} MiB")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise RegistryError(f"registry {url} is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"registry {url} is not valid JSON (line {e.lineno} column "
                            f"{e.colno}: {e.msg})") from None
    except RecursionError:  # json's C decoder stops at the interpreter's recursion limit
        raise RegistryError(f"registry {url} is nested deeper than {MAX_JSON_DEPTH} "
                            "levels") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RegistryError(f"registry {url} is not valid JSON ({str(e)[:200]})") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise RegistryError(f"registry {url} is nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(doc, dict):
        raise RegistryError(f"registry {url}: top level must be an object")
    fmt = doc.get("version", "1")
    if str(fmt) != "1":
        raise RegistryError(f"registry {url}: unsupported format version {fmt!r} (jbl reads 1)")
    runtimes = doc.get("runtimes")
    if not isinstance(runtimes, dict):
        raise RegistryError(f"registry {url}: no 'runtimes' object")
    allow_file = urlsplit(url).scheme == "file"
    out: dict[str, dict[str, RegistryEntry]] = {}
    for name, vers in runtimes.items():
        try:
            check_name(name)
        except UsageError as e:
            raise _fail(url, "runtimes", e.message) from None
        if not isinstance(vers, dict):
            raise _fail(url, f"runtimes.{name}", "must be an object of versions")
        out[name] = {}
        for ver, entry in vers.items():
            try:
                check_name(ver, "version")
            except UsageError as e:
                raise _fail(url, f"runtimes.{name}", e.message) from None
            out[name][ver] = _entry(url, name, ver, entry, allow_file)
    return Registry(url, label or url, str(doc.get("updated_at") or ""), out)


def _depth(doc: Any) -> int:
    """Nesting depth of a parsed JSON document, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((x, d + 1) for x in node)
    return deepest


# --- writing -------------------------------------------------------------------------------
# The platform name published for an architecture when it is not the architecture's own name
# (Joblet's spelling); every value maps back through ``normalize_arch``.
_PLATFORM_ARCH = {"arm": "armhf", "386": "i386"}


def host_platforms() -> list[str]:
    """Joblet platform names for this host: ``ubuntu-amd64`` on x86-64, and so on."""
    arch = host_arch()
    return [f"ubuntu-{_PLATFORM_ARCH.get(arch, arch)}"]


def entry_doc(version: str, description: str, download_url: str, checksum: str, size: int,
              platforms: list[str], tree: dict[str, Any] | None = None) -> dict[str, Any]:
    """One version's object under ``runtimes.NAME``, with the fields ``_entry`` reads
    (``tree``: the content-addressed form's key, from store/caspublish.py)."""
    doc = {"version": version, "description": description, "download_url": download_url,
           "checksum": checksum, "size": size, "platforms": list(platforms)}
    if tree is not None:
        doc["tree"] = tree
    return doc


def dump_registry(doc: dict[str, Any], url: str) -> bytes:
    """The bytes of ``doc`` as registry.json at ``url``, after the reader's own checks
    (RegistryError naming what is wrong, exactly as an installer would see it)."""
    data = (json.dumps(doc, indent=2) + "\n").encode()
    parse_registry(data, url)
    return data
