"""The trained embedding on disk, in the layout both InvokeAI and diffusers read correctly.

A single `emb_params` tensor of shape [vectors, dimension] in safetensors: InvokeAI 6 reads its
base from the dimension, diffusers' `load_textual_inversion` takes a one-key file with the token
given by the caller. (diffusers' own example writes `{"<token>": [1, 768]}`, which InvokeAI
misreads as dimension 1 and registers as an unknown model.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic_files import write_atomically
from ..errors import UserInputError

EMBEDDING_KEY = "emb_params"
EMBEDDING_FILENAME = "learned_embeds.safetensors"


def save_embedding(path: Path, vectors: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write [n, d] vectors atomically, with what they are in the file's metadata."""
    tensor = vectors.detach().to("cpu", torch.float32).contiguous()
    write_atomically(path, lambda temp: save_file({EMBEDDING_KEY: tensor}, str(temp), metadata))


def load_embedding(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The [n, d] vectors and metadata of a file this trainer wrote (no code is executed)."""
    with safe_open(str(path), framework="pt") as file:
        if EMBEDDING_KEY not in file.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise UserInputError(
                f"{path} holds no {EMBEDDING_KEY!r} tensor; it is not our embedding"
            )
        return file.get_tensor(EMBEDDING_KEY), dict(file.metadata() or {})


def token_dimension_mismatch(trigger: str, trained_dim: int, model_dim: int) -> UserInputError:
    """The manual's message for an embedding meeting a model of another base."""
    return UserInputError(
        f"Cannot load embedding for <{trigger}>. It was trained on a model with token dimension "
        f"{trained_dim}, but the current model has token dimension {model_dim}; use a model of "
        "the same base, or train the embedding anew for this one"
    )
