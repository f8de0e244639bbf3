"""The run's loss history, `logs/history.jsonl`: one line per update, cut back on resume, drawn
as `loss.png` at each checkpoint."""

from __future__ import annotations

import json
import math

from accelerate import Accelerator

from ..atomic_files import disk_full_explained, write_atomically
from .loss_plot import write_loss_plot
from .run_folder import RunFolder


class RunHistory:
    """Loss and learning rate of every update, for plots; truncated on resume."""

    def __init__(self, folder: RunFolder, accelerator: Accelerator) -> None:
        self.path = folder.history
        self.plot_path = folder.loss_plot
        self.enabled = accelerator.is_main_process
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, step: int) -> None:
        """Keep the updates up to `step`; a line torn by a crash mid-write is dropped."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = "".join(f"{line}\n" for line in lines if _step_of(line) <= step)
        write_atomically(self.path, lambda temp: temp.write_text(kept, encoding="utf-8"))

    def plot(self, title: str, start_eval: float | None) -> None:
        if self.enabled and self.path.is_file():
            write_loss_plot(self.path, self.plot_path, title, start_eval)

    def add(
        self, step: int, loss: float, learning_rate: float, eval_loss: float | None = None
    ) -> None:
        """One line per update; `eval_loss` when the evaluation loss was measured after it."""
        if self.enabled:
            record = {"step": step, "loss": loss, "lr": learning_rate}
            if eval_loss is not None:
                record["eval_loss"] = eval_loss
            with disk_full_explained(self.path), self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


def _step_of(history_line: str) -> float:
    """The step a history line records; a line torn by a crash mid-write records none."""
    try:
        return float(json.loads(history_line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
