"""The terminal form's application: the form, the run in a worker thread, and the keys that stop
it safely.

Training runs in a thread so that the screen stays live; progress, the package's log lines and
the outcome come back as Textual messages (posting one is thread-safe). The trainer's own Ctrl-C
handler only works in the main thread, so Esc and Ctrl-C here call `Trainer.request_stop`: the
run ends after the current step with a checkpoint saved. Quitting during a run waits for that,
so no file is ever left half-written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Button, ContentSwitcher, Footer, Static

from ..config import TrainingConfig, build_config
from ..console import EXIT_BAD_INPUT, EXIT_STOPPED, outcome_text, setup_logging
from ..errors import UserInputError
from ..host.installed_models import InstalledModel, installed_models_at
from ..job import run_job
from ..training.trainer import Trainer
from .checks import check_vocabulary
from .fields import MODEL
from .form import TrainingForm
from .progress import RESUME_IN_THE_FORM, ProgressPanel
from .run_messages import (
    LogToScreen,
    RunFinished,
    RunLogged,
    RunProgressed,
    RunRefused,
    RunStarted,
)

Phase = Literal["form", "checking", "training", "done"]
PACKAGE_LOGGER = "invokeai_ti_plugin"


class TrainingApp(App[None]):
    TITLE = "Textual inversion training"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #title { height: 1; padding: 0 1; background: $primary; color: $foreground;
             text-wrap: nowrap; text-overflow: ellipsis; }
    ContentSwitcher { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "focus_next", "Next field", priority=True),
        Binding("ctrl+p", "focus_previous", "Previous field", priority=True),
        Binding("escape", "stop", "Stop, saving a checkpoint"),
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True),
        Binding("escape", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("q", "quit_when_done", "Quit", show=False),
    ]

    def __init__(
        self, root: Path, models: list[InstalledModel], prefill: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.root = root
        self.models = models
        self.prefill = prefill or {}
        self.phase: Phase = "form"
        self.trainer: Trainer | None = None
        self.stop_wanted = False
        self.quit_wanted = False
        self.steps_seen = 0
        self.exit_status = 0
        self.log_handler = LogToScreen(self)

    def run(self, *, headless: bool = False, **options: Any) -> None:
        """Show the form. It reads keys from stdin and draws on stderr (Textual's screen);
        without a terminal on both it would wait forever, so that is refused in one line."""
        if not headless and not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UserInputError(
                "the training form needs an interactive terminal, and this one's input or screen "
                "is redirected; give the options on the command line instead, e.g. invokeai-ti "
                "--model NAME --placeholder_token '<word>' --train_data_dir FOLDER "
                "(see invokeai-ti --help)"
            )
        super().run(headless=headless, **options)

    def compose(self) -> ComposeResult:
        yield Static(f"{self.TITLE} - InvokeAI at {self.root}", id="title")
        with ContentSwitcher(initial="form"):
            yield TrainingForm(self.root, self.models, self.prefill, id="form")
            yield ProgressPanel(id="progress")
        yield Footer()

    def on_mount(self) -> None:
        package_logger = logging.getLogger(PACKAGE_LOGGER)
        package_logger.addHandler(self.log_handler)
        if package_logger.getEffectiveLevel() > logging.INFO:  # the run's steps are INFO
            package_logger.setLevel(logging.INFO)
        self.query_one(f"#{MODEL}").focus()

    def on_unmount(self) -> None:
        logging.getLogger(PACKAGE_LOGGER).removeHandler(self.log_handler)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Which keys work now: field keys on the form, Stop while a run is on."""
        running = self.phase in ("checking", "training")
        allowed = {
            "focus_next": self.phase == "form",
            "focus_previous": self.phase == "form",
            "stop": running,  # comes first for Esc and Ctrl-C; Ctrl-Q quits once it is saved
            "quit_when_done": self.phase == "done",
        }
        return allowed.get(action, True)

    def _enter(self, phase: Phase) -> None:
        """The form is shown until training starts, and takes input only in the form phase."""
        self.phase = phase
        switcher = self.query_one(ContentSwitcher)
        switcher.current = "form" if phase in ("form", "checking") else "progress"
        self.query_one(TrainingForm).disabled = phase != "form"
        self.refresh_bindings()

    # -- starting and stopping ---------------------------------------------------------------

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.start_run()
        elif event.button.id == "cancel":
            await self.action_quit()

    def start_run(self) -> None:
        """Build the one `TrainingConfig` from the form; train it in a thread if it is valid."""
        form = self.query_one(TrainingForm)
        try:
            config = build_config(form.options())
        except UserInputError as error:
            form.show_problems(error)
            return
        model = form.chosen_model()
        assert model is not None  # the config has a model, and only the list gives one
        form.show_problems(None)
        form.set_status("Checking the trigger against the model's vocabulary...")
        self.trainer, self.stop_wanted, self.steps_seen = None, False, 0
        self._enter("checking")
        self.run_worker(partial(self._run, config, model), thread=True, exclusive=True)

    def _run(self, config: TrainingConfig, model: InstalledModel) -> None:
        """The worker thread: check the vocabulary, train, register."""
        try:
            if model.format == "diffusers":  # a checkpoint's tokenizer is checked as it loads
                check_vocabulary(config, model.path)
            self.post_message(RunStarted(config, model.name))
            outcome = run_job(
                config,
                on_progress=lambda update: self.post_message(RunProgressed(update)),
                on_start=self._trainer_ready,
            )
        except UserInputError as error:
            self.post_message(RunRefused(error))
        else:
            self.post_message(RunFinished(outcome))

    def _trainer_ready(self, trainer: Trainer) -> None:
        """In the worker: keep the trainer to stop; a stop asked for already applies now."""
        self.trainer = trainer
        if self.stop_wanted:
            trainer.request_stop()

    def action_stop(self) -> None:
        self.stop_wanted = True
        if self.trainer is not None:
            self.trainer.request_stop()
        self.query_one(ProgressPanel).stopping()
        self.query_one(TrainingForm).set_status("Stopping...")

    async def action_quit(self) -> None:
        """Quit now, or (Ctrl-Q during a run) once the run has stopped and saved."""
        if self.phase in ("checking", "training"):
            self.quit_wanted = True
            self.action_stop()
        else:
            self.exit(return_code=self.exit_status)

    async def action_quit_when_done(self) -> None:
        await self.action_quit()

    # -- what the run reports ----------------------------------------------------------------

    def on_run_started(self, message: RunStarted) -> None:
        self._enter("training")
        self.query_one(ProgressPanel).start(message.config, message.model_name)
        if self.stop_wanted:
            self.query_one(ProgressPanel).stopping()

    def on_run_progressed(self, message: RunProgressed) -> None:
        self.steps_seen += 1
        self.query_one(ProgressPanel).show_progress(message.update)

    def on_run_logged(self, message: RunLogged) -> None:
        self.query_one(ProgressPanel).log_line(message.line)

    def on_run_refused(self, message: RunRefused) -> None:
        """Before any step: back to the form, each problem beside its field. After: the error
        ends the run's screen."""
        if self.steps_seen:
            self.exit_status = EXIT_BAD_INPUT
            self.query_one(ProgressPanel).finish(f"Error: {message.error}", failed=True)
            self._enter("done")
        else:
            self._enter("form")
            self.query_one(TrainingForm).show_problems(message.error)
        self._end_if_quitting()

    def on_run_finished(self, message: RunFinished) -> None:
        self.exit_status = 0 if message.outcome.training.completed else EXIT_STOPPED
        steps = message.outcome.training.steps
        text = outcome_text(message.outcome, RESUME_IN_THE_FORM)
        self.query_one(ProgressPanel).finish(text, False, steps)
        self._enter("done")
        self._end_if_quitting()

    def _end_if_quitting(self) -> None:
        if self.quit_wanted:
            self.exit(return_code=self.exit_status)


def run_form(root: Path, prefill: Mapping[str, Any] | None = None) -> int:
    """Open the form for InvokeAI at `root` (options from the command line pre-filled); returns
    the exit status: 0, or 130 when the run was stopped early, 2 after bad input."""
    setup_logging()
    app = TrainingApp(root, installed_models_at(root), prefill)
    app.run()
    return app.return_code or 0
