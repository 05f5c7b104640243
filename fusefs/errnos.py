"""The errno table both FUSE engines answer with, without any engine: no pyfuse3 here.

``Errno`` is an expected answer (ENOENT, ENOTDIR, ...) raised by the engine-neutral code
(fusefs/tree.py), answered as is without a log line. Any other exception maps to an errno
through ``ERRNO`` (looked up along its MRO, most specific class first); an ``OSError``
keeps its errno; anything else is a bug: logged with its traceback, answered ``EIO``.
``IntegrityError`` (a missing or corrupt blob) is logged as an ERROR line naming the blob,
then ``EIO``: a reader sees an I/O error, never wrong bytes.

The raw engine (fusefs/rawfs.py) imports only this module, so it starts on a machine where
pyfuse3 cannot be imported (tests/test_mount_no_pyfuse3.py); the pyfuse3 engine's
``FUSEError`` wrapping is fusefs/errors.py.

Thread-safety: stateless.
"""

from __future__ import annotations

import errno
import logging

from jbl.store import errors as E

log = logging.getLogger("jbl.fusefs")

# Store error -> errno. Looked up by walking the exception's MRO, so subclasses inherit.
ERRNO: dict[type[BaseException], int] = {
    E.NotFound: errno.ENOENT,         # a version/entry gone between lookup and use
    E.IntegrityError: errno.EIO,      # missing/corrupt blob: never serve wrong bytes
    E.PermissionDenied: errno.EACCES,
    E.StoreBusy: errno.EAGAIN,        # a lock we could not get: the caller may retry
    E.UsageError: errno.EINVAL,
    E.StoreError: errno.EIO,          # the index itself is unusable
    E.JblError: errno.EIO,
}


class Errno(Exception):
    """An expected error answer (ENOENT, ENOTDIR, ...): answered as is, no log line."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def errno_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in ERRNO:
            return ERRNO[cls]
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def logged_errno(exc: BaseException, what: str) -> int:
    """The errno to answer for ``exc``, logging what needs a log line (both engines)."""
    if isinstance(exc, Errno):
        return exc.code
    code = errno_for(exc)
    if isinstance(exc, E.IntegrityError):
        log.error("%s: %s", what, exc)
    elif isinstance(exc, (E.JblError, OSError)):
        log.warning("%s: %s", what, exc)
    else:
        log.exception("%s: unexpected error, answering EIO", what)
    return code
