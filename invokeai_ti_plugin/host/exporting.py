"""`invokeai-ti export`: an embedding as the one file A1111 and ComfyUI load by its name.

Both tools name an embedding after its file, and ours are all learned_embeds.safetensors in
per-name folders: copied as they are, every one would be `learned_embeds`. So export writes
DIR/NAME.safetensors holding `emb_params` [n, d] for SD 1.x/2.x (A1111 reads a file's single
tensor, ComfyUI its first) or `clip_l` + `clip_g` for SDXL (both tools read those keys), which
diffusers' load_textual_inversion reads as well. The host is needed only to find the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from ..training.bases import TRAINABLE_BASES
from ..training.embedding_file import read_embedding_vectors, save_vectors
from .embeddings import check_prompt_name, embedding_records
from .model_db import open_host_models

_FOLDER_FORMAT_FILE = "learned_embeds.bin"  # what the host loads from an embedding folder


@dataclass(frozen=True)
class ExportedEmbedding:
    name: str
    base: str
    path: Path


def export_embedding(
    root: Path, name: str, base: str | None, folder: Path, overwrite: bool = False
) -> ExportedEmbedding:
    """Write InvokeAI's embedding `name` (of `base`, where it has several) as
    folder/NAME.safetensors."""
    check_prompt_name(name)
    if base is not None and base not in TRAINABLE_BASES:
        choices = ", ".join(TRAINABLE_BASES)
        raise UserInputError(f"must be one of {choices} (got {base!r})", option="base")
    target = folder / f"{name}.safetensors"
    if target.exists() and not overwrite:
        raise UserInputError(f"{target} exists already; pass --overwrite to replace it")
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder} is not a folder; pass --to DIR, a folder to write into")
    source = _registered_file(root, name, base)
    vectors = read_embedding_vectors(source)
    chosen = vectors.base(str(source))
    metadata = {"name": name, "base": chosen, "token_dimension": str(vectors.token_dim)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_vectors(target, vectors, metadata)
    except OSError as error:
        raise UserInputError(f"cannot write {target} ({error.strerror or error})") from error
    return ExportedEmbedding(name, chosen, target)


def _registered_file(root: Path, name: str, base: str | None) -> Path:
    """The file of the one embedding record of that name (and base)."""
    with open_host_models(root) as models:
        records = embedding_records(models)
        named = [record for record in records if record.name == name]
        chosen = [record for record in named if base is None or record.base.value == base]
        if len(chosen) == 1:
            path = models.absolute(chosen[0].path)
            return path / _FOLDER_FORMAT_FILE if path.is_dir() else path
    bases = ", ".join(sorted(record.base.value for record in named))
    if len(chosen) > 1:
        raise UserInputError(
            f"InvokeAI has <{name}> for several bases ({bases}); choose one with --base"
        )
    if named:
        raise UserInputError(f"InvokeAI has <{name}> only for {bases}, not for {base}")
    known = sorted({record.name for record in records})
    listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "") if known else "none"
    raise UserInputError(f"InvokeAI at {root} has no embedding named <{name}> (it has: {listed})")
