"""Which files in ROOT/embeddings/ have been InvokeAI embeddings, and with what content.

InvokeAI's model manager deletes a model's files only inside ROOT/models/; for an embedding in
ROOT/embeddings/ its Delete button only removes the record. The start-up scan, which registers
files that arrived while InvokeAI was down, would then bring every deleted embedding back at the
next start. This list tells the two apart: a file listed with the content it has now was an
embedding the user deleted, and stays unregistered; a new file, or new content at a listed
path, arrived and is registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..atomic_files import write_json_atomically
from ..config import embeddings_folder
from ..errors import UserInputError
from ..file_lock import try_lock, unlock

logger = logging.getLogger(__name__)

LIST_FILENAME = ".invokeai-ti-registered.json"  # hidden: the scan skips it
LOCK_FILENAME = ".invokeai-ti-registered.lock"
LOCK_WAIT_SECONDS = 10.0  # a registration's read-merge-write takes milliseconds


def _fingerprint(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


class RegisteredFiles:
    """The list in ROOT/embeddings/, read once; `save` adds what this process added to the list
    as it is on disk then, so that a run registering beside a start-up scan (or another run)
    loses neither's files. A list that is missing or unreadable counts as empty: at worst a
    deleted embedding comes back, as it did before the list existed."""

    def __init__(self, root: Path) -> None:
        self.folder = embeddings_folder(root)
        self.path = self.folder / LIST_FILENAME
        self._entries = self._read()
        self._added: dict[str, str] = {}

    def _read(self) -> dict[str, str]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {
            key: value
            for key, value in entries.items()
            if isinstance(key, str) and isinstance(value, str)
        }

    def _key(self, file: Path) -> str | None:
        """The file's path inside ROOT/embeddings/, links not followed: a linked file, or a
        file in a linked folder, lies elsewhere but is listed where the scan finds it. The root
        may be named through a link in one process and not in another, so the path is taken
        inside either name of the folder. None for a file elsewhere."""
        absolute = Path(os.path.abspath(file))
        for folder in (self.folder, self.folder.resolve()):
            if absolute.is_relative_to(os.path.abspath(folder)):
                return absolute.relative_to(os.path.abspath(folder)).as_posix()
        try:
            return file.resolve().relative_to(self.folder.resolve()).as_posix()
        except ValueError:
            return None

    def add(self, file: Path) -> None:
        """`file` is (now) an embedding InvokeAI knows, with the content it has now."""
        key = self._key(file)
        if key is not None and file.is_file():
            self._entries[key] = self._added[key] = _fingerprint(file)

    def was_registered(self, file: Path) -> bool:
        """`file`, with its present content, was registered before (its record since deleted)."""
        key = self._key(file)
        return key in self._entries and self._entries[key] == _fingerprint(file)

    def save(self) -> None:
        """Add this process's files to the list on disk, and drop the files that are gone, if
        that changes it. Best effort: the embeddings are registered either way, and a list that
        cannot be written (a full disk, no permission) only lets a deletion be undone at the
        next start."""
        if not self.folder.is_dir():
            return
        with list_lock(self.folder):
            on_disk = self._read()
            merged = {
                key: value
                for key, value in {**on_disk, **self._added}.items()
                if (self.folder / key).is_file()
            }
            if merged == on_disk:
                return
            try:
                write_json_atomically(self.path, dict(sorted(merged.items())))
            except (OSError, UserInputError) as error:
                logger.warning(
                    "could not write %s (%s): an embedding deleted in InvokeAI's model manager "
                    "may be registered again at its next start",
                    self.path,
                    error,
                )
                return
        self._entries, self._added = merged, {}


@contextmanager
def list_lock(folder: Path) -> Iterator[None]:
    """Held from reading the list to writing it back, so that two processes registering at
    once (a start-up scan and a run, two runs) cannot write over each other's additions. A
    lock that cannot be had (a read-only folder, a holder stuck for LOCK_WAIT_SECONDS) is gone
    without: the list is best effort, and registering must never hang on it."""
    try:
        handle = os.open(folder / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not (locked := try_lock(handle)) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield
        finally:
            if locked:
                unlock(handle)
    finally:
        os.close(handle)


def note_registered(root: Path, file: Path) -> None:
    """Add one just-registered file to the list of ROOT's embeddings."""
    registered = RegisteredFiles(root)
    registered.add(file)
    registered.save()
