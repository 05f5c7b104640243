"""The FUSE wire protocol, as the kernel speaks it on /dev/fuse: the one place for its facts.

Everything here mirrors ``include/uapi/linux/fuse.h`` (protocol 7.x; the names in comments
are the header's). Requests arrive as ``fuse_in_header`` + an opcode-specific struct + (for
name-taking ops) NUL-terminated names; a reply is ``fuse_out_header`` + its struct, written
with ONE ``write(2)``; a notification is a reply with ``unique = 0`` and the notify code in
``error``. All integers are native-endian (``=`` formats: no padding, host order).

We speak minor ``OUR_MINOR`` (7.38: ``FUSE_INIT_EXT``/``flags2``, ``FUSE_EXPIRE_ONLY``); the
kernel adapts to the lower of its minor and ours.

Thread-safety: constants and immutable ``struct.Struct`` objects only.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7  # FUSE_KERNEL_VERSION
OUR_MINOR = 38      # FUSE_KERNEL_MINOR_VERSION of the layouts below
ROOT_ID = 1         # FUSE_ROOT_ID
MIN_READ_BUFFER = 8192  # FUSE_MIN_READ_BUFFER: a read(2) of /dev/fuse must offer this much

# --- opcodes (enum fuse_opcode) ---------------------------------------------------------
LOOKUP = 1
FORGET = 2           # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42    # no reply
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52
COPY_FILE_RANGE_64 = 53
# opcode -> name (for logs and statistics): every upper-case int defined above this line
OPCODE_NAMES = {v: k.lower() for k, v in dict(globals()).items()
                if k.isupper() and isinstance(v, int)
                and k not in ("KERNEL_VERSION", "OUR_MINOR", "ROOT_ID", "MIN_READ_BUFFER")}

# Everything that would change the tree: answered EROFS (the mount is MS_RDONLY too, so most
# never arrive; these are the ones a read-only superblock does not stop in the VFS).
MODIFYING = frozenset({SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE,
                       CREATE, SETXATTR, REMOVEXATTR, FALLOCATE, COPY_FILE_RANGE,
                       COPY_FILE_RANGE_64, RENAME2, TMPFILE, SETUPMAPPING})
NO_REPLY = frozenset({FORGET, BATCH_FORGET})

# --- INIT flags (fuse_init_in/out.flags; bits 32+ travel in flags2 with FUSE_INIT_EXT) ---
ASYNC_READ = 1 << 0            # FUSE_ASYNC_READ: several reads of one file in flight
EXPORT_SUPPORT = 1 << 4        # FUSE_EXPORT_SUPPORT (not used: no NFS export)
AUTO_INVAL_DATA = 1 << 12      # FUSE_AUTO_INVAL_DATA (not used: content never changes)
DO_READDIRPLUS = 1 << 13       # FUSE_DO_READDIRPLUS: attributes travel with the names
READDIRPLUS_AUTO = 1 << 14     # FUSE_READDIRPLUS_AUTO: the kernel picks plus when it pays
NO_OPEN_SUPPORT = 1 << 17      # FUSE_NO_OPEN_SUPPORT: ENOSYS to OPEN = never send OPEN again
PARALLEL_DIROPS = 1 << 18      # FUSE_PARALLEL_DIROPS: lookups/readdirs of one dir in parallel
MAX_PAGES = 1 << 22            # FUSE_MAX_PAGES: init_out.max_pages is honoured
CACHE_SYMLINKS = 1 << 23       # FUSE_CACHE_SYMLINKS: readlink results in the page cache
NO_OPENDIR_SUPPORT = 1 << 24   # FUSE_NO_OPENDIR_SUPPORT: ENOSYS to OPENDIR likewise
INIT_EXT = 1 << 30             # FUSE_INIT_EXT: flags2 is meaningful
HAS_EXPIRE_ONLY = 1 << 35      # FUSE_HAS_EXPIRE_ONLY (flags2 bit 3)

WANTED = (ASYNC_READ | DO_READDIRPLUS | READDIRPLUS_AUTO | NO_OPEN_SUPPORT | PARALLEL_DIROPS
          | MAX_PAGES | CACHE_SYMLINKS | NO_OPENDIR_SUPPORT)
MAX_PAGES_WANTED = 256  # 1 MiB per READ (the kernel clamps to its fuse_max_pages_limit)

# --- open reply flags (fuse_open_out.open_flags) ----------------------------------------
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3  # what a no-open(dir) file gets by default, too (fs/fuse/file.c)

# --- notifications (enum fuse_notify_code) ----------------------------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
EXPIRE_ONLY = 1 << 0  # FUSE_EXPIRE_ONLY in fuse_notify_inval_entry_out.flags

INT_REQ_BIT = 1 << 0  # FUSE_INT_REQ_BIT: set in the unique of an INTERRUPT request

# --- struct layouts ---------------------------------------------------------------------
IN_HEADER = struct.Struct("=IIQQIIIHH")   # fuse_in_header: len opcode unique nodeid uid gid
                                          # pid total_extlen padding (40 bytes)
OUT_HEADER = struct.Struct("=IiQ")        # fuse_out_header: len error unique (16)
INIT_IN = struct.Struct("=IIIII")         # fuse_init_in: major minor max_readahead flags
                                          # flags2 (then 11 unused u32 we ignore)
INIT_OUT = struct.Struct("=IIIIHHIIHHI7I")  # fuse_init_out (64): major minor max_readahead
                                          # flags max_background congestion_threshold
                                          # max_write time_gran max_pages map_alignment
                                          # flags2 unused[7]
ATTR = "QQQQQQIIIIIIIIII"                 # fuse_attr (88): ino size blocks atime mtime ctime
                                          # atimensec mtimensec ctimensec mode nlink uid gid
                                          # rdev blksize flags
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR)  # fuse_entry_out (128): nodeid generation
                                          # entry_valid attr_valid entry_valid_nsec
                                          # attr_valid_nsec attr
ATTR_OUT = struct.Struct("=QII" + ATTR)   # fuse_attr_out (104): attr_valid attr_valid_nsec
                                          # dummy attr
FORGET_IN = struct.Struct("=Q")           # fuse_forget_in: nlookup
BATCH_FORGET_IN = struct.Struct("=II")    # fuse_batch_forget_in: count dummy
FORGET_ONE = struct.Struct("=QQ")         # fuse_forget_one: nodeid nlookup
READ_IN = struct.Struct("=QQIIQII")       # fuse_read_in (40): fh offset size read_flags
                                          # lock_owner flags padding
OPEN_IN = struct.Struct("=II")            # fuse_open_in: flags open_flags
DIRENT = struct.Struct("=QQII")           # fuse_dirent (24 + name, padded to 8): ino off
                                          # namelen type
KSTATFS = struct.Struct("=QQQQQIIII6I")   # fuse_kstatfs (80) = fuse_statfs_out
INTERRUPT_IN = struct.Struct("=Q")        # fuse_interrupt_in: unique
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")    # parent namelen flags (then name + NUL)
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")    # ino off len (len <= 0: to the end)

# FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t): a new /dev/fuse fd on the same connection
# (not used: one reader thread, see docs/concurrency.md).
DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0


def dirent_size(namelen: int, plus: bool) -> int:
    """Bytes one entry takes in a READDIR(PLUS) reply (FUSE_DIRENT_ALIGN: 8)."""
    n = DIRENT.size + namelen
    return (n + 7 & ~7) + (ENTRY_OUT.size if plus else 0)
