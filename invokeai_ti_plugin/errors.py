"""Errors a user can fix.

They carry a one-line message that names the problem and what to do; front ends print it
(no traceback) and exit non-zero. `option` names the offending setting so a form can show the
message next to its field.
"""

from __future__ import annotations


def option_message(option: str | None, text: str) -> str:
    """`--option: text`, or the text alone for a problem of no single option: how every front
    end names the option a message is about."""
    return f"--{option}: {text}" if option else text


class UserInputError(Exception):
    """Bad input: a missing folder, an unusable model, a clashing token, ...

    `problems` holds each message by the option it is about ("" for none), for a form to show
    beside its fields; the text is all of them in one line."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option
        self.problems: dict[str, str] = {option or "": message}

    @classmethod
    def of_options(cls, problems: dict[str, str]) -> UserInputError:
        """One error for the problems of several options, by option name ("" for none)."""
        error = cls("; ".join(option_message(option, text) for option, text in problems.items()))
        error.problems = dict(problems)
        return error

    def __str__(self) -> str:
        return "; ".join(option_message(option, text) for option, text in self.problems.items())
