"""Resumable checkpoints: everything needed to continue exactly where a run stopped.

A checkpoint holds the learned vectors, optimizer and LR-schedule state, the step, and each
process's random-number and data-order state, so a resumed run follows the very path the
uninterrupted run would have. Folders are completed under a temporary name and renamed, so a
checkpoint that exists is whole. Pickled parts are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import write_json_atomically
from ..errors import UserInputError
from .embedding_file import (
    EMBEDDING_FILENAME,
    EmbeddingVectors,
    read_embedding_vectors,
    save_vectors,
)

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_FILENAME = "trainer_state.json"
OPTIMIZER_FILENAME = "optimizer.pt"
SCHEDULER_FILENAME = "lr_scheduler.pt"


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS_DIRNAME


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"checkpoint-{step}"


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


def resolve_checkpoint(output_dir: Path, requested: str | None) -> Path | None:
    """'latest' -> newest checkpoint (None if there is none yet); a path must be a checkpoint."""
    if requested is None:
        return None
    if requested == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(requested).expanduser()
    if not (folder / STATE_FILENAME).is_file():
        raise UserInputError(
            f"{folder} is not a checkpoint folder (no {STATE_FILENAME}); pass 'latest' or a "
            f"folder under {checkpoints_root(output_dir)}",
            option="resume_from_checkpoint",
        )
    return folder


@dataclass
class TrainingSnapshot:
    """The shared (process-independent) state of a run at one step."""

    step: int
    vectors: dict[str, torch.Tensor]  # per text encoder, keyed as in the embedding file
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    facts: dict[str, Any]


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """Create the temporary folder all processes write into (main process only)."""
    temp = checkpoints_root(output_dir) / f".checkpoint-{step}.partial"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    return temp


def save_process_state(temp: Path, process_index: int, state: dict[str, Any]) -> None:
    """Each process's own random and data-order state."""
    torch.save(state, temp / _rng_filename(process_index))


def finish_checkpoint(temp: Path, output_dir: Path, snapshot: TrainingSnapshot) -> Path:
    """Write the shared state, then publish the folder under its final name (main process)."""
    save_vectors(
        temp / EMBEDDING_FILENAME, EmbeddingVectors(snapshot.vectors), {"step": str(snapshot.step)}
    )
    torch.save(snapshot.optimizer, temp / OPTIMIZER_FILENAME)
    torch.save(snapshot.lr_scheduler, temp / SCHEDULER_FILENAME)
    write_json_atomically(temp / STATE_FILENAME, {"step": snapshot.step, **snapshot.facts})
    final = checkpoint_folder(output_dir, snapshot.step)
    if final.exists():
        shutil.rmtree(final)
    temp.rename(final)
    return final


def load_snapshot(folder: Path) -> TrainingSnapshot:
    facts: dict[str, Any] = json.loads((folder / STATE_FILENAME).read_text())
    return TrainingSnapshot(
        step=int(facts.pop("step")),
        vectors=read_embedding_vectors(folder / EMBEDDING_FILENAME).tensors,
        optimizer=torch.load(folder / OPTIMIZER_FILENAME, weights_only=True),
        lr_scheduler=torch.load(folder / SCHEDULER_FILENAME, weights_only=True),
        facts=facts,
    )


def load_process_state(folder: Path, process_index: int) -> dict[str, Any]:
    path = folder / _rng_filename(process_index)
    if not path.is_file():
        raise UserInputError(
            f"{folder} was saved by fewer processes than this run uses; resume with the same "
            "number of processes",
            option="resume_from_checkpoint",
        )
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state
