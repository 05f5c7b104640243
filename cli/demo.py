"""``make demo`` (``python -m jbl.cli.demo``): jbl end to end on a runtime built from this host.

Steps, each by running the real ``jbl`` command and echoing it first:
  1. build two runtime dirs from this host's python + libraries (cli/hostruntime.py), versions
     1.0.0 and 1.1.0 whose probe module answers differently;
  2. ``jbl pack`` each into a tarball, ``jbl registry add`` them into a local registry dir;
  3. ``jbl store available / install / list / info / df`` against a demo store;
  4. (the job step: ``jbl run`` in the marked place below).
Everything lives under /var/tmp/jbl-demo (``JBL_DEMO_DIR`` overrides). Idempotent: built
runtimes are reused, re-adding a tarball to the registry is harmless and reinstalling says
"already installed". Single-threaded; one subprocess at a time.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from jbl.cli.hostruntime import build_runtime
from jbl.store.settings import resolve

# the demo is its own entry point (python -m jbl.cli.demo): its one read of the environment
DEMO = resolve(os.environ).demo_dir
JBL = str(Path(sys.executable).with_name("jbl"))
NAME = "demo-python"
VERSIONS = ("1.0.0", "1.1.0")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def sh(*argv: str | Path, check: bool = True) -> None:
    """Echo a command as a user would type it, then run it; stop the demo if it fails."""
    args = [str(a) for a in argv]
    shown = ["jbl" if a == str(JBL) else a for a in args]
    print("$ " + shlex.join(shown), flush=True)
    rc = subprocess.run(args).returncode
    if rc != 0 and check:
        print(f"demo: the command above failed (exit {rc})", file=sys.stderr)
        raise SystemExit(rc)


def build_runtimes() -> list[Path]:
    dirs = []
    for version in VERSIONS:
        d = DEMO / "runtimes" / f"{NAME}-{version}"
        done = d.parent / f".{d.name}.built"  # outside the runtime: not packed
        if done.exists():
            print(f"reusing {d}")
        else:
            subprocess.run(["rm", "-rf", str(d)], check=True)
            t0 = time.monotonic()
            build_runtime(d, NAME, version, probe=f"demo {version}",
                                  description=f"Python 3.11 from this host (demo {version})")
            done.write_text("")
            print(f"built {d} in {time.monotonic() - t0:.1f}s")
        dirs.append(d)
    return dirs


def main() -> int:
    DEMO.mkdir(parents=True, exist_ok=True)
    registry = DEMO / "registry"
    store = DEMO / "store"
    os.environ["JBL_CONFIG"] = ""  # the demo uses only its own registry and store
    os.environ.pop("JBL_STORE", None)

    step(f"1. build runtimes {', '.join(VERSIONS)} from this host's python and libraries")
    dirs = build_runtimes()

    step("2. pack them and publish them into a local registry")
    registry.mkdir(exist_ok=True)
    tarballs = []
    for d, version in zip(dirs, VERSIONS, strict=True):
        tarball = registry / f"{NAME}-{version}.tar.gz"
        sh(JBL, "pack", d, "-o", tarball)
        tarballs.append(tarball)
    sh(JBL, "registry", "add", *tarballs, "--registry", registry)

    step("3. install both versions into the store and look at it")
    sh(JBL, "--store", store, "store", "available", "--registry", registry)
    sh(JBL, "--store", store, "store", "install", f"{NAME}@1.0.0", "--registry", registry)
    sh(JBL, "--store", store, "store", "install", NAME, "--registry", registry)  # = latest
    sh(JBL, "--store", store, "store", "list")
    sh(JBL, "--store", store, "store", "info", f"{NAME}@1.1.0")
    sh(JBL, "--store", store, "store", "df")

    step("4. run a job in each version, side by side (namespaces, read-only runtime root)")
    script = DEMO / "hello.py"
    script.write_text(
        "import jblprobe, os, platform, sys\n"
        "print(f'{jblprobe.VERSION}: python {platform.python_version()} as pid {os.getpid()} '\n"
        "      f'on {platform.node()}, cwd {os.getcwd()}')\n"
        "try:\n"
        "    open('/usr/lib/python3.11/os.py', 'a')\n"
        "except OSError as e:\n"
        "    print('  the runtime is read-only:', e.strerror)\n"
        "open('/tmp/scratch', 'w').write('private /tmp')\n"
        "sys.exit(3)\n")
    jobs = []
    for version in VERSIONS:
        argv = [str(JBL), "--store", str(store), "run", "--runtime", f"{NAME}@{version}",
                "--memory", "256M", "--pids", "64", "--timeout", "1m", "--upload", str(script),
                "--", "python3", "hello.py"]
        print("$ " + shlex.join(["jbl"] + argv[1:]) + " &", flush=True)
        jobs.append(subprocess.Popen(argv))
    for job in jobs:
        print(f"  (job exited with status {job.wait()}: the script's own exit code)")

    step("5. browse every installed version through the read-only FUSE view")
    mnt = DEMO / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run([str(JBL), "umount", str(mnt)], capture_output=True)  # a leftover, if any
    sh(JBL, "--store", store, "mount", mnt)
    try:
        sh("ls", "-l", mnt / NAME)
        sh("diff", "-r", "-q", mnt / NAME / "1.0.0", mnt / NAME / "1.1.0", check=False)
    finally:
        sh(JBL, "umount", mnt)

    step("6. check the store and collect garbage")
    sh(JBL, "--store", store, "store", "verify")
    sh(JBL, "--store", store, "store", "gc", "--dry-run", "--keep-latest", "1")

    print(f"\ndemo done: store {store}, registry {registry} "
          f"(try: {shlex.join(['jbl', '--store', str(store), 'store', 'list'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
