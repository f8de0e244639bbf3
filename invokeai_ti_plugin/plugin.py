"""This package as an InvokeAI plugin: the object its `invokeai.plugins` entry point names."""

from __future__ import annotations

from .host.model_db import HostModels
from .plugins import InvokeAIPlugin, MenuEntry


def _train_from_menu() -> int:
    from .questions import run_questions

    return run_questions()


def _register_new_embeddings(models: HostModels) -> None:
    from .host.startup import sync_embeddings

    sync_embeddings(models)


PLUGIN = InvokeAIPlugin(
    name="textual-inversion",
    menu_entries=(MenuEntry("textual inversion training", _train_from_menu),),
    on_host_startup=_register_new_embeddings,
)
