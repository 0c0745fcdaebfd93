"""The scripts' shared entry point: an expected error is one line on stderr and exit status 1, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXPECTED_ERRORS = (ValueError, FileNotFoundError)  # bad input, named by the message (file, record, key, value)


def run_script(main: Callable, argv: list[str] | None = None,
               errors: tuple[type[BaseException], ...] = EXPECTED_ERRORS) -> None:
    """main(argv); one of `errors` prints 'error: MESSAGE' to stderr and exits 1."""
    try:
        main(argv)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
