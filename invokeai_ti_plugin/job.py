"""One training job as a user sees it: find the model in InvokeAI, train, register the result.

Every front end (command line, launcher, form) runs jobs through here, so they all resolve
models, check token dimensions and register embeddings the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .config import TrainingConfig
from .errors import UserInputError
from .host.app_config import is_host_root
from .host.embeddings import (
    RegisteredEmbedding,
    check_fits_model,
    install_embedding,
    relate_models,
    set_cover_image,
)
from .host.installed_models import InstalledModel, find_installed_model
from .host.model_db import HostModels, open_host_models
from .host.model_loading import host_model_source, standalone_model_loader
from .host.node_pack import install_node_pack
from .host.running_server import refresh_running_server
from .training.bases import TOKEN_DIMS
from .training.embedding_file import read_embedding_vectors
from .training.model_files import ModelSource, inspect_model
from .training.reports import ProgressCallback, TrainingResult
from .training.samples import first_sample, runs_last_grid
from .training.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    training: TrainingResult
    registered: RegisteredEmbedding | None
    note: str  # what happened about registration, for the user


@contextmanager
def _models_of(root: Path, server: HostModels | None) -> Iterator[HostModels]:
    """The running server's own model services when inside it, else the root's database."""
    if server is not None:
        yield server
        return
    with open_host_models(root) as models:
        yield models


def resolve_model(
    model_name: str, root: Path, server: HostModels | None = None
) -> Path | InstalledModel:
    """`--model`: a diffusers folder given by its path, else a model installed in InvokeAI."""
    given = Path(model_name).expanduser()
    if given.is_dir():
        return given
    if given.is_file():
        raise UserInputError(
            f"{model_name} is a single-file checkpoint; add it in InvokeAI's model manager "
            "first, then pass its name (see `invokeai-ti --list-models`)",
            option="model",
        )
    if not is_host_root(root):
        raise UserInputError(
            f"{model_name!r} is not a folder, and there is no InvokeAI installation at {root} "
            "to look it up in; pass a diffusers folder, or set INVOKEAI_ROOT or --root",
            option="model",
        )
    with _models_of(root, server) as models:
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
    return model


def import_target(model_name: str, root: Path) -> tuple[int, str | None]:
    """What an import's `--model` means: the token width an embedding must have to fit it (a
    folder's from its configs, an installed model's, of any format, from its base), and the
    installed model's InvokeAI key, which the imported embeddings are related to (None for a
    folder)."""
    model = resolve_model(model_name, root)
    if isinstance(model, Path):
        return inspect_model(model).token_dim, None
    return TOKEN_DIMS[model.base][-1], model.key  # type: ignore[index]  # a trainable base


@contextmanager
def _training_model(
    config: TrainingConfig, server: HostModels | None, model_source: ModelSource | None
) -> Iterator[tuple[TrainingConfig, ModelSource | None]]:
    """The run's model: a diffusers folder given by path trains from its files; an installed
    model through InvokeAI's model manager (the server's own, passed as `model_source`, or one
    built on the root as the server builds it), so every model InvokeAI runs can be trained."""
    if model_source is not None:
        yield config, model_source
        return
    model = resolve_model(config.model, config.root, server)
    if isinstance(model, Path):
        yield config.model_copy(update={"model": str(model)}), None
        return
    with standalone_model_loader(config.root) as loader_for:
        yield config, host_model_source(model.record, loader_for(model.record))


def run_job(
    config: TrainingConfig,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[Trainer], object] | None = None,
    server: HostModels | None = None,
    model_source: ModelSource | None = None,
) -> JobResult:
    """Train and register; `on_start` receives the trainer (a form's Stop button calls
    `request_stop` on it). Inside `invokeai-web`, `server` is its own model services and
    `model_source` the model from its model manager (`host.model_loading.host_model_source`)."""
    with _training_model(config, server, model_source) as (run_config, source):
        trainer = Trainer(run_config, on_progress, source)
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
    registered = register_trained_embedding(config.root, result, server)
    return JobResult(result, registered, "registered")


def register_trained_embedding(
    root: Path, result: TrainingResult, server: HostModels | None = None
) -> RegisteredEmbedding:
    """Copy the embedding into ROOT/embeddings/<trigger>/<base>/, register it with InvokeAI
    (from outside a running server, telling it to drop what it cached; inside, the caller
    does that)."""
    vectors = read_embedding_vectors(result.embedding_path)
    check_fits_model(result.trigger, vectors, result.model.token_dim)
    facts = json.loads(result.summary_path.read_text())
    cover = _cover_image(result.summary_path.parent, facts)
    with _models_of(root, server) as models:
        install_node_pack(models.root)
        registered = install_embedding(models, result.trigger, vectors, facts)
        if cover is not None:  # what the word draws, beside its name in the model manager
            set_cover_image(models, registered.key, cover)
        if result.model.host_key is not None:
            relate_models(models, registered.key, result.model.host_key)
        if server is None:
            refresh_running_server(models)
    return registered


def _cover_image(out_dir: Path, facts: dict[str, Any]) -> Image.Image | None:
    """The run's first sample, read before anything is registered; None when the run drew
    none or its grid cannot be read (the embedding is registered without a picture)."""
    grid = runs_last_grid(out_dir, facts["options"]["num_validation_images"])
    if grid is None:
        return None
    try:
        return first_sample(grid, facts["resolution"])
    except OSError as error:
        logger.warning("no cover image for the model manager: cannot read %s (%s)", grid, error)
        return None
