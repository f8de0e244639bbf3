"""Write files so that a crash or Ctrl-C never leaves a half-written one behind.

Content goes to a temporary sibling first and is renamed into place in one step; readers see
the old file or the new one, never a torn mix. The sibling is created with the user's umask
(as `open` would), not `mkstemp`'s 0600, so an InvokeAI running as another user can read it.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserInputError

# no space, no quota, or past the file-size limit (ulimit -f): the same remedy for each
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextmanager
def disk_full_explained(path: Path) -> Iterator[None]:
    """A full disk while writing `path` becomes one line naming it and what to do, instead of
    a traceback; other errors pass through unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        raise UserInputError(
            f"the disk is full: could not write {path} ({error.strerror}); free some space on "
            "that disk and run again (a stopped training continues with "
            "--resume_from_checkpoint latest; what was saved before is intact)"
        ) from error


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temp_path)`, then move the finished file onto `path`."""
    with disk_full_explained(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_path = _new_sibling(path)
        try:
            write(temp_path)
            os.replace(temp_path, path)
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise


def _new_sibling(path: Path) -> Path:
    """A new, empty, uniquely named hidden file beside `path`, with the umask's mode."""
    while True:
        temp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temp_path


def write_json_atomically(path: Path, data: Any) -> None:
    write_atomically(
        path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    )
