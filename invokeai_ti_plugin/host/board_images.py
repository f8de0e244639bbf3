"""A board's images as a training folder on the server, for the web UI's training node.

The trainer reads a folder, and a resumed run checks that it sees the very same image files, so
the board is mirrored into a folder this plugin owns: the stored files are copied byte for byte
(never re-encoded), and a later export of the same board leaves them as they are. A folder the
user filled is never written into: the export then goes to a sibling folder of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..atomic_files import write_atomically, write_json_atomically
from ..config import trigger_folders
from ..errors import UserInputError

EXPORT_MARKER = ".invokeai-ti-board.json"  # what an export wrote: the board, its files
SEPARATE_SUFFIX = "-board"  # where a board goes when the default folder holds the user's files


def board_folder(root: Path, trigger: str) -> Path:
    """ROOT/text-inversion-training-data/<trigger>/ when it is absent, empty or an earlier
    export; else ROOT/text-inversion-training-data/<trigger>-board/."""
    default = trigger_folders(root, trigger)[0]
    if _is_ours(default):
        return default
    separate = default.with_name(default.name + SEPARATE_SUFFIX)
    if not _is_ours(separate):
        raise UserInputError(
            f"{default} and {separate} hold pictures of your own, and a board's images are "
            "never written among them; pick that folder as train_data_dir instead of a board, "
            "or move it away",
            option="board",
        )
    return separate


def export_board(root: Path, trigger: str, board_name: str, images: dict[str, Path]) -> Path:
    """Mirror the board (image name -> its stored file) into `board_folder`: copy what is new
    or changed, remove what an earlier export put there and the board no longer holds."""
    if not images:
        raise UserInputError(
            f"board {board_name!r} holds no images; add 3-20 pictures of your subject to it",
            option="board",
        )
    folder = board_folder(root, trigger)
    earlier = set(_exported(folder))
    for name in sorted(earlier - images.keys()):
        (folder / Path(name).name).unlink(missing_ok=True)
    for name, source in sorted(images.items()):
        target = folder / Path(name).name
        if target.exists() and target.read_bytes() == source.read_bytes():
            continue
        write_atomically(target, lambda temp, source=source: shutil.copyfile(source, temp))
    write_json_atomically(folder / EXPORT_MARKER, {"board": board_name, "images": sorted(images)})
    return folder


def _exported(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / EXPORT_MARKER).read_text())["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _is_ours(folder: Path) -> bool:
    """Absent, empty, or written by an export."""
    return not folder.exists() or (folder / EXPORT_MARKER).is_file() or not any(folder.iterdir())
