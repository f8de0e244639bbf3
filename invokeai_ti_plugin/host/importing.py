"""`invokeai-ti import`: embeddings made elsewhere, checked, stored readably, registered.

Concepts-library folders (`learned_embeds.bin` + `token_identifier.txt`), A1111 `.pt`, kohya and
invoke-training `.safetensors`: all are read without executing code, re-written in the layout
InvokeAI reads correctly, and registered under a name usable as `<name>` in prompts.
"""

from __future__ import annotations

from pathlib import Path

from ..config import PROMPT_NAME, trigger_of
from ..errors import UserInputError
from ..training.embedding_file import EMBEDDING_SUFFIXES, EmbeddingVectors, read_embedding_vectors
from ..training.model_files import inspect_model
from .embeddings import RegisteredEmbedding, check_fits_model, install_embedding
from .model_db import open_host_models
from .running_server import refresh_running_server


def files_to_import(source: Path) -> list[Path]:
    """A file, or the embedding files of a folder (a concepts-library download)."""
    if source.is_file():
        return [source]
    if source.is_dir():
        found = sorted(
            p for p in source.iterdir() if p.is_file() and p.suffix in EMBEDDING_SUFFIXES
        )
        if found:
            return found
        raise UserInputError(f"{source} holds no .safetensors, .bin or .pt embedding files")
    raise UserInputError(f"{source} does not exist; pass an embedding file or folder")


def name_of(file: Path, vectors: EmbeddingVectors) -> str:
    """The token the file names, the concept folder's trigger, or the file name."""
    identifier = file.parent / "token_identifier.txt"
    candidates = [
        trigger_of(vectors.token) if vectors.token else None,
        trigger_of(identifier.read_text().strip()) if identifier.is_file() else None,
        file.parent.name if file.stem == "learned_embeds" else None,
        file.stem,
    ]
    for candidate in candidates:
        if candidate and PROMPT_NAME.fullmatch(candidate):
            return candidate
    raise UserInputError(f"cannot derive a prompt name from {file}; pass --name")


def import_embeddings(
    root: Path, source: Path, name: str | None = None, model_folder: Path | None = None
) -> list[RegisteredEmbedding]:
    """Check every file first, then store and register them all."""
    files = files_to_import(source)
    if name and len(files) > 1:
        raise UserInputError(f"--name fits one embedding, but {source} holds {len(files)}")
    checked = []
    for file in files:
        vectors = read_embedding_vectors(file)
        vectors.base(str(file))
        chosen = name or name_of(file, vectors)
        if model_folder is not None:
            check_fits_model(chosen, vectors, inspect_model(model_folder).token_dim)
        checked.append((file, chosen, vectors))
    with open_host_models(root) as models:
        registered = [
            install_embedding(models, chosen, vectors, {"imported_from": str(file.resolve())})
            for file, chosen, vectors in checked
        ]
        refresh_running_server(models)
    return registered
