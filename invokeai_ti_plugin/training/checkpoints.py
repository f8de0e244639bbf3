"""Resumable checkpoints: everything needed to continue exactly where a run stopped.

A checkpoint holds the learned vectors, optimizer and LR-schedule state, the step, and each
process's random-number and data-order state, so a resumed run follows the very path the
uninterrupted run would have. Folders are completed under a temporary name and renamed, so a
checkpoint that exists is whole. Pickled parts are read with `weights_only=True`.

A checkpoint can still be damaged afterwards (a disk fault, a hand edit, a hostile folder): each
part is checked as it is loaded, `latest` falls back to the newest intact checkpoint, and a named
one that is damaged is refused in one line. It also records the images it was made with (its
data order indexes them), so a changed folder is named instead of crashing or training on the
wrong pictures.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import disk_full_explained, write_json_atomically
from ..errors import UserInputError
from .embedding_file import (
    EMBEDDING_FILENAME,
    EMBEDDING_KEY,
    MAX_EMBEDDING_BYTES,
    SDXL_KEYS,
    EmbeddingVectors,
    declared_size,
    read_embedding_vectors,
    save_vectors,
)
from .examples import ExampleSampler
from .images import TrainingImage
from .run_folder import BEST_EMBEDDING_FILENAME, RunFolder

STATE_FILENAME = "trainer_state.json"
OPTIMIZER_FILENAME = "optimizer.pt"
SCHEDULER_FILENAME = "lr_scheduler.pt"
# what trainer_state.json must hold for a run to continue from it, and of which type
_FACT_TYPES: dict[str, type] = {
    "step": int,
    "seed": int,
    "placeholder_token": str,
    "num_vectors": int,
    "token_dimension": int,
    "num_processes": int,
    "images": dict,
}

logger = logging.getLogger(__name__)


def checkpoints_root(output_dir: Path) -> Path:
    return RunFolder(output_dir).checkpoints


def _rng_filename(process_index: int) -> str:
    return f"random_state_{process_index}.pt"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        folder
        for folder in root.glob("checkpoint-*")
        if folder.name.removeprefix("checkpoint-").isdigit() and (folder / STATE_FILENAME).is_file()
    ]
    return sorted(found, key=lambda folder: int(folder.name.removeprefix("checkpoint-")))


def resume_hint(output_dir: Path) -> str:
    """How a run that failed now can go on: from its last checkpoint, if it saved one."""
    found = list_checkpoints(output_dir)
    if not found:
        return " (no checkpoint was saved before it)"
    return (
        f"; add --resume_from_checkpoint latest to continue from the last checkpoint before it, "
        f"{found[-1]}"
    )


@dataclass
class TrainingSnapshot:
    """The shared (process-independent) state of a run at one step."""

    step: int
    vectors: dict[str, torch.Tensor]  # per text encoder, keyed as in the embedding file
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    facts: dict[str, Any]
    best_vectors: dict[str, torch.Tensor] | None = None  # of the lowest evaluation loss so far


def begin_checkpoint(temp: Path) -> None:
    """Create the empty temporary folder all processes write into (main process only); a
    leftover of an interrupted attempt is cleared first."""
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)


def save_process_state(temp: Path, process_index: int, state: dict[str, Any]) -> None:
    """Each process's own random and data-order state."""
    with _whole_or_absent(temp):
        _write_torch(state, temp / _rng_filename(process_index))


def finish_checkpoint(temp: Path, final: Path, snapshot: TrainingSnapshot) -> None:
    """Write the shared state, then publish `temp` as `final` (main process)."""
    with _whole_or_absent(temp):
        save_vectors(
            temp / EMBEDDING_FILENAME,
            EmbeddingVectors(snapshot.vectors),
            {"step": str(snapshot.step)},
        )
        if snapshot.best_vectors is not None:
            best = EmbeddingVectors(snapshot.best_vectors)
            save_vectors(temp / BEST_EMBEDDING_FILENAME, best, {})
        _write_torch(snapshot.optimizer, temp / OPTIMIZER_FILENAME)
        _write_torch(snapshot.lr_scheduler, temp / SCHEDULER_FILENAME)
        write_json_atomically(temp / STATE_FILENAME, {"step": snapshot.step, **snapshot.facts})
    if final.exists():
        shutil.rmtree(final)
    temp.rename(final)


@contextmanager
def _whole_or_absent(temp: Path) -> Iterator[None]:
    """A checkpoint that cannot be completed (a full disk, a second Ctrl-C) is removed, which
    also gives back the space it took; the earlier checkpoints stay as they are."""
    try:
        yield
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _write_torch(obj: Any, path: Path) -> None:
    """torch.save through Python's file writing: torch's own writer reports a full disk only as
    "file write failed", Python's as the OSError that says so."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with disk_full_explained(path):
        path.write_bytes(buffer.getbuffer())


class DamagedCheckpoint(Exception):
    """A checkpoint folder a run cannot continue from; the message names the part and why."""


@dataclass(frozen=True)
class ResumePoint:
    """An intact checkpoint, loaded: the shared state and every process's own."""

    folder: Path
    snapshot: TrainingSnapshot
    process_states: list[dict[str, Any]]  # by process index

    def process_state(self, process_index: int) -> dict[str, Any]:
        if process_index >= len(self.process_states):
            raise UserInputError(
                f"{self.folder} was saved by fewer processes than this run uses; resume with "
                "the same number of processes",
                option="resume_from_checkpoint",
            )
        return self.process_states[process_index]


def resume_point(output_dir: Path, requested: str | None) -> ResumePoint | None:
    """Where to continue: 'latest' is the newest intact checkpoint (damaged ones are skipped
    with a warning; None when there is none yet); a named folder must be intact."""
    if requested is None:
        return None
    if requested != "latest":
        folder = Path(requested).expanduser()
        if not (folder / STATE_FILENAME).is_file():
            raise UserInputError(
                f"{folder} is not a checkpoint folder (no {STATE_FILENAME}); pass 'latest' or a "
                f"folder under {checkpoints_root(output_dir)}",
                option="resume_from_checkpoint",
            )
        try:
            return load_checkpoint(folder)
        except DamagedCheckpoint as damage:
            raise UserInputError(
                f"cannot resume from {folder}: {damage}; pass 'latest' or another checkpoint",
                option="resume_from_checkpoint",
            ) from damage
    damaged: list[str] = []
    for folder in reversed(list_checkpoints(output_dir)):
        try:
            point = load_checkpoint(folder)
        except DamagedCheckpoint as damage:
            logger.warning("skipping the damaged checkpoint %s: %s", folder, damage)
            damaged.append(folder.name)
            continue
        if damaged:
            logger.warning("resuming from %s, the newest intact checkpoint", folder.name)
        return point
    if damaged:
        raise UserInputError(
            f"no checkpoint in {checkpoints_root(output_dir)} is intact ({', '.join(damaged)} "
            "damaged, see the warnings above); start over with --overwrite",
            option="resume_from_checkpoint",
        )
    return None


def load_checkpoint(folder: Path) -> ResumePoint:
    """Every part of a checkpoint, each checked; DamagedCheckpoint says which part is not."""
    facts = _read_part(folder / STATE_FILENAME, _read_facts)
    vectors = _read_part(folder / EMBEDDING_FILENAME, read_embedding_vectors)
    _check_vectors_fit(vectors, facts)
    best = None
    if (folder / BEST_EMBEDDING_FILENAME).is_file():
        best = _read_part(folder / BEST_EMBEDDING_FILENAME, read_embedding_vectors)
        _check_vectors_fit(best, facts, BEST_EMBEDDING_FILENAME)
    optimizer = _read_part(folder / OPTIMIZER_FILENAME, _read_torch, "state", "param_groups")
    lr_scheduler = _read_part(folder / SCHEDULER_FILENAME, _read_torch, "base_lrs")
    process_states = [
        _read_part(folder / _rng_filename(index), _read_torch)
        for index in range(facts["num_processes"])
    ]
    for index, state in enumerate(process_states):
        if not ExampleSampler.is_state(state, len(facts["images"])):
            raise DamagedCheckpoint(f"{_rng_filename(index)} holds no data-order state")
    step = facts.pop("step")
    snapshot = TrainingSnapshot(
        step, vectors.tensors, optimizer, lr_scheduler, facts, best and best.tensors
    )
    return ResumePoint(folder, snapshot, process_states)


def _read_part(path: Path, read: Callable[..., Any], *needed: str) -> Any:
    """`read(path, *needed)`; whatever goes wrong becomes the reason the checkpoint is damaged."""
    if not path.is_file():
        raise DamagedCheckpoint(f"{path.name} is missing")
    try:
        return read(path, *needed)
    except DamagedCheckpoint:
        raise
    except pickle.UnpicklingError as error:  # torch's own text suggests loading it unsafely
        raise DamagedCheckpoint(
            f"{path.name} is unreadable: damaged, or it holds Python objects that could run code "
            "(nothing in it ran)"
        ) from error
    except Exception as error:  # a damaged or hostile file can break its reader in any way
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DamagedCheckpoint(f"{path.name} is unreadable ({first.split('. ')[0]})") from error


def _read_facts(path: Path) -> dict[str, Any]:
    facts = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(facts, dict):
        raise DamagedCheckpoint(f"{path.name} holds no facts")
    wrong = [
        name
        for name, kind in _FACT_TYPES.items()
        if not isinstance(facts.get(name), kind) or isinstance(facts.get(name), bool)
    ]
    if wrong:
        raise DamagedCheckpoint(f"{path.name} has no valid {', '.join(wrong)}")
    return facts


def _read_torch(path: Path, *needed: str) -> dict[str, Any]:
    """A pickled state holding the `needed` keys, loaded without running code and only if its
    size is plausible."""
    try:
        size = declared_size(path)
    except UserInputError as error:  # its words are about embeddings
        raise DamagedCheckpoint(f"{path.name} is not a whole torch.save archive") from error
    if size > MAX_EMBEDDING_BYTES:  # the largest part, Adam's moments, is a few MB at most
        raise DamagedCheckpoint(f"{path.name} unpacks to {size / 2**20:.0f} MB; not ours")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise DamagedCheckpoint(f"{path.name} holds a {type(loaded).__name__}, not a state")
    missing = [key for key in needed if key not in loaded]
    if missing:
        raise DamagedCheckpoint(f"{path.name} lacks {', '.join(missing)}")
    return loaded


def _check_vectors_fit(
    vectors: EmbeddingVectors, facts: dict[str, Any], name: str = EMBEDDING_FILENAME
) -> None:
    """The vectors are the ones the facts describe (what a resumed run puts them into)."""
    layouts = ({EMBEDDING_KEY}, set(SDXL_KEYS))
    if (
        set(vectors.tensors) not in layouts
        or vectors.num_vectors != facts["num_vectors"]
        or vectors.token_dim != facts["token_dimension"]
    ):
        raise DamagedCheckpoint(
            f"{name} does not hold {facts['num_vectors']} vector(s) of width "
            f"{facts['token_dimension']}"
        )


def image_fingerprints(images: Sequence[TrainingImage]) -> dict[str, str]:
    """File name -> SHA-256 of the image file and its caption: the images a run trains on."""
    fingerprints: dict[str, str] = {}
    for image in images:
        digest = hashlib.sha256(image.path.read_bytes())
        digest.update(b"\0" + (image.caption or "").encode())
        fingerprints[image.path.name] = digest.hexdigest()
    return fingerprints


def check_same_images(point: ResumePoint, current: dict[str, str], data_dir: Path) -> None:
    """A run continues only on the images its checkpoint was made with, in the same order."""
    recorded: dict[str, str] = point.snapshot.facts["images"]
    changes = {
        "added": sorted(current.keys() - recorded.keys()),
        "removed": sorted(recorded.keys() - current.keys()),
        "changed": sorted(n for n in current.keys() & recorded.keys() if current[n] != recorded[n]),
    }
    if not any(changes.values()):
        return
    listed = "; ".join(f"{kind}: {_some(names)}" for kind, names in changes.items() if names)
    raise UserInputError(
        f"the images in {data_dir} are not those {point.folder.name} was trained on ({listed}); "
        "put them back as they were to resume, or start over with --overwrite or another "
        "--output_dir",
        option="resume_from_checkpoint",
    )


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
