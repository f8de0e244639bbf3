"""The node pack that brings `invokeai.plugins` entry points into a running InvokeAI.

InvokeAI 6 has no plugin discovery, but at start-up it imports every folder with an
`__init__.py` under ROOT/nodes/. The pack is `plugins_loader.py`, copied there as it is: it
imports nothing of this package, so other plugins keep working without it. Its folder name
differs from any package name because the host imports packs under their folder name.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic_files import write_atomically
from . import plugins_loader

NODE_PACK_DIRNAME = plugins_loader.PACK_NAME
NODE_PACK_SOURCE = Path(plugins_loader.__file__).read_text(encoding="utf-8")


def node_pack_folder(root: Path) -> Path:
    return root / "nodes" / NODE_PACK_DIRNAME


def install_node_pack(root: Path) -> bool:
    """Write the pack into ROOT/nodes/ unless it is already there as is; True if written."""
    init_file = node_pack_folder(root) / "__init__.py"
    if init_file.is_file() and init_file.read_text(encoding="utf-8") == NODE_PACK_SOURCE:
        return False
    write_atomically(init_file, lambda temp: temp.write_text(NODE_PACK_SOURCE, encoding="utf-8"))
    return True
