"""User errors end a command with one line on stderr and exit status 2; bugs keep their traceback.

A user error is something the person at the terminal can fix: a missing path, an unknown model
URI, an empty bucket, a bad flag or config value. Library code raises ``ValueError`` (bad value),
``FileNotFoundError`` (missing input) or ``UserError``; a stage's ``main`` runs inside
``user_errors(prog)``, which turns those into ``prog: message`` and exit status 2.
``W2SVD_DEBUG=1`` shows the traceback as well. Anything else is a bug and propagates.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator

EXIT_USER_ERROR = 2
DEBUG_ENV = "W2SVD_DEBUG"


class UserError(Exception):
    """A problem with the user's input that a one-line message explains."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn user errors raised inside the block into one line on stderr and ``SystemExit(2)``."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_main(prog: str, body) -> int:
    """``body()`` → its exit status, with user errors reported as one line (status 2).

    MLflow's and Alembic's INFO logs (database migrations on a store's first use) are lowered to
    warnings: a command's stderr is for what the user must read."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with user_errors(prog):
            return int(body() or 0)
    except SystemExit as done:
        return int(done.code) if isinstance(done.code, int) else 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: … (see --help)``) instead of the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
