"""This package as an InvokeAI plugin: the object its `invokeai.plugins` entry point names.

The contract is duck-typed (see `host/plugins_loader.py`): a name, launcher menu entries, nodes
to register when InvokeAI imports its node packs, and a start-up hook that InvokeAI runs with
its own services. Heavy imports wait until a hook needs them: the launcher loads this too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

    from invokeai.app.services.invocation_services import InvocationServices


class MenuEntry(NamedTuple):
    """A launcher menu entry; a plain `(label, run)` pair of any plugin works the same."""

    label: str
    run: Callable[[], int]  # returns an exit status; the launcher shows its menu again after


def _train_from_menu() -> int:
    """The terminal form, for the root the launcher chose (it exports INVOKEAI_ROOT)."""
    from .console import guarded
    from .host.app_config import find_root
    from .tui import run_form

    return guarded("textual inversion training", lambda: run_form(find_root()))


class TextualInversionPlugin:
    name = "textual-inversion"
    menu_entries = (MenuEntry("textual inversion training", _train_from_menu),)

    @staticmethod
    def register_nodes() -> None:
        """The "Train Textual Inversion" node joins the workflow editor."""
        from .host import training_node  # noqa: F401  (importing it registers the node)

    @staticmethod
    def on_host_startup(services: InvocationServices) -> None:
        """Register embeddings dropped in while InvokeAI was down; add the ready workflow."""
        from .host.embedding_sync import sync_embeddings
        from .host.model_db import HostModels
        from .host.workflow import sync_workflow

        sync_embeddings(HostModels.of_server(services))
        sync_workflow(services)


PLUGIN = TextualInversionPlugin()
