"""The node pack that brings `invokeai.plugins` entry points into a running InvokeAI.

InvokeAI 6 has no plugin discovery, but at start-up it imports every folder with an
`__init__.py` under ROOT/nodes/. This one tiny pack loads all installed plugins there. Its folder
name differs from any package name because the host imports packs under their folder name.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic_files import write_atomically

NODE_PACK_DIRNAME = "invokeai_plugins_loader"
NODE_PACK_SOURCE = '''"""Loads InvokeAI plugins: Python entry points in the group "invokeai.plugins"

Installed by invokeai-ti-plugin (`invokeai-ti install-nodes`); removing it disables the plugins'
start-up work inside InvokeAI, nothing else.
"""

try:
    from invokeai_ti_plugin.host.server_plugins import start_plugins_with_server
except ImportError as error:  # the plugin package was uninstalled: say so, keep the host running
    import logging

    logging.getLogger(__name__).warning("invokeai plugins not loaded: %s", error)
else:
    start_plugins_with_server()
'''


def node_pack_folder(root: Path) -> Path:
    return root / "nodes" / NODE_PACK_DIRNAME


def install_node_pack(root: Path) -> bool:
    """Write the pack into ROOT/nodes/ unless it is already there as is; True if written."""
    init_file = node_pack_folder(root) / "__init__.py"
    if init_file.is_file() and init_file.read_text(encoding="utf-8") == NODE_PACK_SOURCE:
        return False
    write_atomically(init_file, lambda temp: temp.write_text(NODE_PACK_SOURCE, encoding="utf-8"))
    return True
