"""What the command-line tools print as their result (the settings table, a search's hits)."""

from __future__ import annotations

import sys


def print_result(text: str) -> int:
    """Print ``text`` and end quietly when the reader stops early (`ris settings | head`): no BrokenPipe
    traceback, and no second error when the interpreter flushes stdout at exit. Returns exit code 0."""
    try:
        print(text)  # noqa: T201 (a command's output)
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stdout = None  # type: ignore[assignment]  # nothing more can be written
    return 0
