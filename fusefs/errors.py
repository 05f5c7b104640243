"""The pyfuse3 engine's error boundary: only ``FUSEError`` may leave a handler.

pyfuse3 handlers may raise only ``FUSEError``; anything else takes the mount down. Every
handler in ``ops.py`` is wrapped by ``guarded``: a ``FUSEError`` passes through, an ``Errno``
becomes its ``FUSEError`` without a log line, anything else is answered with the errno
fusefs/errnos.py gives it (that module holds the table and the logging rules, shared with
the raw engine, and does not import pyfuse3).

Thread-safety: stateless.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, ParamSpec, TypeVar

import pyfuse3

from .errnos import Errno, logged_errno

P = ParamSpec("P")
T = TypeVar("T")


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
