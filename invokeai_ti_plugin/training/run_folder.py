"""The output folder of a training run: every path in it, whose it is, and who is using it.

Users name output folders themselves, so a run must never lose their files. A folder becomes
ours when a run claims it: a marker file of ours then lists every path our runs wrote there (a
manifest), and a run only ever replaces or deletes paths in that list. A folder holding anything
else is refused unless --overwrite, and even then a run writes only beside its files. One run at
a time uses a folder: it holds a lock on a lock file of ours, which dies with its process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import TracebackType

from ..atomic_files import write_json_atomically
from ..errors import UserInputError
from ..file_lock import try_lock, unlock
from .embedding_file import EMBEDDING_FILENAME

MARKER_FILENAME = ".invokeai-ti-run.json"
LOCK_FILENAME = ".invokeai-ti-run.lock"
# what was trained, beside the embedding: here, and beside its copy in ROOT/embeddings/
SUMMARY_FILENAME = "embedding.json"
# the embedding of the lowest evaluation loss (--save_best), here and in each checkpoint
BEST_EMBEDDING_FILENAME = "learned_embeds-best.safetensors"
_MARKER_KIND = "invokeai-ti run folder"


class RunFolder:
    """One output folder. Path properties are pure; `claim` (main process) locks the folder
    for this run and marks it ours until the run ends (`release`, or leaving the `with`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: int | None = None
        self._owned: set[str] = set()

    # --- the layout of every run folder ---
    @property
    def embedding(self) -> Path:
        return self.path / EMBEDDING_FILENAME

    @property
    def best_embedding(self) -> Path:
        return self.path / BEST_EMBEDDING_FILENAME

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILENAME

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.path / "logs" / "train.log"

    @property
    def history(self) -> Path:
        return self.path / "logs" / "history.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (--report_to tensorboard)."""
        return self.path / "logs" / "tensorboard"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def newest_sample(self) -> Path | None:
        """The latest sample grid, which front ends show while training."""
        grids = list(self.samples.glob("*.png"))
        return max(grids, key=lambda path: path.stat().st_mtime_ns) if grids else None

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def pipeline(self) -> Path:
        return self.path / "pipeline"

    @property
    def marker(self) -> Path:
        return self.path / MARKER_FILENAME

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILENAME

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def partial(self, path: Path) -> Path:
        """Where a folder is written whole before it is renamed to `path`."""
        return path.with_name(f".{path.name}.partial")

    def sample(self, step: int) -> Path:
        return self.samples / f"step-{step:06d}.png"

    def _layout(self) -> list[Path]:
        """The names a run writes or replaces, whose clash with a foreign file is refused."""
        return [
            self.embedding,
            self.best_embedding,
            self.summary,
            self.checkpoints,
            self.train_log,
            self.history,
            self.tensorboard,
            self.samples,
            self.loss_plot,
            self.pipeline,
        ]

    # --- ownership and the lock ---
    def check_usable(self, overwrite: bool) -> None:
        """Refuse, before any work or write, a folder that is busy or not ours to write in."""
        self._refuse_if_busy()
        self._refuse_foreign(overwrite)

    def claim(self, overwrite: bool) -> None:
        """Lock the folder for this run, check it again, and mark it ours (main process only)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise UserInputError(
                f"cannot write to {self.path} ({error.strerror or error}); choose a writable "
                "--output_dir",
                option="output_dir",
            ) from error
        if not try_lock(lock):
            os.close(lock)
            raise self._busy()
        self._lock = lock
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())
        self._refuse_foreign(overwrite)
        self._owned = (self._manifest() or set()) | {self._relative(p) for p in self._layout()}
        self._save_manifest()

    def release(self) -> None:
        """End this run's hold on the folder (a killed process's hold ends with it)."""
        if self._lock is not None:
            unlock(self._lock)
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def take(self, *paths: Path) -> None:
        """Record paths before writing them: new ones become ours, ours stay ours, and a
        foreign file in the way stops the run instead of being replaced (main process)."""
        new = [path for path in paths if self._relative(path) not in self._owned]
        for path in new:
            if path.exists() or path.is_symlink():
                raise UserInputError(
                    f"{path} was not written by invokeai-ti and is left alone; move it away or "
                    "choose another --output_dir",
                    option="output_dir",
                )
        if new:
            self._owned.update(self._relative(path) for path in new)
            self._save_manifest()

    def owned_in(self, folder: Path) -> list[Path]:
        """The paths directly in `folder` that our runs wrote."""
        return sorted(
            self.path / name for name in self._owned if (self.path / name).parent == folder
        )

    def discard(self, *paths: Path) -> None:
        """Delete paths our runs wrote; anything else stays. Their names stay ours."""
        for path in paths:
            if self._relative(path) not in self._owned:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def _manifest(self) -> set[str] | None:
        """The paths our runs wrote here, or None when the folder is not ours."""
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
            return {str(name) for name in data["paths"]} if data["kind"] == _MARKER_KIND else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserInputError(
                f"{self.marker} is unreadable ({error}); choose another --output_dir",
                option="output_dir",
            ) from error

    def _save_manifest(self) -> None:
        write_json_atomically(self.marker, {"kind": _MARKER_KIND, "paths": sorted(self._owned)})

    def _refuse_foreign(self, overwrite: bool) -> None:
        if not self.path.is_dir():
            return
        owned = self._manifest()
        if owned is None:
            ours = {MARKER_FILENAME, LOCK_FILENAME}
            if not overwrite and any(e.name not in ours for e in self.path.iterdir()):
                raise UserInputError(
                    f"{self.path} holds files but is not an invokeai-ti output folder (no "
                    f"{MARKER_FILENAME}); choose a new or empty --output_dir, or pass --overwrite "
                    "to train beside those files (they are never replaced)",
                    option="output_dir",
                )
            owned = set()
        clashes = [
            self._relative(path)
            for path in self._layout()
            if (path.exists() or path.is_symlink()) and self._relative(path) not in owned
        ]
        if clashes:
            raise UserInputError(
                f"{self.path} holds {', '.join(clashes)}, not written by invokeai-ti, where a run "
                "writes its own; move them away or choose another --output_dir",
                option="output_dir",
            )

    def _refuse_if_busy(self) -> None:
        """A quick look at the lock, so a second run stops before it loads a model."""
        try:
            probe = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return  # no lock file (yet): nobody holds it; `claim` decides for certain
        try:
            if not try_lock(probe, shared=True):
                raise self._busy()
            unlock(probe)
        finally:
            os.close(probe)

    def _busy(self) -> UserInputError:
        try:
            holder = self.lock_file.read_text().strip()
        except OSError:
            holder = ""
        who = f" (process {holder})" if holder.isdigit() else ""
        return UserInputError(
            f"another run is training in {self.path}{who}; wait for it to end or choose "
            "another --output_dir",
            option="output_dir",
        )
