"""The one opening and closing of every command-line tool (``python -m ingest``, ``ingest.reembed``,
``ingest.duplicates``, ``ingest.evaluate``, ``models``).

Exit codes, the same for all: 0 done; 1 the work failed (a domain error: its message, and what to do
next); 2 a usage error (bad settings, a missing folder, options that do not go together); 130
interrupted (Ctrl-C). Tracebacks are for bugs only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pydantic import ValidationError

from bento.core.config import Settings, get_settings
from bento.core.errors import SearchError

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """The command line asks for something that cannot be done as asked (exit 2, no traceback)."""


def run_tool(
    name: str, body: Callable[[Settings], int], *, verbose: bool = True, on_failure: str = ""
) -> int:
    """Set up logging, read the settings, run ``body`` with them and turn its errors into exit codes.
    ``on_failure``: advice printed under a domain error's message (e.g. "rerun the same command")."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Libraries' warnings (torch's deprecations and tracer notes while a model is traced) are for this
    # project's developers, not for the person running the command: into the log at DEBUG only.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    try:
        settings = get_settings()
    except (ValidationError, ValueError) as exc:  # a bad value, or an unknown RIS_* variable
        print(f"{name}: the settings are invalid: {exc}", file=sys.stderr)  # noqa: T201 (a CLI's own output)
        return USAGE
    try:
        return body(settings)
    except UsageError as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # noqa: T201
        return USAGE
    except SearchError as exc:
        print(f"{name} failed: {exc.message}", file=sys.stderr)  # noqa: T201
        if on_failure:
            print(on_failure, file=sys.stderr)  # noqa: T201
        return FAILED
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)  # noqa: T201
        return INTERRUPTED
