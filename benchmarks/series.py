"""The realistic runtime series: real interpreter + real wheels as runtime dirs, tarballs, registry.

Owns everything under the benchmark cache (``/var/tmp/jbl-bench``, env ``JBL_BENCH_CACHE``)::

    wheels/                               the pinned wheels (cp311 manylinux x86_64), pip download
                                          in batches, each dist once (download_batches)
    pkgs/<dist>-<ver>/                    each wheel installed once (pip --target, .pyc compiled)
    base/isolated/                        host python3.11 + stdlib (+ __pycache__) + tools + libs
    src/python-3.11-ml-<ver>/             runtime dir: runtime.yml + isolated/ (base + packages)
    registry/python-3.11-ml-<ver>.tar.gz  deterministic tarball of it (jbl pack when it works)
    registry/registry.json                Joblet-format registry, download_url relative
    extracted/<ver>/                      `tar -xzf` of the tarball: the native baseline tree
    series.json                           what was built: versions, packages, sizes, file counts

Each package version is installed once and copied with ``cp -a`` into every runtime that uses
it, so a package a release did not bump is byte-identical (mtimes and .pyc included) between
consecutive versions, as in a layered build; a bumped package differs in most files. Everything
is reused when present; ``python -m benchmarks.series [--quick] [--rebuild]`` builds it alone.
Not thread-safe; one builder at a time per cache dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

NAME = "python-3.11-ml"
DEFAULT_CACHE = Path(os.environ.get("JBL_BENCH_CACHE", "/var/tmp/jbl-bench"))
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"   # env=ENV has no sbin on PATH
HOST_PYTHON = "/usr/bin/python3.11"
HOST_STDLIB = "/usr/lib/python3.11"
TOOLS = ["sh", "dash", "bash", "cat", "ls", "echo", "true", "false", "env", "id", "mkdir", "rm",
         "stat", "head", "tail", "wc", "sha256sum", "grep", "cp", "ln", "uname", "find", "sleep"]
# Kept: __pycache__ (a real runtime ships compiled stdlib; a read-only root cannot write them).
PRUNE = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
         "distutils", "config-3.11-x86_64-linux-gnu"}

_D = {"python-dateutil": "2.8.2", "pytz": "2023.3.post1", "tzdata": "2023.3", "six": "1.16.0",
      "joblib": "1.3.2", "threadpoolctl": "3.2.0"}
_D2 = {**_D, "python-dateutil": "2.9.0.post0", "pytz": "2024.1", "tzdata": "2024.1"}
_D3 = {**_D2, "joblib": "1.4.2", "threadpoolctl": "3.5.0"}
_D4 = {**_D3, "pytz": "2024.2", "tzdata": "2024.2"}


def _v(np: str, pd: str, sp: str, sk: str, deps: dict[str, str]) -> dict[str, str]:
    return {"numpy": np, "pandas": pd, "scipy": sp, "scikit-learn": sk, **deps}


# One or two packages bumped per release, like a lab's ML image over a year.
SERIES: dict[str, dict[str, str]] = {
    "1.0.0": _v("1.26.0", "2.1.1", "1.11.3", "1.3.1", _D),
    "1.1.0": _v("1.26.0", "2.1.4", "1.11.3", "1.3.2", _D),
    "1.2.0": _v("1.26.2", "2.1.4", "1.11.4", "1.3.2", _D),
    "1.3.0": _v("1.26.4", "2.2.0", "1.12.0", "1.4.0", _D2),
    "1.4.0": _v("1.26.4", "2.2.1", "1.12.0", "1.4.1.post1", _D2),
    "1.5.0": _v("1.26.4", "2.2.2", "1.13.0", "1.4.2", _D3),
    "1.6.0": _v("2.0.0", "2.2.2", "1.13.1", "1.5.0", _D3),
    "1.7.0": _v("2.0.1", "2.2.2", "1.14.0", "1.5.1", _D3),
    "1.8.0": _v("2.0.2", "2.2.3", "1.14.1", "1.5.2", _D4),
    "1.9.0": _v("2.1.3", "2.2.3", "1.14.1", "1.5.2", _D4),
}
QUICK_VERSIONS = 3
CHECK_IMPORT = "import numpy, pandas, scipy.linalg, sklearn.linear_model"
ENV = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", "HOME": "/tmp"}


@dataclass
class Version:
    """One built runtime version and the facts the benchmarks compare against."""

    name: str
    version: str
    src: str          # runtime dir (runtime.yml + isolated/)
    tarball: str
    extracted: str    # the tarball extracted by tar: the native baseline
    tar_size: int
    sha256: str
    files: int        # regular files in isolated/
    bytes: int        # their apparent size
    packages: dict[str, str]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class Series:
    cache: str
    registry: str     # directory holding registry.json and the tarballs
    packer: str
    versions: list[Version]


def log(msg: str) -> None:
    print(f"[series] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        cmd, check=True, text=True, **kw)
    return r


# ---------------------------------------------------------------- wheels and package installs
def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _find_wheel(wheels: Path, dist: str, ver: str) -> Path | None:
    for w in wheels.glob("*.whl"):
        parts = w.name.split("-")
        if _norm(parts[0]) == _norm(dist) and parts[1] == ver:
            return w
    return None


class SetupError(RuntimeError):
    """The series could not be built; the message says which step failed and what to do."""


PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "--abi", "cp311", "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64"]


def download_batches(wanted: list[tuple[str, str]]) -> list[list[str]]:
    """Requirement lists naming each distribution at most once: batch i has its i-th version.

    pip's resolver (26.x included) refuses two versions of one distribution in a single ``pip
    download`` even with ``--no-deps`` (ResolutionImpossible), so the series, which holds e.g.
    joblib 1.3.2 and 1.4.2, is fetched in as many calls as the most-bumped package has versions
    (scikit-learn: 8), not one call per wheel.
    """
    by_dist: dict[str, list[str]] = {}
    for dist, ver in sorted(set(wanted)):
        by_dist.setdefault(dist, []).append(ver)
    depth = max((len(v) for v in by_dist.values()), default=0)
    return [[f"{d}=={vs[i]}" for d, vs in sorted(by_dist.items()) if i < len(vs)]
            for i in range(depth)]


def download_wheels(wheels: Path, wanted: list[tuple[str, str]]) -> None:
    """Fetch every wanted wheel not yet in ``wheels`` (cp311 manylinux x86_64, no deps).

    Each batch lands in ``wheels/.download`` first and only complete ``.whl`` files are moved
    in, so an interrupted run leaves nothing half-written for ``_find_wheel`` to trust.
    """
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [(d, v) for d, v in sorted(set(wanted)) if _find_wheel(wheels, d, v) is None]
    if not missing:
        return
    tmp = wheels / ".download"
    batches = download_batches(missing)
    for i, reqs in enumerate(batches, 1):
        log(f"pip download ({i}/{len(batches)}): {' '.join(reqs)}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--disable-pip-version-check", *PIP_TARGET, "-d", str(tmp), *reqs])
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SetupError(f"pip download of {' '.join(reqs)} failed (exit {r.returncode}, "
                             "pip's message above); check that PyPI is reachable, then rerun: "
                             "wheels already fetched are kept")
        for w in tmp.glob("*.whl"):
            w.rename(wheels / w.name)
    shutil.rmtree(tmp, ignore_errors=True)
    still = [f"{d}=={v}" for d, v in missing if _find_wheel(wheels, d, v) is None]
    if still:
        raise SetupError(f"pip download gave no cp311 manylinux x86_64 wheel for "
                         f"{', '.join(still)}; the pins in benchmarks/series.py need a version "
                         "that has one")


def ensure_wheels(cache: Path, versions: list[str]) -> None:
    download_wheels(cache / "wheels",
                    [(d, v) for ver in versions for d, v in SERIES[ver].items()])


def ensure_pkg(cache: Path, dist: str, ver: str) -> Path:
    """The wheel installed alone into ``pkgs/<dist>-<ver>`` (scripts moved to usr/bin later)."""
    dest = cache / "pkgs" / f"{_norm(dist)}-{ver}"
    if dest.is_dir():
        return dest
    wheel = _find_wheel(cache / "wheels", dist, ver)
    if wheel is None:
        raise SetupError(f"wheel {dist}=={ver} not in {cache / 'wheels'}; rerun to fetch it")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"pip install --target {dest.name}")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--disable-pip-version-check", "--target", str(tmp), str(wheel)])
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------- the host-built base
def _ldd(paths: list[str]) -> set[str]:
    libs: set[str] = set()
    for i in range(0, len(paths), 200):
        out = subprocess.run(["ldd", *paths[i:i + 200]], capture_output=True, text=True).stdout
        libs.update(m.group(1) for m in re.finditer(r"=> (/\S+)", out))
        libs.update(m.group(1) for m in re.finditer(r"^\s+(/\S+ld-linux\S+)", out, re.M))
    return libs


def _usr(rel: str) -> str:
    return "usr/" + rel if rel.startswith(("lib/", "bin/", "sbin/", "lib64/")) else rel


def _copy_host_file(src: str, root: Path) -> None:
    """Copy host ``src`` to its (usrmerged) path under ``root``; the asked name becomes a link."""
    real = os.path.realpath(src)
    dst = root / _usr(real.lstrip("/"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        shutil.copy2(real, dst)
    alias = root / _usr(src.lstrip("/"))
    if alias != dst and not alias.exists() and not alias.is_symlink():
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.symlink_to(os.path.relpath(dst, alias.parent))


def ensure_base(cache: Path, pkg_dirs: list[Path]) -> Path:
    """Host interpreter, stdlib, tools and every shared library they and the wheels need."""
    base = cache / "base" / "isolated"
    if base.is_dir():
        return base
    tmp = cache / "base.tmp" / "isolated"
    shutil.rmtree(tmp.parent, ignore_errors=True)
    usr = tmp / "usr"
    (usr / "bin").mkdir(parents=True)
    bins = [HOST_PYTHON] + [p for t in TOOLS if (p := shutil.which(t, path="/usr/bin:/bin"))]
    for b in bins:
        _copy_host_file(b, tmp)
    os.symlink("python3.11", usr / "bin" / "python3")
    os.symlink("python3", usr / "bin" / "python")
    shutil.copytree(HOST_STDLIB, usr / "lib/python3.11", symlinks=True,
                    ignore=lambda _d, names: {n for n in names if n in PRUNE})
    sos = [str(p) for p in (usr / "lib/python3.11/lib-dynload").glob("*.so")]
    for d in pkg_dirs:  # the wheels' extensions need libstdc++, libgcc_s, libm ... from the host
        sos += [str(p) for p in d.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    for lib in sorted(_ldd(bins + sos)):
        if not lib.startswith(str(cache)):
            _copy_host_file(lib, tmp)
    for top in ("bin", "lib", "sbin"):
        (usr / top).mkdir(exist_ok=True)
        os.symlink(f"usr/{top}", tmp / top)
    (usr / "lib64").mkdir(exist_ok=True)
    ld = usr / "lib64/ld-linux-x86-64.so.2"
    if not ld.exists() and not ld.is_symlink():
        ld.symlink_to("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    os.symlink("usr/lib64", tmp / "lib64")
    for sub in ("etc", "tmp", "work", "proc", "dev", "usr/lib/python3/dist-packages"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    (tmp / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp / "etc/group").write_text("root:x:0:\n")
    (tmp / "tmp").chmod(0o1777)
    base.parent.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(base.parent, ignore_errors=True)
    tmp.parent.rename(base.parent)
    return base


# ---------------------------------------------------------------- one runtime version
def _runtime_yml(version: str, pkgs: dict[str, str]) -> str:
    desc = ", ".join(f"{d} {pkgs[d]}" for d in ("numpy", "pandas", "scipy", "scikit-learn"))
    env = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in ENV.items())
    return (f"name: {NAME}\nversion: {version}\ndescription: \"Python 3.11 ML runtime: {desc}\"\n"
            "mounts:\n  - source: isolated\n    target: /\n    readonly: true\n"
            f"environment:\n{env}")


def build_src(cache: Path, version: str, base: Path) -> Path:
    dest = cache / "src" / f"{NAME}-{version}"
    if (dest / "runtime.yml").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["cp", "-a", str(base), str(tmp / "isolated")])
    site = tmp / "isolated/usr/lib/python3/dist-packages"
    for dist, ver in sorted(SERIES[version].items()):
        pkg = ensure_pkg(cache, dist, ver)
        _run(["cp", "-a", f"{pkg}/.", str(site)])
    scripts = site / "bin"
    if scripts.is_dir():  # console scripts: into usr/bin, with the runtime's interpreter
        for s in scripts.iterdir():
            body = s.read_bytes()
            if body.startswith(b"#!"):
                body = b"#!/usr/bin/python3" + body[body.index(b"\n"):]
            (tmp / "isolated/usr/bin" / s.name).write_bytes(body)
            (tmp / "isolated/usr/bin" / s.name).chmod(0o755)
        shutil.rmtree(scripts)
    (tmp / "runtime.yml").write_text(_runtime_yml(version, SERIES[version]))
    chroot_check(tmp / "isolated")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def chroot_check(isolated: Path, code: str = CHECK_IMPORT) -> None:
    r = subprocess.run([CHROOT, str(isolated), "/usr/bin/python3", "-c", code],
                       env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        log(r.stderr[-2000:].rstrip())
        raise SetupError(f"chroot {isolated} python3 -c {code!r} failed (exit {r.returncode}, "
                         "its output above); rerun with --rebuild after fixing the cause")


def _jbl() -> Path:
    return Path(sys.executable).with_name("jbl")


def jbl_pack_works() -> bool:
    r = subprocess.run([str(_jbl()), "pack", "--help"], capture_output=True)
    return r.returncode == 0


def pack(src: Path, tarball: Path, packer: str) -> None:
    """Deterministic tarball with a single top dir (`NAME-VERSION/`); mtimes kept to the ns."""
    tmp = tarball.with_name("." + tarball.name)       # keeps the suffix jbl pack may read
    if packer == "jbl pack":
        _run([str(_jbl()), "pack", str(src), "-o", str(tmp)], stdout=subprocess.DEVNULL)
    else:
        with open(tmp, "wb") as out:
            tar = subprocess.Popen(
                ["tar", "--sort=name", "--format=posix", "--numeric-owner",
                 "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                 "-cf", "-", "-C", str(src.parent), src.name], stdout=subprocess.PIPE)
            subprocess.run(["gzip", "-n", "-6"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait() != 0:
                raise RuntimeError(f"tar of {src} failed")
    tmp.rename(tarball)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def tree_counts(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if not os.path.islink(os.path.join(dirpath, n)):
                files += 1
                size += st.st_size
    return files, size


def extract(tarball: Path, dest: Path) -> Path:
    """``tar -xzf`` into ``dest`` (as a user would) and return the runtime dir inside it."""
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["tar", "-xzf", str(tarball), "-C", str(tmp)])
        tmp.rename(dest)
    tops = [p for p in dest.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 and not (dest / "runtime.yml").exists() else dest


def write_registry(reg: Path, versions: list[Version]) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    runtimes: dict[str, dict[str, dict[str, object]]] = {}
    for v in versions:
        desc = ", ".join(f"{d} {v.packages[d]}" for d in ("numpy", "pandas", "scipy"))
        runtimes.setdefault(v.name, {})[v.version] = {
            "version": v.version, "description": f"Python 3.11 ML runtime: {desc}",
            "download_url": Path(v.tarball).name, "checksum": f"sha256:{v.sha256}",
            "size": v.tar_size, "platforms": ["ubuntu-amd64"]}
    doc = {"version": "1", "updated_at": now, "runtimes": runtimes}
    (reg / "registry.json").write_text(json.dumps(doc, indent=2) + "\n")


def _save(manifest: Path, reg: Path, packer: str, known: dict[str, dict[str, object]]) -> None:
    allv = [Version(**known[x]) for x in SERIES if x in known]  # type: ignore[arg-type]
    write_registry(reg, allv)
    manifest.write_text(json.dumps({"packer": packer, "built": str(dt.date.today()),
                                    "versions": [asdict(v) for v in allv]}, indent=1))


def ensure_series(cache: Path = DEFAULT_CACHE, *, quick: bool = False,
                  rebuild: bool = False) -> Series:
    """Build (or reuse) the first 3 (quick) or all 10 versions and return what is there."""
    cache.mkdir(parents=True, exist_ok=True)
    if rebuild:
        for d in ("base", "src", "registry", "extracted"):
            shutil.rmtree(cache / d, ignore_errors=True)
        (cache / "series.json").unlink(missing_ok=True)
    wanted = list(SERIES)[:QUICK_VERSIONS] if quick else list(SERIES)
    manifest = cache / "series.json"
    known: dict[str, dict[str, object]] = {}
    packer = None
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        packer = doc["packer"]
        known = {v["version"]: v for v in doc["versions"]}
    if packer is None:
        packer = "jbl pack" if jbl_pack_works() else "tar --sort=name | gzip -n"
    reg = cache / "registry"
    reg.mkdir(exist_ok=True)
    todo = [v for v in wanted if v not in known or not Path(str(known[v]["tarball"])).is_file()]
    if todo:
        # the base's libraries cover every wheel of the whole series, so it never changes
        ensure_wheels(cache, list(SERIES))
        pkgs = sorted({ensure_pkg(cache, d, v) for ver in SERIES for d, v in SERIES[ver].items()})
        base = ensure_base(cache, pkgs)
    for ver in todo:
        log(f"building {NAME}@{ver}")
        src = build_src(cache, ver, base)
        tarball = reg / f"{NAME}-{ver}.tar.gz"
        tarball.unlink(missing_ok=True)
        pack(src, tarball, packer)
        ex_dir = cache / "extracted" / ver
        shutil.rmtree(ex_dir, ignore_errors=True)
        ex = extract(tarball, ex_dir)
        chroot_check(ex / "isolated", "import numpy, pandas")
        files, size = tree_counts(ex / "isolated")
        known[ver] = asdict(Version(NAME, ver, str(src), str(tarball), str(ex),
                                    tarball.stat().st_size, _sha256(tarball), files, size,
                                    SERIES[ver]))
        _save(manifest, reg, packer, known)          # after each version: a crash keeps it
    if not (reg / "registry.json").is_file():
        _save(manifest, reg, packer, known)
    allv = [Version(**known[x]) for x in SERIES if x in known]  # type: ignore[arg-type]
    return Series(str(cache), str(reg), packer, [v for v in allv if v.version in wanted])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.series", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_VERSIONS} versions")
    ap.add_argument("--rebuild", action="store_true", help="rebuild runtimes and tarballs")
    a = ap.parse_args(argv)
    try:
        s = ensure_series(a.cache, quick=a.quick, rebuild=a.rebuild)
    except (SetupError, subprocess.CalledProcessError) as e:
        print(f"benchmarks.series: error: {e}", file=sys.stderr)
        return 1
    print(f"registry: {s.registry}/registry.json   packer: {s.packer}")
    print(f"{'version':8} {'tar.gz MB':>9} {'files':>6} {'MB':>6}  packages")
    for v in s.versions:
        p = v.packages
        print(f"{v.version:8} {v.tar_size / 1e6:9.1f} {v.files:6d} {v.bytes / 1e6:6.1f}  "
              f"numpy {p['numpy']}, pandas {p['pandas']}, scipy {p['scipy']}, "
              f"scikit-learn {p['scikit-learn']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
