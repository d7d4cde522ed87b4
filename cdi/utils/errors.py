"""The one exception type for problems the user can fix, and the listing of many items in its messages."""

from __future__ import annotations

from typing import Sequence

LISTED = 20  # items named in one error message before "... and N more"


class CDIError(Exception):
    """A user-facing error: bad input, missing weights, impossible request.

    The message says what is wrong and what to do about it. The command line
    prints it without a traceback and exits with status 2. Anything else that
    escapes is a bug in cdi.
    """


def listing(lines: Sequence[str]) -> str:
    """``lines`` indented by two spaces, one per line; after ``LISTED`` of them, "... and N more"."""
    shown = [f"  {line}" for line in lines[:LISTED]]
    if len(lines) > LISTED:
        shown.append(f"  ... and {len(lines) - LISTED} more")
    return "\n".join(shown)
