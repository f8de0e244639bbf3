"""Errors a user can fix.

They carry a one-line message that names the problem and what to do; front ends print it
(no traceback) and exit non-zero. `option` names the offending setting so a form can show the
message next to its field.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input: a missing folder, an unusable model, a clashing token, ..."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    def __str__(self) -> str:
        message = super().__str__()
        return f"--{self.option}: {message}" if self.option else message
