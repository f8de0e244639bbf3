"""Embedding files: the layout we write, and every layout users bring, read without running code.

We write safetensors holding `emb_params` [vectors, dimension] (SD 1.x/2.x) or `clip_l` [n, 768]
and `clip_g` [n, 1280] (SDXL): InvokeAI reads the base from those shapes, and diffusers'
`load_textual_inversion` loads them. (diffusers' own example writes `{"<token>": [1, 768]}`,
which InvokeAI misreads as dimension 1.) Foreign files are recognised by their content, not their
name: safetensors (kohya, invoke-training, ComfyUI, diffusers), torch.save archives and pickles
(concepts-library `.bin`, A1111 `.pt`, the original textual-inversion repo's `nn.ParameterDict`)
read with `weights_only=True` unpickling, so a malicious pickle is refused before any of its code
can run, and A1111's PNG embedding images (see a1111_image). What a file says about itself
(kohya's `modelspec.*`, the diffusers token, A1111's step and checkpoint) is kept as metadata.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..atomic_files import write_atomically
from ..config import MAX_VECTORS
from ..errors import UserInputError
from .a1111_image import TEXT_CHUNK, NoEmbeddingInImage, read_image_embedding
from .bases import TOKEN_DIMS, base_of_token_dims, token_dims_text
from .foreign_embeddings import (
    NotAnEmbedding,
    bundled_layouts,
    file_format,
    load_pickled,
    refuse_lora,
    sdxl_halves,
)

EMBEDDING_KEY = "emb_params"
EMBEDDING_FILENAME = "learned_embeds.safetensors"
EMBEDDING_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".ckpt"})  # what InvokeAI loads
SDXL_KEYS = ("clip_l", "clip_g")
# 75 SDXL vectors in fp32 take 600 KB; a file declaring far more is refused before it is loaded
MAX_EMBEDDING_BYTES = 16 * 2**20
MAX_METADATA_CHARS = 2**16  # longer values (a kohya modelspec thumbnail is an image) are dropped
_A1111_FACTS = ("step", "sd_checkpoint", "sd_checkpoint_name")


@dataclass(frozen=True)
class EmbeddingVectors:
    """Learned vectors per text encoder: `emb_params` alone, or SDXL's `clip_l` + `clip_g`."""

    tensors: dict[str, torch.Tensor]
    token: str | None = None  # the token the file names, if it names one
    host_reads_as_is: bool = True  # False: InvokeAI 6 would misread the file in its own layout
    metadata: dict[str, str] = field(default_factory=dict)  # what the source says about itself

    @property
    def token_dims(self) -> tuple[int, ...]:
        """The width of each text encoder's vectors, in encoder order (`clip_l`, `clip_g`)."""
        keys = [key for key in (EMBEDDING_KEY, *SDXL_KEYS) if key in self.tensors]
        return tuple(int(self.tensors[key].shape[1]) for key in keys)

    @property
    def token_dim(self) -> int:
        """The width InvokeAI probes: the only tensor's, or SDXL's larger `clip_g`."""
        return self.token_dims[-1]

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def base(self, source: str) -> str:
        """sd-1, sd-2 or sdxl; any other shape fits no model InvokeAI can use it with."""
        base = base_of_token_dims(self.token_dims)
        if base is not None:
            return base
        shapes = ", ".join(f"{key} {list(t.shape)}" for key, t in self.tensors.items())
        raise UserInputError(
            f"{source} has token vectors of shape {shapes}, which fit no Stable Diffusion base "
            f"(widths by base: {token_dims_text()})"
        )


def check_vectors(vectors: EmbeddingVectors, source: str) -> None:
    """Vectors a prompt can use: 1 to MAX_VECTORS rows, the same number in SDXL's two halves,
    every value finite. Anything else would be registered and then break every prompt."""
    rows = {key: int(tensor.shape[0]) for key, tensor in vectors.tensors.items()}
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{key} {count}" for key, count in rows.items())
        raise UserInputError(
            f"refused {source}: its halves hold different numbers of vectors ({counts}); "
            "an SDXL embedding needs the same number in both"
        )
    count = vectors.num_vectors
    if not 1 <= count <= MAX_VECTORS:
        raise UserInputError(
            f"refused {source}: it holds {count} vectors; a prompt has room for 1 to {MAX_VECTORS}"
        )
    if not all(bool(torch.isfinite(tensor).all()) for tensor in vectors.tensors.values()):
        raise UserInputError(
            f"refused {source}: its vectors hold NaN or infinite values, which would break "
            "every prompt using it; train it again (a lower --learning_rate)"
        )


def save_vectors(path: Path, vectors: EmbeddingVectors, metadata: dict[str, str]) -> None:
    """Write any embedding atomically in the layout InvokeAI and diffusers both read, with the
    metadata its source carried and `metadata` over it; broken vectors are refused, never
    written."""
    check_vectors(vectors, str(path))
    tensors = {
        key: tensor.detach().to("cpu", torch.float32).contiguous()
        for key, tensor in vectors.tensors.items()
    }
    # bytes written by Python, not by safetensors' writer, so a full disk is an OSError
    everything = {**vectors.metadata, **metadata}
    write_atomically(path, lambda temp: temp.write_bytes(save(tensors, everything)))


def read_embedding_vectors(path: Path) -> EmbeddingVectors:
    """Any supported single-embedding file, recognised by its content, loaded without executing
    code, its vectors checked."""
    kind = file_format(path)
    metadata: dict[str, str] = {}
    rebuilt = False  # a pickled nn.ParameterDict
    if kind == "png":
        raw = _read_image(path)
    elif kind == "safetensors":
        raw, metadata = _load_safetensors(path)
    else:
        _check_size(path)
        raw, rebuilt = load_pickled(path)
    vectors = vectors_of(raw, path)
    check_vectors(vectors, str(path))
    # InvokeAI picks its reader by the file's name, and unpickles only tensors and containers
    host_kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    host_reads = vectors.host_reads_as_is and kind == host_kind and not rebuilt
    token = vectors.token or metadata.get("placeholder_token") or metadata.get("name") or None
    metadata = {**kept_metadata(metadata), **vectors.metadata}
    return replace(vectors, token=token, host_reads_as_is=host_reads, metadata=metadata)


def read_bundled_embeddings(path: Path) -> dict[str, EmbeddingVectors]:
    """The embeddings a LoRA bundles, by name, checked; {} for a file bundling none."""
    layouts, spec = bundled_layouts(path, MAX_EMBEDDING_BYTES)
    found = {}
    for name, layout in layouts.items():
        source = f"{path} (bundle_emb.{name})"
        vectors = vectors_of(layout, source)
        check_vectors(vectors, source)
        metadata = {**kept_metadata(spec), **vectors.metadata, "bundled_in": path.name}
        found[name] = replace(vectors, token=name, metadata=metadata)
    return found


def read_sdxl_halves(path: Path) -> tuple[tuple[Path, Path], EmbeddingVectors] | None:
    """The SDXL embedding `path` is one half of (diffusers' example: [n, 768] for the first
    encoder, [n, 1280] for the second, one file each), with both files; None when there is no
    such pair."""
    halves = sdxl_halves(path)
    if halves is None:
        return None
    try:
        first, second = (read_embedding_vectors(half) for half in halves)
    except NotAnEmbedding:  # a NAME_2 beside NAME that is something else: no pair
        return None
    if first.token_dims + second.token_dims != TOKEN_DIMS["sdxl"]:
        return None
    tensors = {"clip_l": first.tensors[EMBEDDING_KEY], "clip_g": second.tensors[EMBEDDING_KEY]}
    vectors = EmbeddingVectors(
        tensors, first.token or second.token, metadata={**second.metadata, **first.metadata}
    )
    check_vectors(vectors, " + ".join(map(str, halves)))
    return halves, vectors


def kept_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in metadata.items() if len(value) <= MAX_METADATA_CHARS}


def declared_size(path: Path) -> int:
    """Bytes the file unpacks to: its zip entries' declared sizes for torch.save archives
    (deflated entries can inflate a thousandfold), else its own size (safetensors and legacy
    pickles store tensors as they are)."""
    with path.open("rb") as file:
        is_zip = file.read(4) == b"PK\x03\x04"  # torch.load's own test for its zip format
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                return sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, OSError) as error:
            raise UserInputError(f"{path} is not a readable embedding file ({error})") from error
    return path.stat().st_size


def _check_size(path: Path) -> None:
    size = declared_size(path)
    if size > MAX_EMBEDDING_BYTES:
        raise UserInputError(
            f"refused {path}: it unpacks to {size / 2**20:.0f} MB, far more than an embedding "
            f"of at most {MAX_VECTORS} vectors (under 1 MB); it was not loaded"
        )


def _read_image(path: Path) -> dict[str, Any]:
    _check_size(path)
    try:
        return read_image_embedding(path, MAX_EMBEDDING_BYTES)
    except NoEmbeddingInImage as error:
        raise NotAnEmbedding(
            f"{path} is a PNG image holding no A1111 embedding (no {TEXT_CHUNK!r} text; {error})"
        ) from error


def _load_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata; a LoRA is told apart before anything of it is loaded."""
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            refuse_lora(keys, path)
            _check_size(path)
            return {key: file.get_tensor(key) for key in keys}, dict(file.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise UserInputError(f"{path} is not a readable safetensors file ({error})") from error


def _as_rows(tensor: Any, source: str | Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise UserInputError(f"{source} holds no [vectors, dimension] tensor")
    rows = tensor.detach().to("cpu", torch.float32)
    return rows.unsqueeze(0) if rows.dim() == 1 else rows


def vectors_of(raw: dict[str, Any], source: str | Path) -> EmbeddingVectors:
    """The vectors of any known layout, normalised to `emb_params` or `clip_l` + `clip_g`."""
    if all(key in raw for key in SDXL_KEYS):
        return EmbeddingVectors({key: _as_rows(raw[key], source) for key in SDXL_KEYS})
    if EMBEDDING_KEY in raw:
        flat = isinstance(raw[EMBEDDING_KEY], torch.Tensor) and raw[EMBEDDING_KEY].dim() == 1
        rows = _as_rows(raw[EMBEDDING_KEY], source)
        return EmbeddingVectors({EMBEDDING_KEY: rows}, host_reads_as_is=not flat)
    if "string_to_param" in raw:  # A1111, the original textual-inversion repo
        return _a1111_vectors(raw, source)
    if len(raw) == 1:  # diffusers / concepts library: {"<token>": tensor}
        token, tensor = next(iter(raw.items()))
        rows = _as_rows(tensor, source)
        two_d = isinstance(tensor, torch.Tensor) and tensor.dim() == 2  # read as dimension n
        facts = {"placeholder_token": str(token)}
        return EmbeddingVectors({EMBEDDING_KEY: rows}, str(token), not two_d, facts)
    raise UserInputError(
        f"{source} holds no embedding layout we know (emb_params, string_to_param, "
        "clip_l + clip_g, or a single token)"
    )


def _a1111_vectors(raw: dict[str, Any], source: str | Path) -> EmbeddingVectors:
    params = raw["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        count = len(params) if isinstance(params, dict) else 0
        raise UserInputError(
            f"{source} holds {count} embeddings in string_to_param; one per file is supported"
        )
    name = raw.get("name")
    facts = {
        key: str(raw[key]) for key in _A1111_FACTS if isinstance(raw.get(key), str | int | float)
    }
    rows = _as_rows(next(iter(params.values())), source)
    token = name if isinstance(name, str) else None
    return EmbeddingVectors({EMBEDDING_KEY: rows}, token, metadata=facts)


def token_dimension_mismatch(trigger: str, trained_dim: int, model_dim: int) -> UserInputError:
    """The manual's message for an embedding meeting a model of another base."""
    return UserInputError(
        f"Cannot load embedding for <{trigger}>. It was trained on a model with token dimension "
        f"{trained_dim}, but the current model has token dimension {model_dim}; use a model of "
        "the same base, or train the embedding anew for this one"
    )
