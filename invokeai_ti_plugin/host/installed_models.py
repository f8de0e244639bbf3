"""The main models installed in InvokeAI, and which of them this trainer can train: SD 1.x,
2.x and SDXL base models, as diffusers folders or single-file checkpoints (InvokeAI's own model
manager loads both for training, see `model_loading`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..training.bases import TRAINABLE_BASES
from .model_db import HostModels

if TYPE_CHECKING:
    from invokeai.backend.model_manager.configs.factory import AnyModelConfig


@dataclass(frozen=True)
class InstalledModel:
    name: str
    key: str
    base: str
    format: str
    path: Path
    problem: str | None  # why it cannot be trained, or None
    record: AnyModelConfig = field(repr=False, compare=False)  # the host's own record of it

    @property
    def trainable(self) -> bool:
        return self.problem is None

    @property
    def kind(self) -> str:
        """Its base, and "v-pred" where InvokeAI's record says it predicts v: training follows
        the record, so a wrong one is for the user to see (and fix) before a run."""
        predicts = getattr(getattr(self.record, "prediction_type", None), "value", "epsilon")
        return f"{self.base} v-pred" if predicts == "v_prediction" else self.base


def problem_of(record: AnyModelConfig, path: Path) -> str | None:
    """Why InvokeAI's main model `record` (its files at `path`) cannot be trained, or None."""
    base, model_format = record.base.value, record.format.value
    variant = getattr(getattr(record, "variant", None), "value", "normal")
    if base == "sdxl-refiner":
        return "an SDXL refiner; train on the SDXL base model (embeddings are used with it)"
    if base not in TRAINABLE_BASES:
        return f"{base} models are not supported (SD 1.x, SD 2.x and SDXL are)"
    if variant != "normal":
        return f"an {variant} model; train on a normal (text-to-image) model of the same base"
    if model_format == "diffusers" and not (path / "model_index.json").is_file():
        return f"its files are missing from {path}"
    if model_format == "checkpoint" and not path.is_file():
        return f"its file {path} is missing"
    if model_format in ("diffusers", "checkpoint"):
        return None
    return f"a {model_format} model; diffusers folders and single-file checkpoints can be trained"


def installed_main_models(models: HostModels) -> list[InstalledModel]:
    """Every main model, trainable ones first, then by name."""
    from invokeai.backend.model_manager.taxonomy import ModelType

    found = []
    for record in models.store.search_by_attr(model_type=ModelType.Main):
        path = models.absolute(record.path)
        found.append(
            InstalledModel(
                record.name,
                record.key,
                record.base.value,
                record.format.value,
                path,
                problem_of(record, path),
                record,
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
    key = models.register(folder, ModelRecordChanges(name=name))
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
