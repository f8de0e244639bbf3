"""What the training thread tells the screen: Textual messages, because posting one is
thread-safe, and they arrive in the order they were sent."""

from __future__ import annotations

import logging

from textual.message import Message
from textual.message_pump import MessagePump

from ..config import TrainingConfig
from ..errors import UserInputError
from ..job import JobResult
from ..training.reports import ProgressUpdate


class RunStarted(Message):
    def __init__(self, config: TrainingConfig, model_name: str) -> None:
        super().__init__()
        self.config = config
        self.model_name = model_name


class RunProgressed(Message):
    def __init__(self, update: ProgressUpdate) -> None:
        super().__init__()
        self.update = update


class RunLogged(Message):
    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line


class RunRefused(Message):
    """Bad input found by the checks or by the run itself."""

    def __init__(self, error: UserInputError) -> None:
        super().__init__()
        self.error = error


class RunFinished(Message):
    def __init__(self, outcome: JobResult) -> None:
        super().__init__()
        self.outcome = outcome


class LogToScreen(logging.Handler):
    """The package's log lines (loading, checkpoints, samples) as `RunLogged` messages."""

    def __init__(self, target: MessagePump) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.post_message(RunLogged(self.format(record)))
