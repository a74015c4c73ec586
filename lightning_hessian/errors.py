"""Errors in the user's input, and how the console scripts report them.

A mistake in what the user gave (a setting, a command-line value, a config, a data file) is
reported by every console script (``hessian-train``, ``hessian-sweep``, ``hessian-report``,
``hessian-landscape``) as one line ``PROG: error: MESSAGE`` on standard error with exit status 2;
a bug in the package or a library keeps its traceback. The package's checks raise
:class:`UserInputError` (a ``ValueError``, so ``except ValueError`` keeps working) or
:class:`InputNotFoundError` (also a ``FileNotFoundError``), with a message that names the bad
value and the fix.

Checks that still raise a plain ``ValueError`` count as user errors too when the ``raise``
statement is in the package's own code (the argument checks of the callbacks, for example): see
:func:`is_user_error`. A ``ValueError`` raised inside torch, Lightning or NumPy is not one.
"""

from __future__ import annotations

import linecache
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["InputNotFoundError", "UserInputError", "format_user_error", "is_user_error", "run_console_script"]

_PACKAGE_DIR = Path(__file__).resolve().parent
_Result = TypeVar("_Result")


class UserInputError(ValueError):
    """The user's input is wrong (a setting, a command-line value, a file's content); the message
    names the bad value and how to fix it."""


class InputNotFoundError(FileNotFoundError, UserInputError):
    """A file or directory that the user's input names does not exist; the message says where it
    was looked for and how to get it."""


def _raised_by_package_check(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a ``raise`` statement in this package."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    innermost = frames[-1]
    try:
        in_package = Path(innermost.filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    line = linecache.getline(innermost.filename, innermost.lineno or 0).lstrip()
    return in_package and line.startswith("raise")


def is_user_error(error: BaseException, extra_types: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``error`` reports a mistake in the user's input rather than a bug.

    True for :class:`UserInputError` (and :class:`InputNotFoundError`), for instances of
    ``extra_types``, for a ``ValueError`` raised by a ``raise`` statement of this package's own
    code (its argument checks), and for a ``ValueError`` whose ``__cause__`` is one of these (a
    library that re-raises the package's check).

    Returns:
        ``True`` for a user error, ``False`` for anything else.
    """
    if isinstance(error, (UserInputError, *extra_types)):
        return True
    if not isinstance(error, ValueError):
        return False
    if _raised_by_package_check(error):
        return True
    return error.__cause__ is not None and is_user_error(error.__cause__, extra_types)


def run_console_script(
    prog: str, function: Callable[[], _Result], *, extra_types: tuple[type[BaseException], ...] = ()
) -> _Result | int:
    """Call ``function`` (the body of a console script's ``main``); on a user error print
    ``PROG: error: MESSAGE`` (one line) to standard error and return 2.

    Only ``ValueError`` (with its subclasses :class:`UserInputError`, :class:`InputNotFoundError`)
    and ``extra_types`` are caught, and of these only what :func:`is_user_error` accepts; anything
    else (a bug) propagates with its traceback.

    Returns:
        What ``function`` returns, or 2 (the exit status) after a user error.
    """
    caught: tuple[type[BaseException], ...] = (ValueError, *extra_types)
    try:
        return function()
    except caught as error:
        if not is_user_error(error, extra_types):
            raise
        print(f"{prog}: error: {format_user_error(error, prog)}", file=sys.stderr, flush=True)
        return 2


def format_user_error(error: BaseException, prog: str = "") -> str:
    """``error``'s message on one line, without a leading ``PROG:`` that the message already has."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if prog and message.startswith(f"{prog}: "):
        message = message[len(prog) + 2 :]
    # FileNotFoundError(errno, text, filename) prints as "[Errno 2] text: 'name'": keep it short.
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return message or type(error).__name__
