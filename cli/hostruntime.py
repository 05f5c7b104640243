"""A small *real* runtime built from this host's own binaries and interpreter: what
``make demo`` installs and runs, and what the tests and benchmarks use (tests/rtbuild.py
re-exports it), so the installed package never loads anything from ``tests/``.

``build_runtime(dest, name, version)`` writes a Joblet-format runtime directory::

    dest/runtime.yml
    dest/isolated/usr/bin/{python3, sh, cat, ls, ...}   host binaries, copied
    dest/isolated/usr/lib/python3.11/...                host stdlib, pruned of tests/idle/tk
    dest/isolated/usr/lib/x86_64-linux-gnu/*.so*        the shared libraries they need (ldd)
    dest/isolated/{bin,lib,lib64,sbin} -> usr/...       usrmerge symlinks, as on Debian 12
    dest/isolated/usr/lib/python3/dist-packages/jblprobe/__init__.py   VERSION = <version>

The probe package exists only inside the runtime, so ``import jblprobe`` proves a job runs the
runtime's interpreter and libraries, and two versions answer differently. The base tree is
built once per process and copied (``cp -a``) for each runtime, so mtimes stay the host's.
Debian 12 (python3.11 at /usr/bin) is assumed, as by ``make demo``. Not thread-safe (one
process-wide base tree).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HOST_PYTHON = "/usr/bin/python3.11"
HOST_STDLIB = "/usr/lib/python3.11"
TOOLS = ["sh", "dash", "cat", "ls", "echo", "true", "false", "sleep", "id", "env", "mkdir",
         "touch", "rm", "stat", "head", "tail", "wc", "sha256sum", "hostname", "readlink", "dd",
         "kill", "ps", "uname", "grep", "cp", "ln", "chmod", "whoami", "nproc", "timeout"]
PRUNE = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
         "__pycache__", "unittest", "distutils", "config-3.11-x86_64-linux-gnu"}
_BASE: Path | None = None


def _ldd(paths: list[str]) -> set[str]:
    libs: set[str] = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True).stdout
        for m in re.finditer(r"(/\S+\.so[^\s]*)", out):
            libs.add(m.group(1))
    return libs


def _copy_file(src: str, root: Path) -> None:
    """Copy host file ``src`` to the same path under ``root``, resolving usrmerge links."""
    real = os.path.realpath(src)
    rel = real.lstrip("/")
    if rel.startswith(("lib/", "bin/", "sbin/", "lib64/")):
        rel = "usr/" + rel
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        shutil.copy2(real, dst)
    # keep the name it was asked for too (e.g. libfoo.so.1 -> libfoo.so.1.2.3)
    asked = src.lstrip("/")
    if asked.startswith(("lib/", "bin/", "sbin/", "lib64/")):
        asked = "usr/" + asked
    alias = root / asked
    if alias != dst and not alias.exists() and not alias.is_symlink():
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.symlink_to(os.path.relpath(dst, alias.parent))


def _build_base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="jbl-rtbase-")) / "isolated"
    usr = base / "usr"
    (usr / "bin").mkdir(parents=True)
    bins = [HOST_PYTHON]
    for t in TOOLS:
        p = shutil.which(t, path="/usr/bin:/bin")
        if p:
            bins.append(p)
    for b in bins:
        _copy_file(b, base)
    os.symlink("python3.11", usr / "bin" / "python3")
    os.symlink("python3", usr / "bin" / "python")
    # stdlib, pruned
    def ignore(_d: str, names: list[str]) -> set[str]:
        return {n for n in names if n in PRUNE}
    shutil.copytree(HOST_STDLIB, usr / "lib" / "python3.11", ignore=ignore, symlinks=True)
    dynload = [str(p) for p in (usr / "lib/python3.11/lib-dynload").glob("*.so")]
    for lib in _ldd(bins + dynload):
        _copy_file(lib, base)
    # usrmerge top-level links, as on Debian 12
    for d in ("bin", "lib", "sbin"):
        (usr / d).mkdir(exist_ok=True)
        os.symlink(f"usr/{d}", base / d)
    (usr / "lib64").mkdir(exist_ok=True)
    ld = usr / "lib64" / "ld-linux-x86-64.so.2"
    if not ld.exists():
        ld.symlink_to("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    os.symlink("usr/lib64", base / "lib64")
    for d in ("etc", "tmp", "work", "proc", "dev"):
        (base / d).mkdir(exist_ok=True)
    (base / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (base / "etc" / "group").write_text("root:x:0:\n")
    return base


def build_runtime(dest: Path, name: str = "pyrt", version: str = "1.0.0", *,
                  probe: str | None = None, extra: dict[str, bytes] | None = None,
                  description: str = "test runtime built from the host") -> Path:
    """Write a runtime directory at ``dest`` and return it. ``extra`` adds files under isolated/."""
    global _BASE
    if _BASE is None or not _BASE.exists():
        _BASE = _build_base()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(_BASE), str(dest / "isolated")], check=True)
    pkg = dest / "isolated/usr/lib/python3/dist-packages/jblprobe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"VERSION = {probe or version!r}\n")
    for rel, data in (extra or {}).items():
        p = dest / "isolated" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (dest / "runtime.yml").write_text(
        f"name: {name}\nversion: {version}\ndescription: {description}\n"
        "mounts:\n  - source: isolated\n    target: /\n    readonly: true\n"
        "environment:\n  PATH: /usr/bin:/bin\n  PYTHONDONTWRITEBYTECODE: '1'\n"
        "  LANG: C.UTF-8\n")
    return dest
