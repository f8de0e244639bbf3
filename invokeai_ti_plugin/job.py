"""One training job as a user sees it: find the model in InvokeAI, train, register the result.

Every front end (command line, launcher, form) runs jobs through here, so they all resolve
models, check token dimensions and register embeddings the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import TrainingConfig
from .errors import UserInputError
from .host.app_config import is_host_root
from .host.embeddings import RegisteredEmbedding, check_fits_model, install_embedding
from .host.installed_models import find_installed_model
from .host.model_db import open_host_models
from .host.node_pack import install_node_pack
from .host.running_server import refresh_running_server
from .training.embedding_file import read_embedding_vectors
from .training.trainer import ProgressCallback, Trainer, TrainingResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    training: TrainingResult
    registered: RegisteredEmbedding | None
    note: str  # what happened about registration, for the user


def resolve_model_folder(model_name: str, root: Path) -> Path:
    """`--model` as a diffusers folder: a path as given, else a model installed in InvokeAI."""
    given = Path(model_name).expanduser()
    if given.is_dir():
        return given
    if not is_host_root(root):
        raise UserInputError(
            f"{model_name!r} is not a folder, and there is no InvokeAI installation at {root} "
            "to look it up in; pass a diffusers folder, or set INVOKEAI_ROOT or --root",
            option="model",
        )
    with open_host_models(root) as models:
        matches = find_installed_model(models, model_name)
    if not matches:
        raise UserInputError(
            f"no model named {model_name!r} is installed in InvokeAI at {root}; "
            "see `invokeai-ti --list-models`",
            option="model",
        )
    if len(matches) > 1:
        keys = ", ".join(f"{model.key} ({model.base})" for model in matches)
        raise UserInputError(
            f"several models are named {model_name!r} ({keys}); pass the key instead",
            option="model",
        )
    (model,) = matches
    if model.problem:
        raise UserInputError(f"{model.name} cannot be trained: {model.problem}", option="model")
    return model.path


def run_job(
    config: TrainingConfig,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[Trainer], object] | None = None,
) -> JobResult:
    """Train and register; `on_start` receives the trainer (a form's Stop button calls
    `request_stop` on it)."""
    folder = resolve_model_folder(config.model, config.root)
    trainer = Trainer(config.model_copy(update={"model": str(folder)}), on_progress)
    if on_start is not None:
        on_start(trainer)
    result = trainer.run()
    if not result.main_process:
        return JobResult(result, None, "registration is the main process's job")
    if not result.completed:
        return JobResult(result, None, "not registered: training stopped before the end")
    if not config.register_embedding:
        return JobResult(result, None, "not registered (--no-register_embedding)")
    if not is_host_root(config.root):
        return JobResult(
            result,
            None,
            f"not registered: no InvokeAI installation at {config.root} (set INVOKEAI_ROOT or "
            "--root)",
        )
    return JobResult(result, register_trained_embedding(config.root, result), "registered")


def register_trained_embedding(root: Path, result: TrainingResult) -> RegisteredEmbedding:
    """Copy the embedding into ROOT/embeddings/<trigger>/<base>/, register it with InvokeAI."""
    vectors = read_embedding_vectors(result.embedding_path)
    check_fits_model(result.trigger, vectors, result.model.token_dim)
    facts = json.loads(result.summary_path.read_text())
    with open_host_models(root) as models:
        install_node_pack(models.root)
        registered = install_embedding(models, result.trigger, vectors, facts)
        refresh_running_server(models)
    return registered
