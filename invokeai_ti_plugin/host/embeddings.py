"""Embeddings as InvokeAI models: stored under ROOT/embeddings/<name>/<base>/, registered by name.

The host itself would register a file it cannot classify as an `Unknown` model, accept two
embeddings of the same name and base (and then fail every prompt using it), and keep serving an
old file's vectors. So every registration here checks the vectors first, refuses name clashes,
replaces its own earlier record of the same name and base (never another base's), verifies what
the host's probe made of the file, and leaves no record behind when anything is off.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..atomic_files import write_json_atomically
from ..config import embeddings_folder, name_problem
from ..errors import UserInputError
from ..training.embedding_file import (
    EMBEDDING_FILENAME,
    EmbeddingVectors,
    save_vectors,
    token_dimension_mismatch,
)
from ..training.run_folder import SUMMARY_FILENAME
from .model_db import HostModels
from .registered_files import note_registered

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class RegisteredEmbedding:
    name: str
    key: str
    base: str
    path: Path
    replaced: bool  # an earlier version of this embedding (same name and base) was replaced

    @property
    def verb(self) -> str:
        """What happened, for the user: 'updated' only when our own earlier result was replaced."""
        return "updated" if self.replaced else "registered"


def check_prompt_name(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise UserInputError(f"{name!r} cannot name an embedding: the name {problem}")
    return name


def embedding_folder(root: Path, name: str, base: str) -> Path:
    """ROOT/embeddings/<name>/<base>/: InvokeAI keeps one embedding per name and base, so each
    has a folder of its own. Refuses a folder that would lie outside ROOT/embeddings."""
    check_prompt_name(name)
    parent = embeddings_folder(root)
    folder = parent / name / base
    if parent.resolve() not in folder.resolve().parents:
        raise UserInputError(
            f"{folder} leads outside {parent} (through a link?); choose another name"
        )
    return folder


def legacy_embedding_file(root: Path, name: str) -> Path:
    """Where earlier versions stored <name>, whatever its base."""
    return embeddings_folder(root) / name / EMBEDDING_FILENAME


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
    """Register `file` (already in place) as the embedding `name`, replacing only earlier
    records of that same file."""
    check_prompt_name(name)
    base = vectors.base(str(file))
    if not vectors.host_reads_as_is:
        raise UserInputError(
            f"InvokeAI would misread the layout of {file}; bring it in with "
            f"`invokeai-ti import {file}`, which stores a corrected copy"
        )
    target = file.resolve()
    previous = _records_replaced_by(models, name, base, target)
    registered = _register(models, target, name, base, previous, f"textual inversion <{name}>")
    note_registered(models.root, file)  # where the scan finds it, a link into the folder too
    return registered


def install_embedding(
    models: HostModels, name: str, vectors: EmbeddingVectors, facts: dict[str, object]
) -> RegisteredEmbedding:
    """Store vectors as ROOT/embeddings/<name>/<base>/learned_embeds.safetensors, register them.

    Only our own earlier result for this name and base is replaced, also one in the layout of
    earlier versions (ROOT/embeddings/<name>/learned_embeds.safetensors, then removed); the same
    name on another base is another embedding and stays. `facts` (what was trained, or where it
    came from) go beside the file as embedding.json, so a start-up scan knows its name and width.
    """
    base = vectors.base(f"<{name}>")
    folder = embedding_folder(models.root, name, base)
    target = folder / EMBEDDING_FILENAME
    legacy = legacy_embedding_file(models.root, name)
    previous = _records_replaced_by(models, name, base, target, legacy)  # a clash: nothing written
    metadata = {"name": name, "base": base, "token_dimension": str(vectors.token_dim)}
    save_vectors(target, vectors, metadata)
    write_json_atomically(folder / SUMMARY_FILENAME, {**facts, **metadata})
    registered = _register(
        models, target.resolve(), name, base, previous, _description(name, facts)
    )
    note_registered(models.root, target)
    if any(models.absolute(record.path).resolve() == legacy.resolve() for record in previous):
        legacy.unlink(missing_ok=True)
        (legacy.parent / SUMMARY_FILENAME).unlink(missing_ok=True)
    return registered


def _register(
    models: HostModels,
    target: Path,
    name: str,
    base: str,
    previous: list,  # type: ignore[type-arg]
    description: str,
) -> RegisteredEmbedding:
    """Replace `previous` by a record of `target`, checking what the host's probe made of it."""
    from invokeai.app.services.model_records import ModelRecordChanges

    # read first: unregistering a record deletes its relationships with it
    replaced = {record.key for record in previous}
    related = {
        other for old in replaced for other in models.relationships.get_related_model_keys(old)
    } - replaced
    for record in previous:
        models.installer.unregister(record.key)
    key = models.register(target, ModelRecordChanges(name=name, description=description))
    record = models.store.get_model(key)
    if record.type.value != "embedding" or record.base.value != base:
        models.installer.unregister(key)
        raise UserInputError(
            f"InvokeAI read {target} as a {record.base.value} {record.type.value} model instead "
            f"of a {base} embedding; it was not registered"
        )
    for record in previous:
        _move_cover_image(models, record.key, key)
    for other_key in sorted(related):
        relate_models(models, key, other_key)
    logger.info("registered <%s> (%s) with InvokeAI", name, base)
    return RegisteredEmbedding(name, key, base, target, replaced=bool(previous))


def _description(name: str, facts: dict[str, object]) -> str:
    """What the model manager says of the embedding: what it was trained on, or imported from."""
    if "steps" in facts and "model" in facts:
        model = Path(str(facts["model"])).name  # a folder's name, or the installed model's
        return f"textual inversion <{name}>, trained on {model} for {facts['steps']} steps"
    if "imported_from" in facts:
        return f"textual inversion <{name}>, imported from {Path(str(facts['imported_from'])).name}"
    return f"textual inversion <{name}>"


def relate_models(models: HostModels, key: str, other_key: str) -> None:
    """Mark two models related in InvokeAI, as its model manager does: a trained embedding and
    the model it was trained on, so the prompt's embedding picker can offer it first. Best
    effort: the other may have been deleted meanwhile (the database refuses a relationship to
    no record), and the embedding is registered either way."""
    if key == other_key:
        return
    try:
        models.relationships.add_model_relationship(key, other_key)
    except sqlite3.IntegrityError:
        logger.warning("not related to model %s in InvokeAI: it is no longer installed", other_key)


def set_cover_image(models: HostModels, key: str, image: Image.Image) -> None:
    """The picture InvokeAI's model manager shows for the embedding (the host makes the
    thumbnail). Best effort: the embedding is registered either way."""
    from invokeai.app.services.model_images.model_images_common import (
        ModelImageFileSaveException,
    )

    try:
        models.images.save(image, key)
    except ModelImageFileSaveException as error:  # the host's wrapper of every failure
        logger.warning(
            "InvokeAI's model manager gets no cover image for the embedding: %s", error.__cause__
        )


def _move_cover_image(models: HostModels, old_key: str, new_key: str) -> None:
    """A replaced record's cover image goes to its replacement, as the host's own model
    conversion moves it, instead of staying behind as a file of no record."""
    from invokeai.app.services.model_images.model_images_common import (
        ModelImageFileDeleteException,
        ModelImageFileNotFoundException,
    )

    try:
        with models.images.get(old_key) as image:
            image.load()
            set_cover_image(models, new_key, image)
        models.images.delete(old_key)
    except (ModelImageFileNotFoundException, ModelImageFileDeleteException, OSError):
        return  # none, or unreadable: the replacement has no cover until a run gives it one


def _records_replaced_by(
    models: HostModels, name: str, base: str, target: Path, legacy: Path | None = None
) -> list:  # type: ignore[type-arg]
    """Earlier records of `target` (and of `name` on `base` at our `legacy` path); refuses any
    other embedding of the same name and base, which InvokeAI could not tell apart in prompts,
    and one whose name differs only in case, whose folder is ours on Windows and macOS."""
    previous = []
    for record in embedding_records(models):
        if (
            record.base.value == base
            and record.name != name
            and record.name.casefold() == name.casefold()
        ):
            raise UserInputError(
                f"InvokeAI already has a {base} embedding named <{record.name}>, which differs "
                f"from <{name}> only in case (on Windows and macOS the two would share one "
                "folder); choose another name"
            )
        path = models.absolute(record.path).resolve()
        same_name = record.name == name and record.base.value == base
        legacy_of_name = same_name and legacy is not None and path == legacy.resolve()
        if path == target.resolve() or legacy_of_name:
            previous.append(record)
        elif same_name:
            raise UserInputError(
                f"InvokeAI already has a {base} embedding named <{name}> ({record.path}); "
                "choose another name, or delete that one in InvokeAI's model manager"
            )
    return previous
