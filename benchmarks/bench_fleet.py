"""Fleet figures (issue 16): the content-addressed registry form against tarballs.

Owns:
- real installs over HTTP: the series published with ``jbl registry add`` (tarballs and the
  content-addressed form) into a scratch dir served on 127.0.0.1 by nginx
  (``docs/fleet/nginx.conf``, or a minimal config of ours while it does not exist; workers run
  as root because the benchmark cache is private to root); the series' own registry (tarballs
  only) is served by the same server. Counted from nginx's access log: bytes fetched to install
  each version on a node holding the earlier ones, as a fraction of its tarball (target ≤ 0.35
  for the mostly shared version), and requests for a cold install and an update. Timed,
  interleaved round by round: install of version 1 into an empty store (≤ 1.1× the tarball
  install from the same server) and of version 2 after it (≤ 0.6×). Also counted: the last
  version installed on an empty node, against its tarball (reference). An install that fetched
  the tarball although the form was offered makes these "not measured", with the reason.
- the simulation over the real series (``fleetsim``): bytes an update fetches on a node holding
  the earlier versions, as a fraction of the version's tarball; requests for a cold install
  against the version's file count; bytes a cold install of the last version, and of the
  dearest version, fetches against its tarball (≤ 1.15 with the full sets: the floor is the
  version's own objects, ~1.10x its .tar.gz as zstd-1 chunks against gzip); the origin's storage
  of the form against the tarballs; what a 1,000-node rollout of
  the mostly shared version moves from the origin, content-addressed behind one cache vs
  tarballs (reference lines; the fleet table and chart from ``ctx.data["fleet"]``).
Chart data: ``ctx.data["fleet"]`` (``{"sim": …, "versions_table": …, "fleet_table": …}``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import fleetsim
from .context import Ctx
from .jblcli import JBL, Jbl, NotAvailable
from .measure import Figure, Stat
from .series import Version

HOST = "127.0.0.1"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FLEET_CONF = Path(__file__).resolve().parent.parent / "docs" / "fleet" / "nginx.conf"
# Used only while docs/fleet/nginx.conf does not exist; its log lines have the same start.
NGINX_CONF = """worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log;
events { worker_connections 512; }
http {
    log_format fleet '$remote_addr [$time_local] "$request" $status $body_bytes_sent';
    access_log @PREFIX@/access.log fleet;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path @PREFIX@/tmp; proxy_temp_path @PREFIX@/tmp;
    fastcgi_temp_path @PREFIX@/tmp; uwsgi_temp_path @PREFIX@/tmp; scgi_temp_path @PREFIX@/tmp;
    server { listen @LISTEN@; root @ROOT@; location / { } }
}
"""
LOG_LINE = re.compile(r'^\S+ \[[^]]*\] "\S+ (\S+)[^"]*" (\d+) (\d+)')


def _simulation(ctx: Ctx) -> list[Figure]:
    vs = ctx.series.versions
    ctx.log("fleet: simulation over the series (1 MiB chunks, zstd-1, packs; cached)")
    sim = fleetsim.cached_simulation(
        Path(ctx.series.cache), [(v.version, Path(v.extracted), v.tar_size) for v in vs],
        ctx.log)
    ctx.data["fleet"] = {"sim": sim, "versions_table": fleetsim.version_table(sim),
                         "fleet_table": fleetsim.fleet_table(sim)}
    rows: list[dict[str, Any]] = sim["versions"]  # type: ignore[assignment]
    kw: dict[str, Any] = {"group": "reference", "unit": "B"}
    figs = [Figure(f"simulated: fetch to update to {r['version']} on a node holding the "
                   "earlier versions vs its .tar.gz", Stat.of([r["update_bytes"]]),
                   Stat.of([r["tar"]]), baseline_label=".tar.gz", **kw) for r in rows[1:]]
    files = vs[0].files
    figs.append(Figure(f"simulated: requests for a cold install of {rows[0]['version']} vs "
                       "its files", Stat.of([rows[0]["cold_requests"]]), Stat.of([files]),
                       group="reference", unit="", baseline_label="files"))
    figs.append(Figure(f"simulated: cold install of {rows[-1]['version']} (a node joining "
                       "late) vs its .tar.gz", Stat.of([rows[-1]["cold_bytes"]]),
                       Stat.of([rows[-1]["tar"]]), baseline_label=".tar.gz", **kw))
    worst = max(rows, key=lambda r: r["cold_bytes"] / r["tar"])
    figs.append(Figure(f"simulated: the dearest cold install ({worst['version']}) vs its "
                       ".tar.gz", Stat.of([worst["cold_bytes"]]), Stat.of([worst["tar"]]),
                       baseline_label=".tar.gz", target="<=1.15", **{**kw, "group": "fleet"}))
    st: dict[str, int] = sim["storage"]  # type: ignore[assignment]
    figs.append(Figure("simulated: origin storage of the content-addressed form (objects, "
                       "delta packs, full sets, trees) vs the tarballs",
                       Stat.of([sum(v for k, v in st.items() if k != "tarballs")]),
                       Stat.of([st["tarballs"]]), baseline_label="tarballs", **kw))
    if len(rows) > 1:
        k = 1
        out = fleetsim.rollout(sim, k)
        name = f"simulated 1,000-node rollout of {rows[k]['version']}: origin bytes"
        figs += [Figure(f"{name}, content-addressed + one cache vs tarballs, no cache",
                        Stat.of([out["d"]]), Stat.of([out["a"]]),
                        baseline_label="tarballs", **kw),
                 Figure(f"{name}, content-addressed + one cache vs tarballs + one cache",
                        Stat.of([out["d"]]), Stat.of([out["b"]]),
                        baseline_label="tarballs + cache", **kw),
                 Figure(f"simulated 1,000-node rollout of {rows[k]['version']}: bytes the "
                        "nodes receive, content-addressed vs tarballs",
                        Stat.of([out["lan_d"]]), Stat.of([out["lan_b"]]),
                        baseline_label="tarballs", **kw)]
    return figs


# ---------------------------------------------------------------- a local origin
class Origin:
    """nginx serving ``root`` on 127.0.0.1; ``since()`` reads its access log from a mark."""

    def __init__(self, d: Path, root: Path) -> None:
        self.dir, self.root, self.mark = d, root, 0
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = FLEET_CONF if FLEET_CONF.is_file() else None
        text = self.conf.read_text() if self.conf else NGINX_CONF
        for key, value in (("@LISTEN@", f"{HOST}:{self.port}"), ("@ROOT@", str(root)),
                           ("@PREFIX@", str(d))):
            text = text.replace(key, value)
        conf = d / "nginx.conf"
        conf.write_text(text)
        self.url = f"http://{HOST}:{self.port}"
        # workers as root: the benchmark cache is private to root (drwx------)
        try:
            with open(d / "stderr.log", "wb") as errf:
                self.proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(conf),
                                              "-g", "daemon off; user root root;"],
                                             stdout=subprocess.DEVNULL, stderr=errf,
                                             start_new_session=True)
        except OSError as e:
            raise NotAvailable(f"cannot start nginx ({NGINX}): {e.strerror}; install it "
                               "(Debian: apt-get install nginx-light)") from None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        err = (d / "stderr.log").read_text(errors="replace") if self.proc.poll() is not None \
            else "did not listen within 20 s"
        self.stop()
        raise NotAvailable(f"nginx on {HOST}:{self.port}: {err.strip()[-160:]}")

    def since(self) -> list[tuple[str, int, int]]:
        """(path, status, body bytes) of the requests logged since the last call."""
        with open(self.dir / "access.log", "rb") as f:
            f.seek(self.mark)
            data = f.read()
        self.mark += len(data)
        out = []
        for line in data.decode(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if m is None:
                raise NotAvailable(f"nginx access log line not understood: {line[:120]!r}")
            out.append((m.group(1), int(m.group(2)), int(m.group(3))))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextmanager
def origin(d: Path, root: Path) -> Iterator[Origin]:
    o = Origin(d, root)
    try:
        yield o
    finally:
        o.stop()


def _env() -> dict[str, str]:
    """The caller's environment without proxies: the origin is on this machine."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = HOST
    return env


# ---------------------------------------------------------------- real installs over HTTP
def _publish(ctx: Ctx, vs: list[Version], root: Path) -> str | None:
    """The series published by ``jbl registry add`` in ``root/cas``; the series' own
    registry (tarballs only) linked as ``root/tar``. Returns why not, or None."""
    cas = root / "cas"
    ctx.log(f"fleet: jbl registry add {len(vs)} tarballs (tarballs + content-addressed form)")
    r = subprocess.run([str(JBL), "registry", "add",
                        *[v.tarball for v in vs], "--registry", str(cas)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"jbl registry add failed: {(r.stderr or r.stdout).strip()[-160:]}"
    (root / "tar").symlink_to(ctx.series.registry)
    if not (cas / "trees").is_dir():
        return "jbl registry add published no content-addressed form (no trees/)"
    return None


def _fetch_counts(ctx: Ctx, jbl: Jbl, srv: Origin, vs: list[Version], env: dict[str, str]
                  ) -> tuple[list[tuple[int, int]], str | None]:
    """(bytes, requests) of each version's install from the form, in order, on one node;
    then of the last version's install on an empty node (one joining late)."""
    srv.since()
    out: list[tuple[int, int]] = []
    for i, v in enumerate([*vs, vs[-1]]):
        if i in (0, len(vs)):
            jbl.reset()
        ctx.log(f"fleet: install {v.spec} from the content-addressed form (counted"
                f"{', empty store' if i == len(vs) else ''})")
        jbl.timed("store", "install", v.spec, "--registry", f"{srv.url}/cas/", env=env)
        reqs = srv.since()
        if any(uri.endswith(".tar.gz") for uri, _s, _n in reqs):
            return out, (f"jbl store install {v.spec} fetched the tarball although the "
                         "content-addressed form was offered")
        out.append((sum(n for _u, _s, n in reqs), len(reqs)))
    return out, None


def _timed(ctx: Ctx, jbl: Jbl, srv: Origin, vs: list[Version], env: dict[str, str]
           ) -> dict[str, Stat]:
    """Install v1 into an empty store, then v2, from each form; forms alternate by round."""
    t: dict[str, list[float]] = {k: [] for k in ("cas1", "cas2", "tar1", "tar2")}
    n = ctx.reps(3, 5)
    for i in range(n):
        ctx.log(f"fleet: round {i + 1}/{n}: install {vs[0].version}, {vs[1].version} from "
                "each form")
        for form in ("cas", "tar") if i % 2 == 0 else ("tar", "cas"):
            jbl.reset()
            for k in (0, 1):
                t[f"{form}{k + 1}"].append(jbl.timed(
                    "store", "install", vs[k].spec, "--registry", f"{srv.url}/{form}/",
                    env=env))
                os.sync()
    return {k: Stat.of(x) for k, x in t.items()}


def _real(ctx: Ctx) -> list[Figure]:
    vs = ctx.series.versions
    scratch = ctx.scratch("fleet")
    names = _real_names(vs)
    tars = [Stat.of([v.tar_size]) for v in vs]
    try:
        why = _publish(ctx, vs, scratch / "origin")
        if why is None:
            with origin(scratch / "nginx", scratch / "origin") as srv:
                jbl, env = Jbl(scratch / "store"), _env()
                counts, why = _fetch_counts(ctx, jbl, srv, vs, env)
                if why is None:
                    figs = _real_figs(vs, names, counts, _timed(ctx, jbl, srv, vs, env))
                    _profile_missed(ctx, jbl, srv, vs, figs)
                    return figs
    except NotAvailable as e:
        why = str(e)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    kw: dict[str, Any] = {"group": "fleet"}
    return [Figure.missing(names["bytes"][k], tars[k], why, unit="B",
                           target="<=0.35" if k == 1 else None,
                           baseline_label=".tar.gz", **kw) for k in range(1, len(vs))] + [
        Figure.missing(names["new"], None, why, target="<=1.1", **kw),
        Figure.missing(names["shared"], None, why, target="<=0.6", **kw)]


def _profile_missed(ctx: Ctx, jbl: Jbl, srv: Origin, vs: list[Version],
                    figs: list[Figure]) -> None:
    """A missed install time gets one cProfile'd content-addressed install (as bench_store)."""
    for f in figs:
        if f.status != "MISSED" or f.unit != "s":
            continue
        k = 0 if "new runtime" in f.name else 1
        ctx.log(f"fleet: profiling the missed install of {vs[k].spec} once (cProfile)")
        jbl.reset()
        for v in vs[:k]:
            jbl.timed("store", "install", v.spec, "--registry", f"{srv.url}/cas/", env=_env())
        f.profile = ("cProfile of one run, main thread only (time in worker threads shows as "
                     "lock waits):\n" + jbl.profile("store", "install", vs[k].spec,
                                                     "--registry", f"{srv.url}/cas/"))


def _real_names(vs: list[Version]) -> dict[str, Any]:
    return {"bytes": [f"install {v.spec} over HTTP on a node holding the earlier versions: "
                      "bytes fetched vs its .tar.gz" for v in vs],
            "cold_req": f"HTTP requests, cold install of {vs[0].spec} (content-addressed) vs "
                        "its files",
            "update_req": f"HTTP requests, update to {vs[1].spec} (content-addressed)",
            "late": f"install {vs[-1].spec} over HTTP on an empty node (joining late): bytes "
                    "fetched vs its .tar.gz",
            "new": f"install {vs[0].spec} from local nginx, new runtime: content-addressed vs "
                   "tarball",
            "shared": f"install {vs[1].spec} after {vs[0].version} from local nginx: "
                      "content-addressed vs tarball"}


def _real_figs(vs: list[Version], names: dict[str, Any], counts: list[tuple[int, int]],
               st: dict[str, Stat]) -> list[Figure]:
    kw: dict[str, Any] = {"group": "fleet"}
    figs = [Figure(names["bytes"][k], Stat.of([counts[k][0]]), Stat.of([vs[k].tar_size]),
                   target="<=0.35" if k == 1 else None, unit="B", baseline_label=".tar.gz",
                   **kw) for k in range(1, len(vs))]
    figs += [Figure(names["cold_req"], Stat.of([counts[0][1]]), Stat.of([vs[0].files]),
                    unit="", baseline_label="files", group="reference"),
             Figure(names["update_req"], Stat.of([counts[1][1]]), Stat.of([counts[0][1]]),
                    unit="", baseline_label="cold install", group="reference"),
             Figure(names["late"], Stat.of([counts[-1][0]]), Stat.of([vs[-1].tar_size]),
                    unit="B", baseline_label=".tar.gz", target="<=1.15", **kw),
             Figure(names["new"], st["cas1"], st["tar1"], target="<=1.1",
                    baseline_label="tarball install", **kw),
             Figure(names["shared"], st["cas2"], st["tar2"], target="<=0.6",
                    baseline_label="tarball install", **kw)]
    return figs


def run(ctx: Ctx) -> list[Figure]:
    return _real(ctx) + _simulation(ctx)
