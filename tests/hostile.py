"""A corpus of hostile and malformed runtime tarballs, crafted byte by byte.

``tarfile`` refuses to write most of these (bad checksums, '..' via pax, non-UTF-8 names),
so headers are built here by hand: ``header()`` is a ustar header with every field under
the caller's control, ``pax()`` a pax extended header, ``gnu_long()`` a GNU long name.
Every case is a *valid* tiny runtime (runtime.yml + isolated/) plus exactly one bad thing,
so the rejection can only come from that thing.

``CASES`` maps a case name to ``Case(data, reason, member)``: the bytes of the tarball, a
fragment of the one-line reason jbl must print, and the member name it must print (or None).
``NEUTRALISED`` holds archives that install with a warning. Run as a script to write them
all to a directory: ``python tests/hostile.py OUTDIR``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import sys
from dataclasses import dataclass
from pathlib import Path

import zstandard

BLOCK = 512
MTIME = 1_700_000_000
MANIFEST = (b"name: hostile\nversion: 1.0.0\ndescription: a hostile test runtime\n"
            b"mounts:\n  - {source: isolated, target: /, readonly: true}\n")


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def header(name: bytes, *, type: bytes = b"0", size: int = 0, mode: int = 0o644, uid: int = 0,
           gid: int = 0, mtime: int = MTIME, linkname: bytes = b"", magic: bytes = b"ustar\x00",
           version: bytes = b"00", prefix: bytes = b"", devmajor: int = 0, devminor: int = 0,
           chksum_delta: int = 0, size_field: bytes | None = None,
           uid_field: bytes | None = None, gid_field: bytes | None = None,
           mtime_field: bytes | None = None, extra: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte ustar header, checksum computed (then off by ``chksum_delta``).
    ``*_field`` replace a numeric field verbatim (e.g. ``b256()``); ``extra`` writes bytes
    at offsets (the GNU sparse map at 386..495)."""
    h = bytearray(BLOCK)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = _octal(mode, 8)
    h[108:116] = uid_field if uid_field is not None else _octal(uid, 8)
    h[116:124] = gid_field if gid_field is not None else _octal(gid, 8)
    h[124:136] = size_field if size_field is not None else _octal(size, 12)
    h[136:148] = mtime_field if mtime_field is not None else _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = type
    h[157:157 + len(linkname[:100])] = linkname[:100]
    h[257:263] = magic
    h[263:265] = version
    h[329:337] = _octal(devmajor, 8)
    h[337:345] = _octal(devminor, 8)
    h[345:345 + len(prefix)] = prefix
    for at, data in (extra or {}).items():
        h[at:at + len(data)] = data
    chk = sum(h) + chksum_delta
    h[148:156] = f"{chk:06o}".encode() + b"\0 "
    return bytes(h)


def b256(value: int, width: int) -> bytes:
    """A GNU base-256 numeric field (0x80 marker, or 0xFF for a negative two's complement)."""
    if value < 0:
        return b"\xff" + (value % 256 ** (width - 1)).to_bytes(width - 1, "big")
    return b"\x80" + value.to_bytes(width - 1, "big")


def old_gnu_sparse(name: bytes, realsize: int, regions: list[tuple[int, bytes]],
                   size_delta: int = 0) -> bytes:
    """An old GNU sparse (``S``) member holding ``regions`` (offset, data) of a file of
    ``realsize`` bytes; at most 4 regions (the header's map). ``size_delta`` corrupts the
    stored size against the map."""
    assert len(regions) <= 4
    smap = b"".join(_octal(off, 12) + _octal(len(d), 12) for off, d in regions)
    data = b"".join(d for _, d in regions)
    h = header(name, type=b"S", size=len(data) + size_delta, magic=b"ustar ", version=b" \0",
               extra={386: smap, 482: b"\0", 483: _octal(realsize, 12)})
    return h + pad(data + bytes(max(size_delta, 0)))


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def file(name: bytes, data: bytes, **kw: object) -> bytes:
    return header(name, size=len(data), **kw) + pad(data)  # type: ignore[arg-type]


def directory(name: bytes, **kw: object) -> bytes:
    kw.setdefault("mode", 0o755)
    return header(name, type=b"5", **kw)  # type: ignore[arg-type]


def symlink(name: bytes, target: bytes) -> bytes:
    return header(name, type=b"2", mode=0o777, linkname=target)


def hardlink(name: bytes, target: bytes) -> bytes:
    return header(name, type=b"1", linkname=target)


def pax(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for k, v in records.items():
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec) + 1
        while len(str(n).encode()) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return header(b"././@PaxHeader", type=b"x", size=len(body)) + pad(body)


def gnu_long(name: bytes, type: bytes = b"L") -> bytes:
    data = name + b"\0"
    return header(b"././@LongLink", type=type, size=len(data), magic=b"ustar ",
                  version=b" \0") + pad(data)


END = bytes(2 * BLOCK)


def runtime(*extra: bytes, top: bytes = b"") -> bytes:
    """A valid tiny runtime's members (no end marker), then ``extra`` members."""
    return (file(top + b"runtime.yml", MANIFEST) + directory(top + b"isolated/")
            + directory(top + b"isolated/bin/")
            + file(top + b"isolated/bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755)
            + b"".join(extra))


def tar(*extra: bytes) -> bytes:
    """A complete plain tar: runtime + extra members + end marker + record padding."""
    data = runtime(*extra) + END
    return data + bytes(-len(data) % 10240)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes, **params: int) -> bytes:
    if params:
        cp = zstandard.ZstdCompressionParameters.from_level(3, **params)
        c = zstandard.ZstdCompressor(compression_params=cp)
        out = io.BytesIO()
        with c.stream_writer(out, closefd=False) as w:  # streamed: no content size, full window
            w.write(data)
        return out.getvalue()
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


@dataclass(frozen=True)
class Case:
    data: bytes
    reason: str
    member: str | None = None
    rc: int = 6


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _cases() -> dict[str, Case]:
    good = tar()
    c: dict[str, Case] = {}
    # --- paths
    c["dotdot"] = Case(tar(file(b"isolated/../../etc/cron.d/evil", b"x")), "contains '..'",
                       "isolated/../../etc/cron.d/evil")
    c["dotdot_pax"] = Case(tar(pax({b"path": b"../../root/.ssh/authorized_keys"}),
                               file(b"innocent", b"key")), "contains '..'",
                           "../../root/.ssh/authorized_keys")
    c["absolute"] = Case(tar(file(b"/etc/passwd", b"root::0:0::/:/bin/sh\n")),
                         "absolute member path", "/etc/passwd")
    c["under_symlink"] = Case(tar(symlink(b"isolated/etc", b"/etc"),
                                  file(b"isolated/etc/passwd", b"x")),
                              "member under a symlink", "isolated/etc/passwd")
    c["under_file"] = Case(tar(file(b"isolated/f", b"x"), file(b"isolated/f/g", b"y")),
                           "member under a non-directory", "isolated/f/g")
    c["hardlink_missing"] = Case(tar(hardlink(b"isolated/shadow", b"etc/shadow")),
                                 "not an earlier regular file", "isolated/shadow")
    c["hardlink_outside"] = Case(tar(hardlink(b"isolated/shadow", b"../../etc/shadow")),
                                 "contains '..'", "../../etc/shadow")
    c["hardlink_absolute"] = Case(tar(hardlink(b"isolated/shadow", b"/etc/shadow")),
                                  "absolute hardlink target path", "/etc/shadow")
    c["hardlink_later"] = Case(tar(hardlink(b"isolated/a", b"isolated/b"),
                                   file(b"isolated/b", b"b")),
                               "not an earlier regular file", "isolated/a")
    c["hardlink_dir"] = Case(tar(hardlink(b"isolated/d", b"isolated/bin")),
                             "not an earlier regular file", "isolated/d")
    c["hardlink_symlink"] = Case(tar(symlink(b"isolated/s", b"/etc/shadow"),
                                     hardlink(b"isolated/h", b"isolated/s")),
                                 "not an earlier regular file", "isolated/h")
    c["duplicate"] = Case(tar(file(b"isolated/bin/hello", b"#!/bin/sh\nrm -rf /\n")),
                          "duplicate path", "isolated/bin/hello")
    c["duplicate_dir_file"] = Case(tar(file(b"isolated/bin", b"x")), "duplicate path",
                                   "isolated/bin")
    c["non_utf8"] = Case(tar(file(b"isolated/caf\xe9", b"x")), "not valid UTF-8",
                         "isolated/caf\\xe9")
    c["control_newline"] = Case(tar(file(b"isolated/a\nb", b"x")), "control character",
                                "isolated/a\nb")
    c["control_escape"] = Case(tar(file(b"isolated/\x1b[2Jevil", b"x")), "control character",
                               "isolated/\x1b[2Jevil")
    long_comp = b"isolated/" + b"n" * 256
    c["long_component"] = Case(tar(pax({b"path": long_comp}), file(b"x", b"x")),
                               "component longer than 255", long_comp.decode())
    long_path = b"isolated/" + b"/".join([b"d" * 200] * 21)
    c["long_path"] = Case(tar(gnu_long(long_path), file(b"x", b"x")), "longer than 4096",
                          long_path.decode())
    # --- types
    c["unknown_type"] = Case(tar(header(b"isolated/weird", type=b"Z")),
                             "unknown member type 'Z'", "isolated/weird")
    # sparse members are expanded (tests/test_archive_shapes.py); a map that lies is not
    c["sparse_past_end"] = Case(tar(old_gnu_sparse(b"isolated/sparse", 100,
                                                   [(0, b"a" * 10), (95, b"b" * 10)])),
                                "corrupt sparse map", "isolated/sparse")
    c["sparse_backwards"] = Case(tar(old_gnu_sparse(b"isolated/sparse", 100,
                                                    [(50, b"a" * 10), (0, b"b" * 10)])),
                                 "corrupt sparse map", "isolated/sparse")
    c["sparse_size_mismatch"] = Case(tar(old_gnu_sparse(b"isolated/sparse", 100,
                                                        [(0, b"a" * 10)], size_delta=512)),
                                     "10 bytes of data mapped, the member stores 522",
                                     "isolated/sparse")
    c["sparse_pax_unknown_version"] = Case(
        tar(pax({b"GNU.sparse.major": b"2", b"GNU.sparse.minor": b"0",
                 b"GNU.sparse.name": b"isolated/sparse", b"GNU.sparse.realsize": b"10"}),
            file(b"isolated/GNUSparseFile.1/sparse", b"")),
        "unsupported GNU sparse format 2.0", "isolated/sparse")
    c["sparse_pax_odd_map"] = Case(
        tar(pax({b"GNU.sparse.size": b"10", b"GNU.sparse.map": b"0,2,5",
                 b"GNU.sparse.name": b"isolated/sparse"}),
            file(b"isolated/GNUSparseFile.1/sparse", b"ab")),
        "corrupt sparse map (an odd count", "isolated/sparse")
    c["sparse_on_a_symlink"] = Case(tar(pax({b"GNU.sparse.size": b"1", b"GNU.sparse.map":
                                             b"0,1"}), symlink(b"isolated/s", b"x")),
                                    "sparse map on a symlink", "isolated/s")
    # --- numbers: ids the kernel cannot carry, pax numbers too long to convert
    c["uid_2_32"] = Case(tar(file(b"isolated/big-uid", b"x", uid_field=b256(2**32, 8))),
                         "uid 4294967296 is out of range (0..4294967294)", "isolated/big-uid")
    c["gid_minus_one"] = Case(tar(file(b"isolated/g", b"x", gid_field=b256(2**32 - 1, 8))),
                              "gid 4294967295 is out of range", "isolated/g")
    c["uid_negative"] = Case(tar(directory(b"isolated/neg/", uid_field=b256(-5, 8))),
                             "negative uid", "isolated/neg/")
    c["uid_pax_huge"] = Case(tar(pax({b"uid": b"9" * 5000}), file(b"isolated/u", b"x")),
                             "uid of more than 20 digits is out of range", "isolated/u")
    c["gid_pax_2_64"] = Case(tar(pax({b"gid": str(2**64).encode()}),
                                 symlink(b"isolated/l", b"u")),
                             f"gid {2**64} is out of range", "isolated/l")
    c["uid_pax_not_a_number"] = Case(tar(pax({b"uid": b"12a"}), file(b"isolated/u", b"x")),
                                     "corrupt pax uid ('12a')", "isolated/u")
    c["size_pax_huge"] = Case(tar(pax({b"size": b"9" * 5000}), file(b"isolated/s", b"x")),
                              "file larger than", "isolated/s")
    c["pax_record_length_huge"] = Case(
        tar(header(b"././@PaxHeader", type=b"x", size=5010)
            + pad(b"9" * 5000 + b" path=x\n")), "corrupt pax extended header")
    # --- OCI layer whiteouts: nothing to delete from in a flat runtime
    c["oci_whiteout"] = Case(tar(file(b"isolated/bin/.wh.hello", b"")),
                             "OCI whiteout marker", "isolated/bin/.wh.hello")
    c["oci_opaque_whiteout"] = Case(tar(file(b"isolated/bin/.wh..wh..opq", b"")),
                                    "OCI opaque-directory whiteout marker",
                                    "isolated/bin/.wh..wh..opq")
    c["oci_whiteout_dir"] = Case(tar(directory(b"isolated/.wh.etc/")),
                                 "OCI whiteout marker", "isolated/.wh.etc/")
    # --- the same directory twice is fine only when it is the same
    c["duplicate_dir_other_mode"] = Case(tar(directory(b"isolated/bin/", mode=0o700)),
                                         "duplicate path", "isolated/bin")
    c["duplicate_dir_other_owner"] = Case(tar(directory(b"isolated/bin/", uid=1005)),
                                          "duplicate path", "isolated/bin")
    c["duplicate_dir_other_mtime"] = Case(tar(directory(b"isolated/bin/", mtime=MTIME + 1)),
                                          "duplicate path", "isolated/bin")
    c["duplicate_dir_then_symlink"] = Case(tar(symlink(b"isolated/bin", b"/tmp")),
                                           "duplicate path", "isolated/bin")
    c["runtime_yml_symlink"] = Case(_with_manifest_symlink(),
                                    "runtime.yml is not a regular file", "runtime.yml")
    c["no_manifest"] = Case(_no_manifest(), "no runtime.yml at the archive root")
    c["mount_escape"] = Case(_manifest(b"name: x\nversion: 1.0.0\nmounts:\n"
                                       b"  - {source: ../../etc, target: /etc}\n"),
                             "mount source leaves the runtime", "../../etc")
    c["mount_target_relative"] = Case(_manifest(b"name: x\nversion: 1.0.0\nmounts:\n"
                                                b"  - {source: isolated, target: usr}\n"),
                                      "mount target must be an absolute path", "usr")
    # --- the container
    body = runtime()
    c["no_end_marker"] = Case(body, "truncated (no end-of-archive marker)")
    c["one_zero_block"] = Case(body + bytes(BLOCK), "corrupt end of archive")
    c["truncated_member"] = Case(runtime(file(b"isolated/big", b"z" * 5000))[:-4096],
                                 "truncated inside member", "isolated/big")
    c["bad_checksum"] = Case(tar(header(b"isolated/x", chksum_delta=1)),
                             "bad tar header checksum")
    c["not_tar"] = Case(b"PK\x03\x04" + bytes(2000), "bad tar header checksum")
    c["trailing_garbage"] = Case(good + b"#!/bin/sh\nevil\n", "trailing data or a second archive")
    c["second_archive"] = Case(good + tar(), "trailing data or a second archive")
    c["second_gzip_member"] = Case(gz(good) + gz(tar()), "trailing data or a second archive")
    c["gzip_trailing"] = Case(gz(good) + b"garbage", "trailing data after the gzip stream")
    c["gzip_truncated"] = Case(gz(good)[:-20], "truncated gzip stream")
    gzd = gz(good)
    c["gzip_corrupt"] = Case(_flip(gzd, len(gzd) // 2), "corrupt gzip stream")
    c["gzip_bad_crc"] = Case(_flip(gzd, len(gzd) - 6), "corrupt gzip stream")
    c["zstd_trailing"] = Case(zst(good) + b"garbage!", "trailing data after the zstd stream")
    c["zstd_truncated"] = Case(zst(good)[:-7], "truncated zstd stream")
    zd = zst(good)
    c["zstd_corrupt"] = Case(_flip(zd, len(zd) - 2), "corrupt zstd stream")
    # --- limits (these use the CLI's limit options; see test_hostile.py)
    c["zstd_window"] = Case(zst(tar(file(b"isolated/r", bytes(range(256)) * 4096)),
                                window_log=28), "zstd window")
    c["bomb_zstd"] = Case(zst(tar(file(b"isolated/zeros", bytes(16 << 20)))),
                          "expands more than 1000:1")
    c.update(_more_cases(good))
    return c


def _more_cases(good: bytes) -> dict[str, Case]:
    """The refusals docs/store-format.md lists that the cases above do not reach."""
    c: dict[str, Case] = {}
    # --- link targets: empty, too long, and '..' through pax linkpath and GNU 'K'
    c["symlink_empty_target"] = Case(tar(symlink(b"isolated/s", b"")),
                                     "symlink with an empty target", "isolated/s")
    c["symlink_target_too_long"] = Case(tar(pax({b"linkpath": b"a/" * 2100}),
                                            symlink(b"isolated/s", b"x")),
                                        "symlink target longer than 4096 bytes", "isolated/s")
    c["pax_linkpath_dotdot"] = Case(tar(pax({b"linkpath": b"../../etc/shadow"}),
                                        hardlink(b"isolated/h", b"isolated/bin/hello")),
                                    "hardlink target path contains '..'", "../../etc/shadow")
    c["gnu_longlink_dotdot"] = Case(tar(gnu_long(b"../../etc/shadow", type=b"K"),
                                        hardlink(b"isolated/h", b"isolated/bin/hello")),
                                    "hardlink target path contains '..'", "../../etc/shadow")
    # --- numbers and header fields
    c["size_negative"] = Case(tar(header(b"isolated/n", size_field=b256(-1, 12))),
                              "negative member size", "isolated/n")
    c["gid_negative"] = Case(tar(file(b"isolated/g", b"x", gid_field=b256(-1, 8))),
                             "negative gid", "isolated/g")
    c["header_field_not_octal"] = Case(tar(header(b"isolated/f", size_field=b"0000000001x\0")),
                                       "corrupt header field size", "isolated/f")
    c["no_ustar_magic"] = Case(tar(header(b"isolated/f", magic=bytes(6), version=bytes(2))),
                               "unsupported tar format (no ustar/pax/GNU magic)")
    c["pax_mtime_corrupt"] = Case(tar(pax({b"mtime": b"12x"}), file(b"isolated/m", b"x")),
                                  "corrupt pax mtime", "isolated/m")
    c["pax_size_corrupt"] = Case(tar(pax({b"size": b"1e3"}), file(b"isolated/s", b"x")),
                                 "corrupt pax size ('1e3')", "isolated/s")
    c["pax_record_without_equals"] = Case(
        tar(header(b"././@PaxHeader", type=b"x", size=8) + pad(b"8 pathx\n"),
            file(b"isolated/p", b"x")), "corrupt pax extended header", "././@PaxHeader")
    # --- the tree and the container
    c["root_not_a_directory"] = Case(tar(file(b"./", b"x")),
                                     "the archive root is not a directory", ".")
    c["pax_header_without_member"] = Case(runtime(pax({b"path": b"isolated/x"})) + END,
                                          "extended header without a member")
    c["gnu_longname_without_member"] = Case(runtime(gnu_long(b"isolated/x")) + END,
                                            "extended header without a member")
    c["padding_over_1_mib"] = Case(good + bytes((1 << 20) + 10240),
                                   "trailing data or a second archive")
    # --- runtime.yml
    c["runtime_yml_over_1_mib"] = Case(_manifest(MANIFEST + b"#" * (1 << 20)),
                                       "runtime.yml is larger than 1048576 bytes", "runtime.yml")
    c["runtime_yml_invalid_yaml"] = Case(_manifest(b"name: [unclosed\nversion: 1.0.0\n"),
                                         "runtime.yml is not valid YAML (line 2)")
    c["runtime_yml_without_name"] = Case(_manifest(b"version: 1.0.0\n"),
                                         "runtime.yml lacks 'name' or 'version'")
    c["runtime_yml_without_version"] = Case(_manifest(b"name: x\n"),
                                            "runtime.yml lacks 'name' or 'version'")
    # --- xz and bzip2 are decoded as strictly as gzip and zstd
    for kind, pack in (("xz", lzma.compress), ("bzip2", bz2.compress)):
        packed = pack(good)
        c[f"{kind}_truncated"] = Case(packed[:-10], f"truncated {kind} stream")
        c[f"{kind}_trailing"] = Case(packed + b"garbage", f"trailing data after the {kind} "
                                                          "stream")
        c[f"{kind}_corrupt"] = Case(_flip(packed, len(packed) // 2), f"corrupt {kind} stream")
    # --- zstd frames and blocks walked by hand
    zd = zst(good)
    c["zstd_reserved_header_bit"] = Case(zd[:4] + bytes([zd[4] | 0x08]) + zd[5:],
                                         "corrupt zstd stream (reserved frame header bit set)")
    c["zstd_reserved_block_type"] = Case(_zstd_first_block_type_3(zd),
                                         "corrupt zstd stream (reserved block type)")
    return c


def _zstd_first_block_type_3(zd: bytes) -> bytes:
    """``zd`` with its first block's type set to 3 (reserved)."""
    fhd = zd[4]
    single, did, fcs = fhd >> 5 & 1, fhd & 3, fhd >> 6
    hlen = 5 + (0 if single else 1) + (0, 1, 2, 4)[did] + ((1 if single else 0), 2, 4, 8)[fcs]
    block = int.from_bytes(zd[hlen:hlen + 3], "little") | 3 << 1
    return zd[:hlen] + block.to_bytes(3, "little") + zd[hlen + 3:]


def _with_manifest_symlink() -> bytes:
    data = (symlink(b"runtime.yml", b"/etc/passwd") + directory(b"isolated/") + END)
    return data + bytes(-len(data) % 10240)


def _no_manifest() -> bytes:
    data = directory(b"isolated/") + file(b"isolated/x", b"x") + END
    return data + bytes(-len(data) % 10240)


def _manifest(text: bytes) -> bytes:
    data = file(b"runtime.yml", text) + directory(b"isolated/") + END
    return data + bytes(-len(data) % 10240)


# Archives jbl accepts, neutralising one thing with a warning: (data, warning fragment, member)
def _neutralised() -> dict[str, tuple[bytes, str, str]]:
    return {
        "setuid": (tar(file(b"isolated/bin/su", b"\x7fELF", mode=0o4755)),
                   "setuid/setgid bits cleared", "isolated/bin/su"),
        "setgid_dir": (tar(directory(b"isolated/var/", mode=0o2775)),
                       "setuid/setgid bits cleared", "isolated/var"),
        "char_device": (tar(header(b"isolated/dev-null", type=b"3", mode=0o666, devmajor=1,
                                   devminor=3)), "char device dropped", "isolated/dev-null"),
        "block_device": (tar(header(b"isolated/sda", type=b"4", mode=0o660, devmajor=8)),
                         "block device dropped", "isolated/sda"),
        "fifo": (tar(header(b"isolated/pipe", type=b"6", mode=0o644)), "fifo dropped",
                 "isolated/pipe"),
    }


CASES = _cases()
NEUTRALISED = _neutralised()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        (out / f"{name}.tar").write_bytes(case.data)
    for name, (data, _w, _m) in NEUTRALISED.items():
        (out / f"ok-{name}.tar").write_bytes(data)
    print(f"{len(CASES)} hostile + {len(NEUTRALISED)} neutralised archives in {out}")
