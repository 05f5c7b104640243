"""The one boundary between jbl errors and the kernel: the errno table and the handler guard.

pyfuse3 handlers may raise only ``FUSEError``; anything else takes the mount down. Every
handler in ``ops.py`` is wrapped by ``guarded``: a ``FUSEError`` passes through, an ``Errno``
(an expected answer, raised by code shared by both engines: fusefs/tree.py) becomes its
``FUSEError`` without a log line, a jbl error
maps to an errno through ``ERRNO`` (most specific class first), an ``OSError`` keeps its
errno, and anything else is a bug: logged with its traceback, answered with ``EIO``.
``IntegrityError`` (a missing or corrupt blob) is logged as an ERROR line naming the blob,
then ``EIO``: a reader sees an I/O error, never wrong bytes.

Thread-safety: stateless.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, ParamSpec, TypeVar

import pyfuse3
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


P = ParamSpec("P")
T = TypeVar("T")


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


def translate(exc: BaseException, what: str) -> pyfuse3.FUSEError:
    """The FUSEError to answer for ``exc`` (logging what needs a log line)."""
    return pyfuse3.FUSEError(logged_errno(exc, what))


def guarded(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Wrap an async handler so that only FUSEError ever leaves it."""
    what = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Errno as e:
            raise pyfuse3.FUSEError(e.code) from None
        except Exception as e:
            raise translate(e, what) from None

    return wrapper


async def erofs(*_args: object, **_kw: object) -> NoReturn:
    """Handler for every modifying operation (assigned as a method): the tree is read-only.
    (``NoReturn`` makes it a valid override of every pyfuse3 handler, whatever it returns.)"""
    raise pyfuse3.FUSEError(errno.EROFS)
