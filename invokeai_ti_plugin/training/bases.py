"""The Stable Diffusion bases and the widths that tell them apart: the one table of them.

InvokeAI files every model and embedding under a base. A diffusers folder shows its base by its
UNet's cross-attention width (as InvokeAI's own probe reads it), an embedding by the width of its
token vectors: one text encoder's for SD 1.x and 2.x, both of SDXL's (`clip_l`, `clip_g`).
"""

from __future__ import annotations

from typing import Literal, get_args

Base = Literal["sd-1", "sd-2", "sdxl", "sdxl-refiner"]
TrainableBase = Literal["sd-1", "sd-2", "sdxl"]
TRAINABLE_BASES: tuple[TrainableBase, ...] = get_args(TrainableBase)

CROSS_ATTENTION_DIMS: dict[Base, int] = {
    "sd-1": 768,
    "sd-2": 1024,
    "sdxl": 2048,
    "sdxl-refiner": 1280,
}
# Width of each text encoder's token vectors, in encoder order: what an embedding must match.
TOKEN_DIMS: dict[TrainableBase, tuple[int, ...]] = {
    "sd-1": (768,),
    "sd-2": (1024,),
    "sdxl": (768, 1280),
}


def base_of_unet(cross_attention_dim: int) -> Base | None:
    """The base a UNet of this cross-attention width belongs to, or None."""
    found = [base for base, dim in CROSS_ATTENTION_DIMS.items() if dim == cross_attention_dim]
    return found[0] if found else None


def base_of_token_dims(token_dims: tuple[int, ...]) -> TrainableBase | None:
    """The base whose text encoders' widths these are, or None."""
    found = [base for base, dims in TOKEN_DIMS.items() if dims == token_dims]
    return found[0] if found else None


def token_dims_text() -> str:
    """Every base's token widths, for messages: `sd-1 768, sd-2 1024, sdxl 768 + 1280`."""
    return ", ".join(f"{base} {' + '.join(map(str, dims))}" for base, dims in TOKEN_DIMS.items())
