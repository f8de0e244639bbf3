"""The node pack that brings `invokeai.plugins` entry points into a running InvokeAI.

InvokeAI 6 has no plugin discovery, but at start-up it imports every folder with an
`__init__.py` under ROOT/nodes/. The pack is `plugins_loader.py`, copied there as it is: it
imports nothing of this package, so other plugins keep working without it. Its folder name
differs from any package name because the host imports packs under their folder name.

Training and the launcher install the pack (or update it) by themselves, but once only: a pack
the user removed (InvokeAI's Custom Nodes tab uninstalls by deleting its folder) stays removed
until `invokeai-ti install-nodes` asks for it again. A hidden file in ROOT/nodes/, which the
host does not import, remembers the first installation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..atomic_files import write_atomically
from . import plugins_loader

NODE_PACK_DIRNAME = plugins_loader.PACK_NAME
NODE_PACK_SOURCE = Path(plugins_loader.__file__).read_text(encoding="utf-8")
INSTALLED_MARKER = f".{NODE_PACK_DIRNAME}-installed"

logger = logging.getLogger(__name__)


def node_pack_folder(root: Path) -> Path:
    return root / "nodes" / NODE_PACK_DIRNAME


def install_node_pack(root: Path, *, again: bool = False) -> bool:
    """Write the pack into ROOT/nodes/ unless it is already there as is, or was removed since
    an earlier installation (unless `again`); True if written."""
    folder = node_pack_folder(root)
    init_file = folder / "__init__.py"
    marker = folder.parent / INSTALLED_MARKER
    if not folder.exists() and marker.is_file() and not again:
        logger.info(
            "the node pack was removed from %s (InvokeAI's Custom Nodes tab?), so it is not "
            "installed again; `invokeai-ti install-nodes` puts it back",
            folder.parent,
        )
        return False
    written = False
    if not (init_file.is_file() and init_file.read_text(encoding="utf-8") == NODE_PACK_SOURCE):
        write_atomically(init_file, lambda temp: temp.write_text(NODE_PACK_SOURCE, "utf-8"))
        written = True
    if not marker.is_file():  # also for a pack installed before there was a marker
        write_atomically(marker, lambda temp: temp.write_text(f"{folder.name}\n", "utf-8"))
    return written
