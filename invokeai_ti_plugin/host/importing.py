"""`invokeai-ti import`: embeddings made elsewhere, checked, stored readably, registered.

Accepted, each recognised by its content: our own files and kohya / invoke-training / ComfyUI
`.safetensors` (`emb_params`, or SDXL `clip_l` + `clip_g`); concepts-library folders
(`learned_embeds.bin` + `token_identifier.txt`); diffusers' example output (`{token: vectors}`),
for SDXL its pair learned_embeds + learned_embeds_2 as one embedding; A1111 `.pt` (also with an
`nn.ParameterDict`, as the original textual-inversion repo wrote them) and A1111 `.png` embedding
images; LoRAs with bundled embeddings, each bundled one under its own name (the LoRA stays as it
is). All are read without executing code and re-written in the layout InvokeAI reads correctly,
keeping what the source says about itself, and registered under a name usable as `<name>`.
Everything is read and checked before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import name_problem, trigger_of
from ..errors import UserInputError
from ..training.embedding_file import (
    EMBEDDING_SUFFIXES,
    EmbeddingVectors,
    read_bundled_embeddings,
    read_embedding_vectors,
    read_sdxl_halves,
)
from ..training.foreign_embeddings import ACCEPTED, NotAnEmbedding
from .embeddings import (
    RegisteredEmbedding,
    check_fits_model,
    check_prompt_name,
    install_embedding,
    relate_models,
)
from .model_db import open_host_models
from .running_server import refresh_running_server

IMPORT_SUFFIXES = EMBEDDING_SUFFIXES | {".png"}
_SNAPSHOT = re.compile(r"(learned_embeds(?:_2)?)-steps-\d+")  # diffusers' intermediate saves


@dataclass(frozen=True)
class FoundEmbedding:
    file: Path  # the file that names it (its token, folder or file name)
    origin: str  # where it came from, for messages and embedding.json
    vectors: EmbeddingVectors
    files: frozenset[Path]  # every file it was read from, resolved


@dataclass(frozen=True)
class ImportReport:
    registered: list[tuple[RegisteredEmbedding, str]]  # each with where it came from
    skipped: list[str]  # files of a folder that hold no embedding, and what they are


def files_to_import(sources: Sequence[Path]) -> list[tuple[Path, bool]]:
    """Each file, True when the user named it; a folder's candidate files, False."""
    files: list[tuple[Path, bool]] = []
    for source in sources:
        if source.is_dir():
            files += [(file, False) for file in _folder_files(source)]
        elif source.is_file():
            files.append((source, True))
        elif source.exists():
            raise UserInputError(
                f"{source} is not a regular file or folder (a device or pipe?); {ACCEPTED}"
            )
        else:
            raise UserInputError(f"{source} does not exist; pass an embedding file or folder")
    return files


def name_of(file: Path, vectors: EmbeddingVectors) -> str:
    """The token the file names, else the concept folder's trigger, else the folder's name (for a
    learned_embeds file) or the file's. The first one found is the name, or the file is refused:
    another one might name a different concept."""
    identifier = file.parent / "token_identifier.txt"
    identified = identifier.read_text(errors="replace").strip() if identifier.is_file() else ""
    candidates = (
        ("the token it names", trigger_of(vectors.token) if vectors.token else ""),
        (identifier.name, trigger_of(identified)),
        ("its folder", file.resolve().parent.name if file.stem == "learned_embeds" else ""),
        ("its file name", file.stem),
    )
    source, name = next(((source, name) for source, name in candidates if name), candidates[-1])
    problem = name_problem(name)
    if problem:
        raise UserInputError(
            f"{file} is named {name!r} by {source}, but the name {problem}; pass --name NAME"
        )
    return name


def embeddings_in(files: list[tuple[Path, bool]]) -> tuple[list[FoundEmbedding], list[str]]:
    """Every embedding in `files`, and what the skipped ones are. A file named on its own that
    holds no embedding is an error; so is a folder holding none."""
    found: list[FoundEmbedding] = []
    skipped: list[str] = []
    used: set[Path] = set()
    for file, named in files:
        if file.resolve() in used:  # the other half of a pair already read
            continue
        try:
            read = _embeddings_of(file)
        except NotAnEmbedding as error:
            if named:
                raise
            skipped.append(error.what)
            continue
        for embedding in read:
            used |= embedding.files
        found += read
    if not found:
        raise UserInputError(f"nothing to import: {'; '.join(skipped)}; {ACCEPTED}")
    return found, skipped


def import_embeddings(
    root: Path,
    sources: Sequence[Path],
    name: str | None = None,
    model_dim: int | None = None,
    model_key: str | None = None,
) -> ImportReport:
    """Read and check everything first (against `model_dim`, a model's token width, if given),
    then store and register it all, related to the installed model `model_key` if given."""
    found, skipped = embeddings_in(files_to_import(sources))
    if name and len(found) > 1:
        origins = ", ".join(embedding.origin for embedding in found)
        raise UserInputError(f"--name fits one embedding, but there are {len(found)}: {origins}")
    checked = []
    for embedding in found:
        chosen = check_prompt_name(name) if name else name_of(embedding.file, embedding.vectors)
        embedding.vectors.base(embedding.origin)
        if model_dim is not None:
            check_fits_model(chosen, embedding.vectors, model_dim)
        checked.append((embedding, chosen))
    _refuse_two_of_a_name(checked)
    with open_host_models(root) as models:
        registered = [
            (
                install_embedding(models, chosen, embedding.vectors, _facts(embedding)),
                embedding.origin,
            )
            for embedding, chosen in checked
        ]
        if model_key is not None:
            for embedding_record, _ in registered:
                relate_models(models, embedding_record.key, model_key)
        refresh_running_server(models)
    return ImportReport(registered, skipped)


def _folder_files(folder: Path) -> list[Path]:
    """The folder's candidate files, without diffusers' -steps-N snapshots of a final file."""
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMPORT_SUFFIXES
    )
    names = {path.name for path in files}
    kept = [path for path in files if not _superseded(path, names)]
    if not kept:
        others = sorted(path.name for path in folder.iterdir())
        held = f"only {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
        raise UserInputError(
            f"{folder} holds no embedding files ({held if others else 'it is empty'}); {ACCEPTED}"
        )
    return kept


def _superseded(path: Path, names: set[str]) -> bool:
    snapshot = _SNAPSHOT.fullmatch(path.stem)
    return snapshot is not None and f"{snapshot.group(1)}{path.suffix}" in names


def _embeddings_of(file: Path) -> list[FoundEmbedding]:
    """A LoRA's bundled embeddings, the SDXL pair the file is half of, or the file's own."""
    resolved = frozenset({file.resolve()})
    bundled = read_bundled_embeddings(file)
    if bundled:
        return [
            FoundEmbedding(file, f"{file.resolve()} (bundle_emb.{key})", vectors, resolved)
            for key, vectors in bundled.items()
        ]
    paired = read_sdxl_halves(file)
    if paired:
        (first, second), vectors = paired
        origin = f"{first.resolve()} + {second.resolve()}"
        both = frozenset({first.resolve(), second.resolve()})
        return [FoundEmbedding(first, origin, vectors, both)]
    return [FoundEmbedding(file, str(file.resolve()), read_embedding_vectors(file), resolved)]


def _refuse_two_of_a_name(checked: list[tuple[FoundEmbedding, str]]) -> None:
    """Two embeddings of one name and base in one import: the second would silently replace the
    first."""
    seen: dict[tuple[str, str], str] = {}
    for embedding, chosen in checked:
        key = (chosen, embedding.vectors.base(embedding.origin))
        if key in seen:
            raise UserInputError(
                f"{seen[key]} and {embedding.origin} are both the {key[1]} embedding <{chosen}>; "
                "import one of them (with --name to give it another name)"
            )
        seen[key] = embedding.origin


def _facts(embedding: FoundEmbedding) -> dict[str, object]:
    return {"imported_from": embedding.origin, "source_metadata": embedding.vectors.metadata}
