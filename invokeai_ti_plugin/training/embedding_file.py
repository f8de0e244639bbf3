"""Embedding files: the layout we write, and every layout users bring, read without running code.

We write safetensors holding `emb_params` [vectors, dimension] (SD 1.x/2.x) or `clip_l` [n, 768]
and `clip_g` [n, 1280] (SDXL): InvokeAI reads the base from those shapes, and diffusers'
`load_textual_inversion` loads them. (diffusers' own example writes `{"<token>": [1, 768]}`,
which InvokeAI misreads as dimension 1.) Foreign files (concepts-library `.bin`, A1111 `.pt`,
kohya / invoke-training `.safetensors`) are read with safetensors or `weights_only=True`
unpickling, so a malicious pickle is refused before any of its code can run.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic_files import write_atomically
from ..errors import UserInputError

EMBEDDING_KEY = "emb_params"
EMBEDDING_FILENAME = "learned_embeds.safetensors"
EMBEDDING_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".ckpt"})
SDXL_KEYS = ("clip_l", "clip_g")
_BASE_BY_DIM = {768: "sd-1", 1024: "sd-2"}


@dataclass(frozen=True)
class EmbeddingVectors:
    """Learned vectors per text encoder: `emb_params` alone, or SDXL's `clip_l` + `clip_g`."""

    tensors: dict[str, torch.Tensor]
    token: str | None = None  # the token the file names, if it names one
    host_reads_as_is: bool = True  # False: InvokeAI 6 would misread the file in its own layout

    @property
    def is_sdxl(self) -> bool:
        return set(self.tensors) == set(SDXL_KEYS)

    @property
    def token_dim(self) -> int:
        """The width InvokeAI probes: the only tensor's, or SDXL's larger `clip_g`."""
        return int(self.tensors["clip_g" if self.is_sdxl else EMBEDDING_KEY].shape[1])

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def base(self, source: str) -> str:
        """sd-1, sd-2 or sdxl; any other shape fits no model InvokeAI can use it with."""
        if self.is_sdxl:
            if self.tensors["clip_l"].shape[1] == 768 and self.token_dim == 1280:
                return "sdxl"
        elif self.token_dim in _BASE_BY_DIM:
            return _BASE_BY_DIM[self.token_dim]
        shapes = ", ".join(f"{key} {list(t.shape)}" for key, t in self.tensors.items())
        raise UserInputError(
            f"{source} has token vectors of shape {shapes}, which fit no Stable Diffusion base "
            "(768: SD 1.x, 1024: SD 2.x, clip_l 768 + clip_g 1280: SDXL)"
        )


def save_vectors(path: Path, vectors: EmbeddingVectors, metadata: dict[str, str]) -> None:
    """Write any embedding atomically in the layout InvokeAI and diffusers both read."""
    tensors = {
        key: tensor.detach().to("cpu", torch.float32).contiguous()
        for key, tensor in vectors.tensors.items()
    }
    write_atomically(path, lambda temp: save_file(tensors, str(temp), metadata))


def load_embedding(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The [n, d] vectors and metadata of a file this trainer wrote."""
    with safe_open(str(path), framework="pt") as file:
        if EMBEDDING_KEY not in file.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise UserInputError(f"{path} holds no {EMBEDDING_KEY!r} tensor; not our embedding")
        return file.get_tensor(EMBEDDING_KEY), dict(file.metadata() or {})


def read_embedding_vectors(path: Path) -> EmbeddingVectors:
    """Any supported embedding file, loaded without executing code."""
    vectors = _vectors_of(_load_without_code(path), path)
    if vectors.token is None and path.suffix == ".safetensors":
        metadata = safe_open(str(path), framework="pt").metadata() or {}
        token = metadata.get("placeholder_token") or metadata.get("name")
        if token:
            return replace(vectors, token=token)
    return vectors


def _load_without_code(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as error:
            raise UserInputError(f"{path} is not a readable safetensors file ({error})") from error
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(
            f"refused {path}: it holds Python objects other than tensors, which could run code "
            "when loaded; nothing in it was executed. Use a .safetensors embedding instead"
        ) from error
    except Exception as error:  # an untrusted file can break the reader in any way
        raise UserInputError(f"{path} is not a readable embedding file ({error})") from error
    if not isinstance(loaded, dict):
        raise UserInputError(f"{path} holds a {type(loaded).__name__}, not an embedding")
    return loaded


def _as_rows(tensor: Any, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise UserInputError(f"{path} holds no [vectors, dimension] tensor")
    rows = tensor.detach().to("cpu", torch.float32)
    return rows.unsqueeze(0) if rows.dim() == 1 else rows


def _vectors_of(raw: dict[str, Any], path: Path) -> EmbeddingVectors:
    if all(key in raw for key in SDXL_KEYS):
        return EmbeddingVectors({key: _as_rows(raw[key], path) for key in SDXL_KEYS})
    if EMBEDDING_KEY in raw:
        flat = isinstance(raw[EMBEDDING_KEY], torch.Tensor) and raw[EMBEDDING_KEY].dim() == 1
        rows = _as_rows(raw[EMBEDDING_KEY], path)
        return EmbeddingVectors({EMBEDDING_KEY: rows}, host_reads_as_is=not flat)
    params = raw.get("string_to_param")
    if isinstance(params, dict) and len(params) == 1:  # A1111 .pt
        name = raw.get("name")
        rows = _as_rows(next(iter(params.values())), path)
        return EmbeddingVectors({EMBEDDING_KEY: rows}, name if isinstance(name, str) else None)
    if len(raw) == 1:  # diffusers / concepts library: {"<token>": tensor}
        token, tensor = next(iter(raw.items()))
        rows = _as_rows(tensor, path)
        two_d = isinstance(tensor, torch.Tensor) and tensor.dim() == 2  # read as dimension n
        return EmbeddingVectors({EMBEDDING_KEY: rows}, str(token), host_reads_as_is=not two_d)
    raise UserInputError(
        f"{path} holds no embedding layout we know (emb_params, string_to_param, "
        "clip_l + clip_g, or a single token)"
    )


def token_dimension_mismatch(trigger: str, trained_dim: int, model_dim: int) -> UserInputError:
    """The manual's message for an embedding meeting a model of another base."""
    return UserInputError(
        f"Cannot load embedding for <{trigger}>. It was trained on a model with token dimension "
        f"{trained_dim}, but the current model has token dimension {model_dim}; use a model of "
        "the same base, or train the embedding anew for this one"
    )
