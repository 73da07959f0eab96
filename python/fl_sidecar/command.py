"""What every people-facing subcommand shares: error reporting and exit statuses.

Exit statuses: 0 success, 1 the operation failed (the reason on stderr),
2 bad usage (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from fl_sidecar.errors import FlSidecarError, SidecarError

__all__ = ["fail", "guarded"]


def fail(command: str, message: str, status: int = 1) -> int:
    """Print ``fl-sidecar COMMAND: error: MESSAGE`` on stderr; returns ``status``."""
    print(f"fl-sidecar {command}: error: {message}", file=sys.stderr)
    return status


def guarded(
    command: str, body: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """``body`` with its errors turned into a message on stderr and an exit status.

    The library's errors and ``OSError`` give 1, Ctrl-C gives 130; anything
    else is a bug and propagates with its traceback.
    """

    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except KeyboardInterrupt:
            print(f"\nfl-sidecar {command}: interrupted", file=sys.stderr)
            return 130
        except SidecarError as exc:
            return fail(command, f"{exc}")
        except FlSidecarError as exc:
            return fail(command, f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return fail(command, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))

    return run
