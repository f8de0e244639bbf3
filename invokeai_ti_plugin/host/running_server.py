"""Tell a running `invokeai-web` that an embedding changed, so it does not serve stale vectors.

The server sees new model records at once (every request reads SQLite), but it caches loaded
models by key and prompt-node results by prompt text; a retrained `<trigger>` would otherwise
keep its old meaning until a restart. Best effort: no server, no harm.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

from .model_db import HostModels

logger = logging.getLogger(__name__)

_CACHE_RESETS = (
    ("POST", "/api/v2/models/empty_model_cache"),
    ("DELETE", "/api/v1/app/invocation_cache"),
)


def server_address(models: HostModels) -> str:
    """Where the root's server listens: INVOKEAI_HOST/PORT as they are now, else invokeai.yaml."""
    from invokeai.app.services.config.config_default import (
        InvokeAIAppConfig,
        load_and_migrate_config,
    )

    settings = InvokeAIAppConfig()  # fresh, so it reads the environment of this moment
    yaml_file = models.root / "invokeai.yaml"
    if yaml_file.is_file():
        settings.update_config(load_and_migrate_config(yaml_file), clobber=False)
    host = str(settings.host)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{settings.port}"


def refresh_running_server(models: HostModels, timeout: float = 2.0) -> bool:
    """Empty the server's model and node caches; False when no server answers."""
    address = server_address(models)
    for method, route in _CACHE_RESETS:
        request = urllib.request.Request(address + route, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):  # multiuser mode: an administrator's login only
                logger.warning(
                    "InvokeAI at %s lets only a logged-in administrator empty its caches "
                    "(multiuser mode): a replaced embedding keeps its old vectors there until "
                    "the server restarts, or an administrator empties its model and invocation "
                    "caches",
                    address,
                )
                return True
            logger.warning("InvokeAI at %s refused %s %s (%s)", address, method, route, error.code)
        except (urllib.error.URLError, OSError):
            return False
    logger.info("told the running InvokeAI at %s to reload embeddings", address)
    return True
