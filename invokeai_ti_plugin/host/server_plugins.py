"""Inside `invokeai-web`: run every plugin's start-up hook once the host's services exist.

Node packs are imported before the server starts, when the FastAPI app exists but its services
do not; they are built in the app's lifespan. Wrapping that lifespan runs the hooks right after
the host's own start-up, in its process, with its services (so there is no second database
writer), before the first request is served.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..plugins import InvokeAIPlugin, discover_plugins
from .model_db import HostModels

logger = logging.getLogger("invokeai_ti_plugin")


def start_plugins_with_server() -> None:
    """Called by the node pack; does nothing outside a starting `invokeai-web`."""
    if "invokeai.app.api_app" not in sys.modules:
        return
    from invokeai.app.api_app import app

    plugins = [plugin for plugin in discover_plugins() if plugin.on_host_startup]
    if not plugins:
        return
    host_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_with_plugins(application: Any) -> AsyncIterator[Any]:
        async with host_lifespan(application) as state:
            run_startup_hooks(plugins)
            yield state

    app.router.lifespan_context = lifespan_with_plugins
    logger.info("plugins waiting for InvokeAI start-up: %s", ", ".join(p.name for p in plugins))


def run_startup_hooks(plugins: list[InvokeAIPlugin]) -> None:
    from invokeai.app.api.dependencies import ApiDependencies

    services = ApiDependencies.invoker.services
    models = HostModels(
        services.configuration, services.model_manager.store, services.model_manager.install
    )
    for plugin in plugins:
        assert plugin.on_host_startup is not None
        try:
            plugin.on_host_startup(models)
        except Exception:  # a plugin's failure is reported, never fatal to the host
            logger.exception("plugin %s failed at start-up", plugin.name)
