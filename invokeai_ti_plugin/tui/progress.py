"""The run, on the same screen once OK is pressed: progress, the latest sample grid, the log,
and at the end what became of the embedding."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import ProgressBar, Static

from ..config import TrainingConfig
from ..console import progress_line
from ..training.reports import ProgressUpdate
from ..training.run_folder import RunFolder

LOG_LINES = 200
RESUME_IN_THE_FORM = "To continue, open the form again with Resume ticked."


class ProgressPanel(Vertical):
    DEFAULT_CSS = """
    ProgressPanel { height: 1fr; padding: 0 1; }
    ProgressPanel #run { height: auto; color: $text-primary; text-style: bold; }
    ProgressPanel ProgressBar { margin-top: 1; }
    ProgressPanel ProgressBar Bar { width: 1fr; }
    ProgressPanel #stats { height: 1; }
    ProgressPanel #sample { height: auto; color: $text-muted; }
    ProgressPanel #log { height: 1fr; margin: 1 0; background: $boost; }
    ProgressPanel #result { height: auto; min-height: 2; text-style: bold; }
    ProgressPanel #result.-failed { color: $text-error; }
    ProgressPanel #result.-finished { color: $text-success; }
    """

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self.output_dir: Path | None = None  # the run's, once started: its sample grids are there
        self.total_steps = 0
        self.stepped = False  # whether a progress update came: a resumed, finished run sends none
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)

    def compose(self) -> ComposeResult:
        yield Static(id="run")
        yield ProgressBar(show_eta=False, id="bar")
        yield Static("loading the model and images...", id="stats")
        yield Static(id="sample")
        with VerticalScroll(id="log"):  # lines wrapped by the layout, so at any width
            yield Static(id="log-lines", markup=False)
        yield Static(id="result")

    def on_mount(self) -> None:
        self.query_one("#log").anchor()

    def start(self, config: TrainingConfig, model_name: str) -> None:
        self.output_dir = config.out_dir
        self.total_steps = config.max_train_steps
        self.query_one("#run", Static).update(
            f"Training {config.placeholder_token} on {model_name}: {config.max_train_steps} "
            f"steps, output in {config.out_dir}"
        )
        self.query_one(ProgressBar).update(total=config.max_train_steps, progress=0)
        self.query_one("#result", Static).update("Esc or Ctrl-C stops, with a checkpoint saved.")

    def show_progress(self, update: ProgressUpdate) -> None:
        self.stepped = True
        self.query_one(ProgressBar).update(total=update.total_steps, progress=update.step)
        self.query_one("#stats", Static).update(progress_line(update))
        self._show_sample()

    def _show_sample(self) -> None:
        sample = RunFolder(self.output_dir).newest_sample() if self.output_dir else None
        self.query_one("#sample", Static).update(f"Latest samples: {sample}" if sample else "")

    def log_line(self, line: str) -> None:
        self.log_lines.append(line)
        self.query_one("#log-lines", Static).update("\n".join(self.log_lines))
        self._show_sample()  # a grid is announced in the log as soon as it is written

    def stopping(self) -> None:
        self.query_one("#result", Static).update(
            "Stopping after this step and saving a checkpoint..."
        )

    def finish(self, text: str, failed: bool, steps: int | None = None) -> None:
        """The outcome; `steps` done in all, when known (a resumed run may have had none)."""
        if steps is not None and not self.stepped:
            self.query_one(ProgressBar).update(progress=steps)
            self.query_one("#stats", Static).update(f"step {steps}/{self.total_steps}")
        self._show_sample()  # the last grid is drawn after the last step
        result = self.query_one("#result", Static)
        result.update(f"{text}\nPress q or Esc to quit.")
        result.add_class("-failed" if failed else "-finished")
