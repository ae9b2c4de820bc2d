"""User-facing errors: one line that names the cause and the fix."""

from __future__ import annotations


class UsfmaeError(Exception):
    """An error caused by the user's input, shown as ``usfmae: error: <cause>; <fix>`` (exit code 2).

    Args:
        cause: what went wrong, naming the file or value involved.
        fix: what the user can do about it.
    """

    exit_code = 2

    def __init__(self, cause: str, fix: str = "") -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}; {fix}" if fix else cause)
