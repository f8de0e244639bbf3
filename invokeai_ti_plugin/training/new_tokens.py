"""The new word: tokenizer entries and the only weights that learn.

The classic recipe trains the whole 49408-row token table and copies the old rows back after
every step. Here the new word's vectors live in their own small parameter and the frozen table is
never touched, so gradients, optimizer state and checkpoints are [n, d], and every other row stays
bit-identical by construction.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import UserInputError


class PlaceholderEmbedding(nn.Module):
    """Token lookup that reads ids >= `first_id` from a small trainable table."""

    def __init__(self, frozen: nn.Embedding, first_id: int, vectors: torch.Tensor) -> None:
        super().__init__()
        self.frozen = frozen
        self.first_id = first_id
        self.vectors = nn.Parameter(vectors.detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_id
        old = self.frozen(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        new = self.vectors[(input_ids - self.first_id).clamp(min=0, max=len(self.vectors) - 1)]
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens standing for the word: `<w>`, then `<w>_1`, `<w>_2`... for more vectors."""
    return [placeholder] + [f"{placeholder}_{index}" for index in range(1, num_vectors)]


def token_ids_of(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
    return ids


def add_placeholder_tokens(
    tokenizer: CLIPTokenizer, placeholder: str, num_vectors: int
) -> list[int]:
    """Add the new word to the tokenizer; refuse words the model already knows."""
    if len(token_ids_of(tokenizer, placeholder)) == 1:
        raise UserInputError(
            f"{placeholder!r} is already a word of the model's vocabulary, so training would "
            "change its meaning everywhere; choose a new one such as "
            f"'<{placeholder.strip('<>')}>'",
            option="placeholder_token",
        )
    tokens = placeholder_tokens(placeholder, num_vectors)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise UserInputError(
            f"the model's tokenizer already has a token {placeholder!r} (an embedding was built "
            "into this model); choose another placeholder token",
            option="placeholder_token",
        )
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]


def initializer_vectors(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, initializer: str, num_vectors: int
) -> torch.Tensor:
    """The starting vectors, from the initializer's token vectors.

    With as many tokens as vectors, one each; with fewer tokens, they repeat in turn; with more,
    the tokens are split into consecutive groups and each vector starts at its group's mean.
    """
    ids = token_ids_of(tokenizer, initializer)
    special = set(tokenizer.all_special_ids)
    if not ids or any(token_id in special for token_id in ids):
        raise UserInputError(
            f"{initializer!r} gives no ordinary tokens for this model; use a word such as '*' "
            "or 'painting'",
            option="initializer_token",
        )
    rows = text_encoder.get_input_embeddings().weight[ids].detach().float()
    if len(ids) <= num_vectors:
        return rows[torch.arange(num_vectors) % len(ids)]
    return torch.stack([group.mean(dim=0) for group in torch.tensor_split(rows, num_vectors)])


def install_placeholder_embedding(
    text_encoder: CLIPTextModel, token_ids: list[int], vectors: torch.Tensor
) -> PlaceholderEmbedding:
    """Swap the text encoder's token lookup for one that knows the new word."""
    frozen = text_encoder.get_input_embeddings()
    first_id = token_ids[0]
    if token_ids != list(range(first_id, first_id + len(token_ids))):
        raise ValueError(f"new token ids must be consecutive, got {token_ids}")
    if first_id > frozen.num_embeddings:
        raise UserInputError(
            f"the model's tokenizer has {first_id} tokens but its text encoder only "
            f"{frozen.num_embeddings} rows; the model folder is inconsistent",
            option="model",
        )
    module = PlaceholderEmbedding(frozen, first_id, vectors.to(frozen.weight.device))
    text_encoder.set_input_embeddings(module)
    return module
