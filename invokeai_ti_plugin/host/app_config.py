"""Which InvokeAI root to use, and the host's configuration for it.

Many host modules read the shared `get_config()` singleton when they are imported, so the root
must be set on that singleton before anything else of InvokeAI is imported or constructed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from invokeai.app.services.config.config_default import InvokeAIAppConfig


def find_root() -> Path:
    """InvokeAI's own rule ($INVOKEAI_ROOT, else the active virtualenv's parent, else ~/invokeai),
    with one step before ~/invokeai: the parent of the virtualenv this Python runs from, when that
    is an InvokeAI root. So `ROOT/.venv/bin/invokeai-ti`, which the launcher's users run without
    activating its ROOT/.venv, finds ROOT."""
    from invokeai.app.services.config.config_default import InvokeAIAppConfig

    chosen_by_env = os.environ.get("INVOKEAI_ROOT") or os.environ.get("VIRTUAL_ENV")
    venv_parent = Path(sys.prefix).parent
    if not chosen_by_env and sys.prefix != sys.base_prefix and is_host_root(venv_parent):
        return venv_parent.resolve()
    return InvokeAIAppConfig.find_root()


def is_host_root(root: Path) -> bool:
    """Whether InvokeAI has been set up in this folder (it has a config or a database)."""
    return (root / "invokeai.yaml").is_file() or (root / "databases" / "invokeai.db").is_file()


def use_root(root: Path) -> InvokeAIAppConfig:
    """Point the host's shared config at `root`, honouring its invokeai.yaml; writes nothing."""
    from invokeai.app.services.config.config_default import get_config, load_and_migrate_config

    config = get_config()
    config._root = root.expanduser().absolute()
    if config.config_file_path.is_file():
        config.update_config(load_and_migrate_config(config.config_file_path), clobber=False)
    return config
