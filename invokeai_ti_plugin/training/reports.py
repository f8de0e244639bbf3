"""What a run tells its caller: a `ProgressUpdate` after every update, a `TrainingResult` at
the end. Front ends import these without loading the trainer's machinery."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .model_files import ModelInfo


@dataclass(frozen=True)
class ProgressUpdate:
    """Sent after every update, on the main process."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    seconds_per_step: float

    @property
    def seconds_left(self) -> float:
        return (self.total_steps - self.step) * self.seconds_per_step


@dataclass(frozen=True)
class TrainingResult:
    embedding_path: Path
    summary_path: Path
    steps: int
    completed: bool
    checkpoint: Path
    model: ModelInfo
    trigger: str
    main_process: bool = True  # False in the other processes of a multi-process run


ProgressCallback = Callable[[ProgressUpdate], None]
