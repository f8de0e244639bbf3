"""A lock on an open file that ends with its process: `flock` on Linux and macOS,
`msvcrt.locking` on Windows, which has no `fcntl` (InvokeAI runs on all three).

Windows locks byte ranges, exclusively, and a locked byte cannot be read by anyone else; so there
the lock is on one byte far past the file's content, which stays readable (the holder's process
id), and a shared lock is an exclusive one.
"""

from __future__ import annotations

import os
import sys

if sys.platform == "win32":
    import msvcrt

    _LOCKED_BYTE = 2**30  # past any content; Windows may lock beyond the end of a file

    def _lock_byte(fd: int, mode: int) -> bool:
        position = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, mode, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, position, os.SEEK_SET)
        return True

    def try_lock(fd: int, *, shared: bool = False) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        return _lock_byte(fd, msvcrt.LK_NBLCK)

    def unlock(fd: int) -> None:
        _lock_byte(fd, msvcrt.LK_UNLCK)

else:
    import fcntl

    def try_lock(fd: int, *, shared: bool = False) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
