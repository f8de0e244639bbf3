"""The launcher's "textual inversion training": a few plain questions, then a training run.

Numbered choices and typed answers on standard input, so it works over SSH and in any
terminal; the answers build the same `TrainingConfig` as the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import TrainingConfig, build_config, default_root
from .console import guarded, setup_logging, train_on_console
from .errors import UserInputError

Ask = Callable[[str], str]


def _answer(ask: Ask, question: str, default: str) -> str:
    reply = ask(f"{question} [{default}]: ").strip()
    return reply or default


def choose_model(ask: Ask, root: Path) -> str:
    """A numbered list of the installed models; unsupported ones shown with the reason."""
    from .host.app_config import is_host_root
    from .host.installed_models import installed_main_models
    from .host.model_db import open_host_models

    if not is_host_root(root):
        raise UserInputError(
            f"no InvokeAI installation at {root}; set INVOKEAI_ROOT", option="root"
        )
    with open_host_models(root) as models:
        found = installed_main_models(models)
    trainable = [model for model in found if model.trainable]
    if not trainable:
        raise UserInputError(f"no SD 1.x or 2.x diffusers model is installed in InvokeAI at {root}")
    print("Models:")
    for number, model in enumerate(trainable, start=1):
        print(f"  {number}. {model.name} ({model.base})")
    for model in found:
        if not model.trainable:
            print(f"  -. {model.name} ({model.base}): {model.problem}")
    reply = _answer(ask, "Model number", "1")
    if not reply.isdigit() or not 1 <= int(reply) <= len(trainable):
        raise UserInputError(f"{reply!r} is not one of the numbers 1-{len(trainable)}")
    return trainable[int(reply) - 1].key


def ask_config(ask: Ask, root: Path) -> TrainingConfig:
    model = choose_model(ask, root)
    trigger = ask("Trigger term (used as <trigger> in prompts): ").strip().strip("<>")
    if not trigger:
        raise UserInputError("a trigger term is needed, e.g. psychedelic")
    data = _answer(ask, "Training images", str(root / "text-inversion-training-data" / trigger))
    kind = _answer(ask, "Learn an object or a style", "object")
    steps = _answer(ask, "Max training steps", "3000")
    return build_config(
        {
            "model": model,
            "placeholder_token": f"<{trigger}>",
            "root": root,
            "train_data_dir": Path(data),
            "learnable_property": kind,
            "max_train_steps": steps,
            "resume_from_checkpoint": "latest",
        }
    )


def run_questions(ask: Ask = input, root: Path | None = None) -> int:
    setup_logging()
    return guarded(
        "textual inversion training",
        lambda: train_on_console(ask_config(ask, root or default_root())),
    )
