"""At InvokeAI start-up: register embeddings that arrived in ROOT/embeddings/ while it was down.

Runs inside the server with the server's own services. A file that fits no base, clashes with
another embedding's name, or contradicts what it was trained for is reported in the host log
once per start and never becomes a record; records whose files were deleted are reported. An
embedding deleted in InvokeAI's model manager (which leaves its file) stays deleted
(`registered_files.py`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import embeddings_folder
from ..errors import UserInputError
from ..training.bases import TRAINABLE_BASES
from ..training.embedding_file import (
    EMBEDDING_FILENAME,
    EMBEDDING_SUFFIXES,
    EmbeddingVectors,
    read_embedding_vectors,
)
from ..training.run_folder import MARKER_FILENAME, SUMMARY_FILENAME
from .embeddings import (
    check_fits_model,
    embedding_records,
    register_embedding_file,
)
from .model_db import HostModels
from .registered_files import RegisteredFiles

logger = logging.getLogger(__name__)


@dataclass
class StartupReport:
    registered: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line per file, with the reason
    missing: list[str] = field(default_factory=list)  # records whose files are gone
    deleted: list[Path] = field(default_factory=list)  # files whose records the user deleted


def embedding_files(folder: Path) -> list[Path]:
    """Embedding files under `folder`, skipping hidden and half-written ones, and training run
    folders (their checkpoints are not embeddings to use). Linked folders are followed, each
    real folder once (a link loop ends): users link in the embeddings folder they share with
    A1111 or ComfyUI. Files keep their paths inside `folder`."""
    if not folder.is_dir():
        return []
    found: list[Path] = []
    run_folders: set[Path] = set()
    seen: set[str] = set()
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        here = Path(directory)
        if MARKER_FILENAME in names:
            run_folders.add(here)
        found.extend(
            here / name
            for name in names
            if not name.startswith(".")
            and Path(name).suffix in EMBEDDING_SUFFIXES
            and (here / name).is_file()
        )
    return sorted(path for path in found if run_folders.isdisjoint(path.parents))


def name_for(file: Path, folder: Path) -> str:
    """The name in the embedding.json beside the file (we write one); else a file alone in its
    folder takes the folder's name: embeddings/<name>/<base>/ (a base folder never names one) or
    embeddings/<name>/; else the file's own name."""
    named = _sidecar(file).get("name")
    if isinstance(named, str) and named:
        return named
    parent = file.parent
    if parent == folder or len(embedding_files(parent)) != 1:
        return file.stem
    if parent.name in TRAINABLE_BASES:
        return parent.parent.name if parent.parent != folder else file.stem
    return parent.name


def sync_embeddings(models: HostModels) -> StartupReport:
    report = StartupReport()
    folder = embeddings_folder(models.root)
    earlier = RegisteredFiles(models.root)
    known = set()
    for record in embedding_records(models):
        path = models.absolute(record.path)
        known.add(path.resolve())
        if not path.exists():
            report.missing.append(f"<{record.name}> ({record.key}): {path}")
        earlier.add(path)  # also those registered by hand or by earlier versions
    for file in embedding_files(folder):
        if file.resolve() in known:
            continue
        if earlier.was_registered(file):
            report.deleted.append(file)
            continue
        name = name_for(file, folder)
        try:
            vectors = read_embedding_vectors(file)
            _check_sidecar(file, name, vectors)
            register_embedding_file(models, file, name, vectors)
            known.add(file.resolve())  # a link to it is not registered a second time
            report.registered.append(name)
        except UserInputError as error:
            report.refused.append(f"{file}: {error}")
    earlier.save()
    for line in report.missing:
        logger.warning("embedding record whose file is gone: %s", line)
    for line in report.refused:
        logger.warning("embedding not registered: %s", line)
    if report.deleted:
        logger.info(
            "not registering again embeddings deleted in InvokeAI's model manager (it leaves "
            "their files; delete those, or `invokeai-ti import` one to bring it back): %s",
            ", ".join(str(file) for file in report.deleted),
        )
    if report.registered:
        logger.info("registered embeddings found in %s: %s", folder, ", ".join(report.registered))
    return report


def _sidecar(file: Path) -> dict[str, Any]:
    """The embedding.json we write beside learned_embeds.safetensors, or {} (none, unreadable,
    or another file)."""
    if file.name != EMBEDDING_FILENAME:
        return {}
    try:
        facts = json.loads((file.parent / SUMMARY_FILENAME).read_text())
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def _check_sidecar(file: Path, name: str, vectors: EmbeddingVectors) -> None:
    """An embedding.json beside the file names the model width it is meant for."""
    try:
        model_dim = int(_sidecar(file)["token_dimension"])
    except (ValueError, KeyError, TypeError):
        return
    check_fits_model(name, vectors, model_dim)
