"""The diffusers main models installed in InvokeAI, and which of them this trainer can train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..training.model_files import TRAINABLE_BASES
from .model_db import HostModels


@dataclass(frozen=True)
class InstalledModel:
    name: str
    key: str
    base: str
    format: str
    path: Path
    problem: str | None  # why it cannot be trained, or None

    @property
    def trainable(self) -> bool:
        return self.problem is None


def _problem_of(base: str, model_format: str, path: Path) -> str | None:
    if base not in TRAINABLE_BASES:
        return f"{base} models are not supported (SD 1.x, SD 2.x and SDXL are)"
    if model_format != "diffusers":
        return "a single-file checkpoint; convert it to diffusers in InvokeAI's model manager"
    if not (path / "model_index.json").is_file():
        return f"its files are missing from {path}"
    return None


def installed_main_models(models: HostModels) -> list[InstalledModel]:
    """Every main model, trainable ones first, then by name."""
    from invokeai.backend.model_manager.taxonomy import ModelType

    found = []
    for record in models.store.search_by_attr(model_type=ModelType.Main):
        base, model_format = record.base.value, record.format.value
        path = models.absolute(record.path)
        found.append(
            InstalledModel(
                record.name,
                record.key,
                base,
                model_format,
                path,
                _problem_of(base, model_format, path),
            )
        )
    return sorted(found, key=lambda model: (not model.trainable, model.name.lower(), model.key))


def find_installed_model(models: HostModels, name_or_key: str) -> list[InstalledModel]:
    """Models whose key or name is `name_or_key` (a name can be shared by several)."""
    everything = installed_main_models(models)
    by_key = [model for model in everything if model.key == name_or_key]
    return by_key or [model for model in everything if model.name == name_or_key]


def install_main_model(models: HostModels, folder: Path, name: str) -> InstalledModel:
    """Register a diffusers folder in place as a main model (once; again returns the same)."""
    from invokeai.app.services.model_records import ModelRecordChanges

    existing = [model for model in find_installed_model(models, name) if model.path == folder]
    if existing:
        return existing[0]
    key = models.installer.register_path(folder, ModelRecordChanges(name=name))
    (model,) = [model for model in installed_main_models(models) if model.key == key]
    return model


def installed_models_at(root: Path) -> list[InstalledModel]:
    """The main models of the InvokeAI at `root`; no InvokeAI there is the user's error."""
    from ..errors import UserInputError
    from .app_config import is_host_root
    from .model_db import open_host_models

    if not is_host_root(root):
        raise UserInputError(
            f"no InvokeAI installation at {root}; set INVOKEAI_ROOT or pass --root", option="root"
        )
    with open_host_models(root) as models:
        return installed_main_models(models)
