"""Embeddings as InvokeAI models: stored under ROOT/embeddings/<name>/ and registered by name.

The host itself would register a file it cannot classify as an `Unknown` model, accept two
embeddings of the same name and base (and then fail every prompt using it), and keep serving an
old file's vectors. So every registration here checks the vectors first, refuses name clashes,
replaces its own earlier record, verifies what the host's probe made of the file, and leaves no
record behind when anything is off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..atomic_files import write_json_atomically
from ..config import PROMPT_NAME
from ..errors import UserInputError
from ..training.embedding_file import (
    EMBEDDING_FILENAME,
    EmbeddingVectors,
    save_vectors,
    token_dimension_mismatch,
)
from .model_db import HostModels

logger = logging.getLogger(__name__)

EMBEDDINGS_DIRNAME = "embeddings"
SIDECAR_FILENAME = "embedding.json"


@dataclass(frozen=True)
class RegisteredEmbedding:
    name: str
    key: str
    base: str
    path: Path
    replaced: bool  # an earlier version of this embedding was replaced


def embeddings_folder(root: Path) -> Path:
    return root / EMBEDDINGS_DIRNAME


def check_prompt_name(name: str) -> str:
    if not PROMPT_NAME.fullmatch(name):
        raise UserInputError(
            f"{name!r} cannot be used in InvokeAI prompts as <{name}>; use only letters, digits, "
            "'.', '_' and '-'"
        )
    return name


def check_fits_model(name: str, vectors: EmbeddingVectors, model_token_dim: int) -> None:
    """The manual's token-dimension check, wherever an embedding meets a model."""
    if vectors.token_dim != model_token_dim:
        raise token_dimension_mismatch(name, vectors.token_dim, model_token_dim)


def embedding_records(models: HostModels) -> list:  # type: ignore[type-arg]
    from invokeai.backend.model_manager.taxonomy import ModelType

    return list(models.store.search_by_attr(model_type=ModelType.TextualInversion))


def register_embedding_file(
    models: HostModels, file: Path, name: str, vectors: EmbeddingVectors
) -> RegisteredEmbedding:
    """Register `file` (already in place) as the embedding `name`, replacing our own old record."""
    from invokeai.app.services.model_records import ModelRecordChanges

    check_prompt_name(name)
    base = vectors.base(str(file))
    if not vectors.host_reads_as_is:
        raise UserInputError(
            f"InvokeAI would misread the layout of {file}; bring it in with "
            f"`invokeai-ti import {file}`, which stores a corrected copy"
        )
    target = file.resolve()
    previous = _records_replaced_by(models, name, base, target)
    for record in previous:
        models.installer.unregister(record.key)
    key = models.installer.register_path(
        target, ModelRecordChanges(name=name, description=f"textual inversion <{name}>")
    )
    record = models.store.get_model(key)
    if record.type.value != "embedding" or record.base.value != base:
        models.installer.unregister(key)
        raise UserInputError(
            f"InvokeAI read {file} as a {record.base.value} {record.type.value} model instead of "
            f"a {base} embedding; it was not registered"
        )
    logger.info("registered <%s> (%s) with InvokeAI", name, base)
    return RegisteredEmbedding(name, key, base, target, replaced=bool(previous))


def install_embedding(
    models: HostModels, name: str, vectors: EmbeddingVectors, facts: dict[str, object]
) -> RegisteredEmbedding:
    """Store vectors as ROOT/embeddings/<name>/learned_embeds.safetensors and register them.

    `facts` (what was trained, or where it came from) go beside the file as embedding.json, so a
    start-up check can tell what the file is meant for.
    """
    check_prompt_name(name)
    base = vectors.base(f"<{name}>")
    folder = embeddings_folder(models.root) / name
    target = folder / EMBEDDING_FILENAME
    _records_replaced_by(models, name, base, target)  # refuse a clash before writing
    metadata = {"name": name, "base": base, "token_dimension": str(vectors.token_dim)}
    save_vectors(target, vectors, metadata)
    write_json_atomically(folder / SIDECAR_FILENAME, {**facts, **metadata})
    return register_embedding_file(models, target, name, EmbeddingVectors(vectors.tensors))


def _records_replaced_by(models: HostModels, name: str, base: str, target: Path) -> list:  # type: ignore[type-arg]
    """Our earlier records of `target`; refuses another file already using the name."""
    previous = []
    for record in embedding_records(models):
        if models.absolute(record.path).resolve() == target.resolve():
            previous.append(record)
        elif record.name == name and record.base.value == base:
            raise UserInputError(
                f"InvokeAI already has a {base} embedding named <{name}> ({record.path}); "
                "choose another name, or delete that one in InvokeAI's model manager"
            )
    return previous
