"""What every terminal front end shares: the progress bar, log lines, and one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import TrainingConfig
from .errors import UserInputError

if TYPE_CHECKING:  # the trainer imports torch: loaded only once a command needs it
    from .job import JobResult
    from .training.reports import ProgressUpdate

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 130
RESUME_ON_THE_COMMAND_LINE = "Continue with --resume_from_checkpoint latest."


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(update: ProgressUpdate) -> str:
    """Step, loss, speed and time left: the form's and the web node's progress text."""
    speed = f"{1 / update.seconds_per_step:.2f} it/s" if update.seconds_per_step else "- it/s"
    return (
        f"step {update.step}/{update.total_steps}   loss {update.loss:.4f}   {speed}   "
        f"{clock(update.seconds_left)} left"
    )


class ConsoleProgress:
    """A progress bar on the terminal: step, loss, speed and time left."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, update: ProgressUpdate) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=update.total_steps, initial=update.step - 1, unit="step", dynamic_ncols=True
            )
        self._bar.set_postfix(
            loss=f"{update.loss:.4f}", lr=f"{update.learning_rate:.2e}", refresh=False
        )
        self._bar.update(update.step - self._bar.n)
        if update.step == update.total_steps:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _AboveProgressBar(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """Our messages on the terminal; the libraries' own per-file progress bars off, and so is
    bitsandbytes' (InvokeAI's) note, on a CPU with AVX512-BF16, that an optional kernel package
    is missing: it asks nothing of our user."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    package_logger = logging.getLogger("invokeai_ti_plugin")
    if not any(isinstance(handler, _AboveProgressBar) for handler in package_logger.handlers):
        handler = _AboveProgressBar()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def train_on_console(config: TrainingConfig) -> int:
    """Train with a progress bar, register, and say what happened; returns the exit status."""
    from .job import run_job

    progress = ConsoleProgress()
    try:
        outcome = run_job(config, on_progress=progress)
    finally:
        progress.close()
    result = outcome.training
    if result.main_process:  # the main process reports for all
        print(outcome_text(outcome, RESUME_ON_THE_COMMAND_LINE))
    return 0 if result.completed else EXIT_STOPPED


def outcome_text(outcome: JobResult, how_to_resume: str) -> str:
    """What became of the run and its embedding, in the same words on every front end;
    `how_to_resume` says how this one continues a stopped run."""
    result = outcome.training
    if not result.completed:
        return (
            f"Stopped at step {result.steps}, checkpoint saved; the embedding so far is in "
            f"{result.embedding_path}. {how_to_resume}"
        )
    done = (
        f"Embedding for <{result.trigger}> ({result.model.base}, {result.steps} steps): "
        f"{result.embedding_path}"
    )
    registered = outcome.registered
    if registered is None:
        return f"{done}\nInvokeAI: {outcome.note}"
    return (
        f"{done}\nInvokeAI: {registered.verb} <{registered.name}> ({registered.base}); use it "
        f"in prompts as <{registered.name}>"
    )


def guarded(prog: str, action: Callable[[], int]) -> int:
    """Run a command; bad input becomes one line on stderr and a non-zero status."""
    try:
        return action()
    except UserInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: aborted", file=sys.stderr)
        return EXIT_STOPPED
