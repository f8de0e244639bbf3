"""What the form fills in by itself, as the manual promises: the folders follow the trigger,
resume follows the checkpoints in the output folder, the resolution follows the model.

A filled-in field keeps following until the user changes it: `Follower` remembers what it last
put in each field, and only replaces a value that is still that (or blank).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from ..host.installed_models import InstalledModel
from ..training.checkpoints import list_checkpoints
from ..training.model_files import inspect_model


def has_checkpoint(output_dir: str) -> bool:
    return bool(output_dir.strip()) and bool(list_checkpoints(Path(output_dir).expanduser()))


def native_resolution(model: InstalledModel) -> int | None:
    """The model's own image size, from its configs (instant); None if they cannot be read."""
    try:
        return inspect_model(model.path).native_resolution
    except UserInputError:
        return None


class Follower:
    """Decides whether a field may be filled in, so that the user's own values always stay."""

    def __init__(self) -> None:
        self._filled: dict[str, str | bool] = {}

    def fill(self, name: str, current: str | bool, new: str | bool) -> bool:
        """Whether to set field `name` (holding `current`) to `new`; remembers `new` if so."""
        blank: str | bool = "" if isinstance(current, str) else False
        if current not in (self._filled.get(name, blank), ""):  # "": a cleared text field
            return False
        self._filled[name] = new
        return True
