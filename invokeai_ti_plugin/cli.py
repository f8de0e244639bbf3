"""`invokeai-ti`: the command line, with the InvokeAI 2.3 manual's flags.

The options are generated from `TrainingConfig`'s fields (names, types, choices, help), so the
command line cannot drift from the one source of truth. Bad input ends in a single line naming
the problem and what to do, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import TrainingConfig
from .errors import UserInputError
from .training.trainer import ProgressUpdate, Trainer, TrainingResult

PROG = "invokeai-ti"
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 130


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` -> `int`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _help_of(field: FieldInfo) -> str:
    text = field.description or ""
    default = field.default
    if default is not PydanticUndefined and default is not None and not isinstance(default, bool):
        text += f" (default: {default})"
    return text.replace("%", "%%")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per `TrainingConfig` field, same name; unset options keep the model's default."""
    for name, field in TrainingConfig.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        flag = f"--{name}"
        common: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": _help_of(field),
        }
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(annotation)), **common)
        elif annotation in (int, float):
            parser.add_argument(
                flag, type=annotation, metavar=annotation.__name__.upper(), **common
            )
        elif annotation is Path:
            parser.add_argument(flag, type=Path, metavar="PATH", **common)
        else:
            parser.add_argument(flag, metavar="TEXT", **common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a textual-inversion embedding: teach a Stable Diffusion model a new "
        "word from 3-20 pictures. Other commands: `invokeai-ti demo` (a tiny built-in run).",
    )
    add_config_options(parser)
    parser.add_argument(
        "--gui",
        action="store_true",
        help="Fill in the options in a keyboard form in the terminal instead.",
    )
    return parser


def config_from_options(options: dict[str, Any]) -> TrainingConfig:
    """Validate parsed options into the config, as one readable line on failure."""
    try:
        return TrainingConfig(**options)
    except ValidationError as error:
        raise UserInputError(describe_validation_error(error)) from error


def describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        option = "--" + ".".join(str(part) for part in item["loc"]) if item["loc"] else "options"
        if item["type"] == "missing":
            problems.append(f"{option} is required")
        else:
            problems.append(f"{option}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def train(config: TrainingConfig) -> TrainingResult:
    """Run a training with a console progress bar."""
    progress = ConsoleProgress()
    try:
        return Trainer(config, on_progress=progress).run()
    finally:
        progress.close()


def report(result: TrainingResult) -> int:
    if result.completed:
        print(
            f"Embedding for <{result.trigger}> ({result.model.base}, {result.steps} steps): "
            f"{result.embedding_path}"
        )
        return 0
    print(
        f"Stopped at step {result.steps}; the embedding so far is in {result.embedding_path}. "
        "Continue with --resume_from_checkpoint latest."
    )
    return EXIT_STOPPED


class _AboveProgressBar(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """Our messages on the terminal; the libraries' own per-file progress bars off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    package_logger = logging.getLogger("invokeai_ti_plugin")
    if not any(isinstance(handler, _AboveProgressBar) for handler in package_logger.handlers):
        handler = _AboveProgressBar()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(args[1:])
    parser = build_parser()
    options = vars(parser.parse_args(args))
    setup_logging()
    try:
        if options.pop("gui"):
            raise UserInputError(
                "the terminal form is not part of this version yet; use the options"
            )
        return report(train(config_from_options(options)))
    except UserInputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
