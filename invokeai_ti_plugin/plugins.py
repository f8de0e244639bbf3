"""The InvokeAI plugin contract: what a package names in the `invokeai.plugins` entry points.

Each entry point is an `InvokeAIPlugin`: a name, launcher menu entries, and a start-up hook that
InvokeAI runs with its own model services once they exist. The launcher and the node pack find
plugins only through these entry points, so any package can join.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .host.model_db import HostModels

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "invokeai.plugins"


@dataclass(frozen=True)
class MenuEntry:
    label: str
    run: Callable[[], int]  # returns an exit status; the launcher shows its menu again after


@dataclass(frozen=True)
class InvokeAIPlugin:
    name: str
    menu_entries: tuple[MenuEntry, ...] = ()
    on_host_startup: Callable[[HostModels], object] | None = field(default=None)


def discover_plugins() -> list[InvokeAIPlugin]:
    """Every installed plugin; a broken one is logged and skipped, never fatal."""
    found = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugin = entry.load()
        except Exception as error:  # a third-party plugin failing must not stop the host
            logger.warning("plugin %s could not be loaded: %s", entry.name, error)
            continue
        if isinstance(plugin, InvokeAIPlugin):
            found.append(plugin)
        else:
            logger.warning("plugin %s is a %s, not an InvokeAIPlugin", entry.name, type(plugin))
    return found
