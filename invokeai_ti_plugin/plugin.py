"""This package as an InvokeAI plugin: the object its `invokeai.plugins` entry point names."""

from __future__ import annotations

from .host.model_db import HostModels
from .plugins import InvokeAIPlugin, MenuEntry


def _train_from_menu() -> int:
    """The terminal form, for the root the launcher chose (it exports INVOKEAI_ROOT)."""
    from .config import default_root
    from .console import guarded
    from .tui import run_form

    return guarded("textual inversion training", lambda: run_form(default_root()))


def _register_new_embeddings(models: HostModels) -> None:
    from .host.startup import sync_embeddings

    sync_embeddings(models)


PLUGIN = InvokeAIPlugin(
    name="textual-inversion",
    menu_entries=(MenuEntry("textual inversion training", _train_from_menu),),
    on_host_startup=_register_new_embeddings,
)
