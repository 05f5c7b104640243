"""The system-wide install (``make install``): jbl for every user of the machine.

Owns the install's layout, its stamp and its refresh rule:

* ``PREFIX`` (default ``/opt/jbl``) is a venv on the *system* Python (``/usr/bin/python3``,
  which every user may execute — unlike a pyenv under a 0700 ``/root``), with jbl installed
  from this clone, not editable, and ``BINDIR/jbl`` (``/usr/local/bin/jbl``) a symlink to
  ``PREFIX/bin/jbl``.
* ``PREFIX/.jbl-install.json`` records what the install was built from: the interpreter,
  a digest of ``pyproject.toml`` (the dependencies) and a digest of the package sources.
  A run whose digests match changes nothing (the fast path: hashing ~100 small files).
* When only the sources changed, the pure-Python package is rebuilt in a staging
  directory beside ``site-packages/jbl`` and swapped in with two renames, so a ``jbl``
  starting meanwhile (another test session, a user) never finds the package half
  removed, as it could during ``pip install --force-reinstall``. The dependencies
  (pyfuse3 built from source, apsw, …) are reinstalled only when ``pyproject.toml`` changed.
* Nothing under ``PREFIX`` is writable by group or others, everything is owned by root and
  readable (directories and executables also executable) by everyone; checked after every
  change, and a path that breaks the rule fails the install.

Concurrent runs are serialised by ``flock`` on ``PREFIX.lock`` (mode 0600: no other user
can open it, so none can hold the install up). ``--check`` only compares, without the lock
or root, and exits 1 when the install is missing or stale (the tests' fast path).
Runs with the system Python before the venv exists, so it uses the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

try:
    import tomllib
except ImportError:  # before 3.11: say so in one line rather than a traceback
    sys.exit(f"install: error: {sys.executable} is Python {sys.version.split()[0]}; jbl needs "
             "3.11 or newer (Debian 12's python3): set PYTHON=/path/to/python3.11")
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMP = ".jbl-install.json"
SKIP = ("__pycache__",)


class InstallError(Exception):
    """A one-line reason the install cannot be made or is not as it must be."""


# --- what the install is built from ---------------------------------------------------------
def package_dirs(repo: Path) -> list[str]:
    """The clone's package directories, as pyproject.toml maps them (one place for that)."""
    doc = tomllib.loads((repo / "pyproject.toml").read_text())
    return sorted(set(doc["tool"]["setuptools"]["package-dir"].values()))


def copy_sources(repo: Path, dest: Path) -> None:
    """What ``pip install`` needs from the clone, without caches or build leftovers.

    Building from a copy keeps ``build/`` and ``*.egg-info`` out of the work tree, and a
    module deleted from the clone cannot survive in a stale ``build/lib``."""
    doc = tomllib.loads((repo / "pyproject.toml").read_text())
    for name in ["pyproject.toml", doc["project"].get("readme", "README.md")]:
        shutil.copy2(repo / name, dest / name)
    for d in package_dirs(repo):
        shutil.copytree(repo / d, dest / d, ignore=shutil.ignore_patterns(*SKIP, "*.pyc"))


def source_digest(tree: Path) -> str:
    """sha256 over pyproject.toml and every file (path and bytes) of the package dirs."""
    h = hashlib.sha256()
    files = [tree / "pyproject.toml"]
    for d in package_dirs(tree):
        for root, dirs, names in os.walk(tree / d):
            dirs[:] = sorted(x for x in dirs if x not in SKIP)
            files += [Path(root) / n for n in sorted(names) if not n.endswith(".pyc")]
    for f in files:
        h.update(str(f.relative_to(tree)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def deps_digest(tree: Path) -> str:
    return hashlib.sha256((tree / "pyproject.toml").read_bytes()).hexdigest()


def wanted(tree: Path, python: str) -> dict[str, str]:
    return {"python": os.path.realpath(python), "deps": deps_digest(tree),
            "sources": source_digest(tree)}


def read_stamp(prefix: Path) -> dict[str, str]:
    try:
        doc = json.loads((prefix / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_stamp(prefix: Path, doc: dict[str, str] | None) -> None:
    """Replace the stamp atomically (None: remove it)."""
    if doc is None:
        (prefix / STAMP).unlink(missing_ok=True)
        return
    tmp = prefix / f"{STAMP}.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.chmod(tmp, 0o644)
    tmp.rename(prefix / STAMP)


def stale(prefix: Path, bindir: Path, want: dict[str, str]) -> str | None:
    """Why the install at ``prefix`` is not the one ``want`` describes, or None."""
    have = read_stamp(prefix)
    if not have:
        return f"no jbl install in {prefix}"
    if have.get("python") != want["python"] or \
            os.path.realpath(prefix / "bin/python") != want["python"]:
        return f"{prefix} was built on another interpreter than {want['python']}"
    if have.get("deps") != want["deps"]:
        return "pyproject.toml changed"
    if have.get("sources") != want["sources"]:
        return "the sources changed"
    if not os.access(prefix / "bin/jbl", os.X_OK):
        return f"{prefix}/bin/jbl is missing"
    if not (bindir / "jbl").is_symlink() or \
            os.readlink(bindir / "jbl") != str(prefix / "bin/jbl"):
        return f"{bindir}/jbl does not link to {prefix}/bin/jbl"
    return None


# --- making it ------------------------------------------------------------------------------
def _run(*argv: str | Path) -> None:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        raise InstallError(f"{' '.join(map(str, argv[:4]))} … failed "
                           f"(exit {p.returncode}):\n" + "\n".join(tail))


def site_packages(prefix: Path) -> Path:
    found = sorted(prefix.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise InstallError(f"{prefix} has no single lib/python3*/site-packages")
    return found[0]


def make_venv(prefix: Path, python: str) -> None:
    _run(python, "-m", "venv", "--clear", prefix)
    # setuptools new enough for pyproject.toml (77: an SPDX `license` string), so refreshes
    # can build without isolation
    _run(prefix / "bin/python", "-m", "pip", "install", "-q", "--upgrade", "pip",
         "setuptools>=77", "wheel")


def full_install(prefix: Path, src: Path) -> None:
    """jbl and its dependencies (pyfuse3 compiled here against libfuse3-dev)."""
    _run(prefix / "bin/python", "-m", "pip", "install", "-q", src)


def refresh_package(prefix: Path, src: Path) -> None:
    """Replace only jbl's own files, by two renames (see the module docstring)."""
    site = site_packages(prefix)
    staging = Path(tempfile.mkdtemp(prefix=".jbl-staging-", dir=site))
    try:
        new = staging / "new"
        _run(prefix / "bin/python", "-m", "pip", "install", "-q", "--no-deps",
             "--no-build-isolation", "--no-compile", "--target", new, src)
        # compiled as root now (users could not write __pycache__), recording final paths;
        # a module that does not compile fails at import with its SyntaxError, as after pip
        subprocess.run([str(prefix / "bin/python"), "-m", "compileall", "-q", "-s", str(new),
                        "-p", str(site), str(new / "jbl")], capture_output=True)
        old = staging / "old"
        old.mkdir()
        names = ["jbl"] + [p.name for p in new.glob("jbl-*.dist-info")]
        for p in site.glob("jbl-*.dist-info"):
            p.rename(old / p.name)  # the version may differ: drop every old record
        for name in names:
            if (site / name).exists():
                (site / name).rename(old / name)
            (new / name).rename(site / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_bin(bindir: Path) -> None:
    """Refuse, before changing anything, to replace a ``BINDIR/jbl`` that is not a link."""
    link = bindir / "jbl"
    if not link.is_symlink() and link.exists():
        raise InstallError(f"{link} exists and is not a symlink (another jbl install?): "
                           "remove it or set BINDIR")


def link_bin(prefix: Path, bindir: Path) -> None:
    link, target = bindir / "jbl", str(prefix / "bin/jbl")
    check_bin(bindir)
    if link.is_symlink() and os.readlink(link) == target:
        return
    bindir.mkdir(parents=True, exist_ok=True)
    tmp = bindir / ".jbl.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.rename(link)


# --- the permission rule --------------------------------------------------------------------
def _walk(prefix: Path) -> Iterator[tuple[Path, os.stat_result]]:
    yield prefix, prefix.lstat()
    for root, dirs, files in os.walk(prefix):
        for n in dirs + files:
            p = Path(root) / n
            yield p, p.lstat()


def normalise_modes(prefix: Path) -> None:
    """root-owned; no group/other write; readable by all, executable where the owner may."""
    for p, st in _walk(prefix):
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode) & ~0o022 | 0o444
        if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR:
            mode |= 0o111
        if (st.st_uid, st.st_gid) != (0, 0):
            os.lchown(p, 0, 0)
        if mode != stat.S_IMODE(st.st_mode):
            os.chmod(p, mode)


def mode_problems(prefix: Path) -> list[str]:
    """Paths under ``prefix`` that break the rule (``find PREFIX -perm /022 -o ! -user root``)."""
    bad = []
    for p, st in _walk(prefix):
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o022 or st.st_uid != 0 or not st.st_mode & stat.S_IROTH:
            bad.append(f"{p} ({stat.filemode(st.st_mode)} uid {st.st_uid})")
    return bad


def unreachable(path: Path) -> Path | None:
    """The first directory above ``path`` other users cannot enter."""
    for p in reversed(path.parents):
        try:
            if not p.stat().st_mode & stat.S_IXOTH:
                return p
        except FileNotFoundError:
            return None
    return None


# --- the command ----------------------------------------------------------------------------
@contextlib.contextmanager
def locked(prefix: Path) -> Iterator[None]:
    fd = os.open(f"{prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def install(prefix: Path, bindir: Path, python: str) -> str:
    """Bring the install up to date; return the line saying what was done."""
    t0 = time.monotonic()
    if (bad := unreachable(prefix)) is not None:
        raise InstallError(f"other users cannot enter {bad}: choose a PREFIX they can reach")
    check_bin(bindir)
    if prefix.is_dir() and any(prefix.iterdir()) and not (prefix / "pyvenv.cfg").exists():
        raise InstallError(f"{prefix} exists and is not a venv: remove it or choose another "
                           "PREFIX")
    os.umask(0o022)  # normalise_modes() closes what a careless umask opened anyway
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with locked(prefix), tempfile.TemporaryDirectory(prefix="jbl-src-") as tmp:
        src = Path(tmp)
        copy_sources(REPO, src)  # the digest is of this copy: exactly what gets installed
        want = wanted(src, python)
        why = stale(prefix, bindir, want)
        if why is None:
            return f"jbl in {prefix} is up to date"
        have = read_stamp(prefix)
        # until the end, the stamp promises only what stays true if a step below fails
        keep = {k: have[k] for k in ("python", "deps") if have.get(k) == want[k]}
        write_stamp(prefix, keep if "python" in keep else None)
        if have.get("python") != want["python"] or not (prefix / "bin/python").exists():
            make_venv(prefix, python)
            have = {}
        if have.get("deps") != want["deps"]:
            full_install(prefix, src)
            done = "installed"
        elif have.get("sources") != want["sources"]:
            refresh_package(prefix, src)
            done = "refreshed"
        else:
            done = "repaired"
        normalise_modes(prefix)
        if bad_modes := mode_problems(prefix):
            raise InstallError(f"{len(bad_modes)} paths break the permission rule, e.g. "
                               f"{bad_modes[0]}")
        link_bin(prefix, bindir)
        write_stamp(prefix, want)
    return (f"jbl {done} in {prefix} ({why}), {bindir}/jbl links to it "
            f"({time.monotonic() - t0:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="/opt/jbl", type=Path)
    ap.add_argument("--bindir", default="/usr/local/bin", type=Path)
    ap.add_argument("--python", default="/usr/bin/python3")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 (saying why) if the install is missing or stale; change nothing")
    a = ap.parse_args(argv)
    prefix, bindir = a.prefix.absolute(), a.bindir.absolute()
    try:
        if a.check:  # the clone hashes as its copy would: caches are skipped in both
            why = stale(prefix, bindir, wanted(REPO, a.python))
            print(why or f"jbl in {prefix} is up to date")
            return 1 if why else 0
        if os.geteuid() != 0:
            raise InstallError(f"make install needs root (it writes {prefix} and {bindir})")
        if not os.access(a.python, os.X_OK):
            raise InstallError(f"no {a.python}: install python3 (apt-get install python3-venv) "
                               "or set PYTHON")
        print(install(prefix, bindir, a.python))
    except InstallError as e:
        print(f"install: error: {e}", file=sys.stderr)
        return 8 if "needs root" in str(e) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
