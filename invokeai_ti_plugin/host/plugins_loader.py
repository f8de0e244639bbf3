"""InvokeAI plugins: Python packages that declare an entry point in the group "invokeai.plugins".

This file is a node pack: `invokeai-ti install-nodes` copies it, as it is, to
ROOT/nodes/invokeai_plugins_loader/__init__.py, and `invokeai-web` imports it at start-up. It
imports nothing but the standard library and InvokeAI, so it keeps working for every other
plugin when the package that installed it is gone.

The contract (duck-typed: a plugin need not import anything to join). An entry point

    [project.entry-points."invokeai.plugins"]
    my-plugin = "my_package.plugin:PLUGIN"

names an object with these attributes, all but `name` optional:

- `name`: str, shown in logs and menus.
- `menu_entries`: a sequence of `(label, run)` pairs; `run()` takes no arguments and returns an
  exit status. `invokeai-launcher` shows one numbered entry per pair.
- `register_nodes()`: called when InvokeAI imports this pack, before it builds its API schema;
  import the modules that define your `@invocation` nodes here, and they appear in the workflow
  editor.
- `on_host_startup(services)`: called once InvokeAI's services exist (right after its own
  start-up, before the first request is served), in the server's process, with its
  `InvocationServices` (`services.model_manager`, `services.workflow_records`, ...).

A plugin that fails to load, to register its nodes or to start is logged and skipped; InvokeAI
and the other plugins go on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "invokeai.plugins"
PACK_NAME = "invokeai_plugins_loader"  # the folder name, under which InvokeAI imports the pack

logger = logging.getLogger("InvokeAI")  # the host's own log, where its users look


def load_plugins() -> list[Any]:
    """Every installed plugin, its nodes registered; a broken one is logged and skipped."""
    plugins = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugin = entry.load()
            register_nodes = getattr(plugin, "register_nodes", None)
            if register_nodes is not None:
                register_nodes()
        except Exception:  # a third-party plugin failing must not stop the host
            logger.exception("plugin %s could not be loaded", entry.name)
            continue
        plugins.append(plugin)
    return plugins


def run_startup_hooks(plugins: list[Any], services: Any) -> None:
    """Each plugin's `on_host_startup(services)`; a failure is logged, never fatal."""
    for plugin in plugins:
        hook = getattr(plugin, "on_host_startup", None)
        if hook is None:
            continue
        try:
            hook(services)
        except Exception:
            logger.exception("plugin %s failed at start-up", getattr(plugin, "name", plugin))


def start_with_server(plugins: list[Any]) -> None:
    """Run the start-up hooks right after InvokeAI's own start-up, in its process.

    Node packs are imported before the server starts, when the FastAPI app exists but its
    services do not (they are built in the app's lifespan); wrapping that lifespan gives the
    hooks the host's own services, so no plugin opens a second writer on its database.
    """
    if "invokeai.app.api_app" not in sys.modules:  # imported outside `invokeai-web`
        return
    from invokeai.app.api.dependencies import ApiDependencies
    from invokeai.app.api_app import app

    host_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_with_plugins(application: Any) -> AsyncIterator[Any]:
        async with host_lifespan(application) as state:
            run_startup_hooks(plugins, ApiDependencies.invoker.services)
            yield state

    app.router.lifespan_context = lifespan_with_plugins
    names = ", ".join(str(getattr(plugin, "name", plugin)) for plugin in plugins)
    logger.info("InvokeAI plugins loaded: %s", names or "none")


if __name__ == PACK_NAME:  # imported by InvokeAI as a node pack (not as part of a package)
    start_with_server(load_plugins())
