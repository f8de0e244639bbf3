"""Write files so that a crash or Ctrl-C never leaves a half-written one behind.

Content goes to a temporary sibling first and is renamed into place in one step; readers see
the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temp_path)`, then move the finished file onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".partial", dir=path.parent
    )
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    write_atomically(
        path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    )
