"""`invokeai-launcher`: the numbered menu of the InvokeAI 2.3 launcher, with plugin entries.

Keyboard-only and line-based, so it works over SSH. Entries come from the `invokeai.plugins`
entry points (each plugin's `menu_entries`: `(label, run)` pairs, see `host/plugins_loader.py`);
the node pack that runs plugins inside InvokeAI is installed before the web UI starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from .host.app_config import find_root
from .host.plugins_loader import ENTRY_POINT_GROUP
from .plugin import MenuEntry

logger = logging.getLogger(__name__)


def _start_web_ui(root: Path) -> int:
    from .host.node_pack import install_node_pack

    install_node_pack(root)
    command = shutil.which("invokeai-web", path=str(Path(sys.executable).parent)) or "invokeai-web"
    return subprocess.call([command, "--root", str(root)])


def _developer_console(root: Path) -> int:
    """A shell with this Python environment first on PATH and the root selected."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "VIRTUAL_ENV": str(Path(sys.prefix)),
        "INVOKEAI_ROOT": str(root),
    }
    print("Developer console: type `exit` to come back to the menu.")
    return subprocess.call([os.environ.get("SHELL", "/bin/sh")], env=env)


def plugin_menu_entries() -> list[MenuEntry]:
    """Every installed plugin's entries; a broken plugin is logged and skipped, never fatal."""
    found = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            pairs = getattr(entry.load(), "menu_entries", None) or ()
            found += [MenuEntry(str(label), run) for label, run in pairs]
        except Exception as error:  # a third-party plugin failing must not stop the launcher
            logger.warning("plugin %s could not be loaded: %s", entry.name, error)
    return found


def menu_entries(root: Path) -> list[MenuEntry]:
    entries = [MenuEntry("start the web UI", lambda: _start_web_ui(root))]
    entries.extend(plugin_menu_entries())
    entries.append(MenuEntry("open the developer console", lambda: _developer_console(root)))
    return entries


def run_menu(entries: list[MenuEntry], ask: Callable[[str], str] = input) -> int:
    """Show the menu until the user quits (or input ends)."""
    quit_number = len(entries) + 1
    numbers = ", ".join(str(n) for n in range(1, quit_number)) + f" or {quit_number}"
    while True:
        print("Do you want to")
        for number, entry in enumerate(entries, start=1):
            print(f"{number}. {entry.label}")
        print(f"{quit_number}. quit")
        try:
            reply = ask(f"Please enter {numbers}: [1] ").strip() or "1"
        except EOFError:
            return 0
        if reply == str(quit_number) or reply.lower() in ("q", "quit"):
            return 0
        if reply.isdigit() and 1 <= int(reply) <= len(entries):
            entries[int(reply) - 1].run()
        else:
            print(f"{reply!r} is not on the menu.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="invokeai-launcher", description="The InvokeAI launcher menu, with its plugins."
    )
    parser.add_argument("--root", type=Path, help="the InvokeAI root (default: InvokeAI's rule)")
    args = parser.parse_args(argv)
    root = (args.root or find_root()).expanduser().absolute()
    os.environ["INVOKEAI_ROOT"] = str(root)  # plugins, the web UI and the console all use it
    print(f"InvokeAI root: {root}")
    return run_menu(menu_entries(root))


if __name__ == "__main__":
    sys.exit(main())
