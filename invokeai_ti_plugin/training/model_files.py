"""Reading a diffusers Stable Diffusion folder: what it is, and its parts for training.

`inspect_model` reads only JSON configs, so listing models and choosing defaults stays instant;
`load_model_parts` loads the weights once the run really starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import UserInputError

Base = Literal["sd-1", "sd-2", "sdxl", "sdxl-refiner"]
TRAINABLE_BASES: tuple[Base, ...] = ("sd-1", "sd-2", "sdxl")

# The UNet's cross-attention width tells the family apart, as InvokeAI's own probe does.
_BASE_BY_CROSS_ATTENTION_DIM: dict[int, Base] = {
    768: "sd-1",
    1024: "sd-2",
    2048: "sdxl",
    1280: "sdxl-refiner",
}


@dataclass(frozen=True)
class ModelInfo:
    """What training needs to know about a model before loading it."""

    folder: Path
    base: Base
    token_dims: tuple[int, ...]  # width of each text encoder's tokens (two for SDXL)
    native_resolution: int
    prediction_type: str

    @property
    def is_sdxl(self) -> bool:
        return self.base == "sdxl"

    @property
    def token_dim(self) -> int:
        """The width InvokeAI compares embeddings by: the last (largest) text encoder's."""
        return self.token_dims[-1]


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        data: dict[str, Any] = json.load(file)
    return data


def _not_a_pipeline(folder: Path, why: str) -> UserInputError:
    return UserInputError(
        f"{folder} is not a Stable Diffusion diffusers pipeline folder ({why}); pass the "
        "folder that holds model_index.json, unet/ and text_encoder/",
        option="model",
    )


def inspect_model(folder: Path) -> ModelInfo:
    """Identify a diffusers Stable Diffusion folder from its configs alone."""
    if not (folder / "model_index.json").is_file():
        raise _not_a_pipeline(folder, "no model_index.json")
    try:
        unet = _read_json(folder / "unet" / "config.json")
        encoders = [_read_json(folder / "text_encoder" / "config.json")]
        if (folder / "text_encoder_2").is_dir():
            encoders.append(_read_json(folder / "text_encoder_2" / "config.json"))
        vae = _read_json(folder / "vae" / "config.json")
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    except (OSError, ValueError) as error:
        raise _not_a_pipeline(folder, f"missing or broken config: {error}") from error
    base = _BASE_BY_CROSS_ATTENTION_DIM.get(int(unet.get("cross_attention_dim", 0) or 0))
    if base is None:
        raise _not_a_pipeline(
            folder, f"unknown UNet cross_attention_dim {unet.get('cross_attention_dim')}"
        )
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return ModelInfo(
        folder=folder,
        base=base,
        token_dims=tuple(int(encoder["hidden_size"]) for encoder in encoders),
        native_resolution=int(unet.get("sample_size", 64)) * vae_scale,
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
    )


def require_trainable(info: ModelInfo) -> None:
    """Refuse model families this trainer does not handle yet, with the reason."""
    if info.base not in TRAINABLE_BASES:
        raise UserInputError(
            f"{info.folder} is an {info.base} model; this version trains embeddings for "
            "Stable Diffusion 1.x, 2.x and SDXL base models only",
            option="model",
        )


@dataclass
class ModelParts:
    """The frozen model pieces a textual-inversion run uses (SDXL has two tokenizers/encoders)."""

    info: ModelInfo
    dtype: torch.dtype  # of the frozen weights
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[CLIPTextModel]
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def load_model_parts(info: ModelInfo, dtype: torch.dtype = torch.float32) -> ModelParts:
    """Load the weights in `dtype`, frozen and in eval mode: only the new vectors will learn.

    The VAE is not among them: it only encodes each image once and draws sample grids, so it
    is loaded for that (`load_vae`) and dropped again.
    """
    folder = str(info.folder)
    suffixes = ["", "_2"] if info.is_sdxl else [""]
    encoder_classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(suffixes)]
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{suffix}")
            for suffix in suffixes
        ]
        text_encoders = [
            encoder_class.from_pretrained(
                folder, subfolder=f"text_encoder{suffix}", torch_dtype=dtype
            )
            for encoder_class, suffix in zip(encoder_classes, suffixes, strict=True)
        ]
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as error:
        raise _not_a_pipeline(info.folder, f"cannot load it: {error}") from error
    for module in (*text_encoders, unet):
        module.requires_grad_(False)
        module.eval()
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        # Old CLIP configs say eos_token_id=2 and then pool at the highest token id, which
        # becomes the new word's; pool at the real end-of-text token instead.
        encoder.config.eos_token_id = tokenizer.eos_token_id
        text_model(encoder).eos_token_id = tokenizer.eos_token_id
    return ModelParts(info, dtype, tokenizers, text_encoders, unet, noise_scheduler)


def text_model(encoder: CLIPTextModel) -> torch.nn.Module:
    """The module that pools at `eos_token_id`: the encoder's `text_model` in transformers 5.5,
    the encoder itself by 5.17, whose CLIPTextModel has no such wrapper any more
    (CLIPTextModelWithProjection still has one)."""
    inner: torch.nn.Module = getattr(encoder, "text_model", encoder)
    return inner


def load_vae(info: ModelInfo, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The frozen VAE; SDXL's stays float32, as in float16 it overflows (a known SDXL fault)."""
    vae_dtype = torch.float32 if info.is_sdxl else dtype
    try:
        vae = AutoencoderKL.from_pretrained(
            str(info.folder), subfolder="vae", torch_dtype=vae_dtype
        )
    except (OSError, ValueError, KeyError) as error:
        raise _not_a_pipeline(info.folder, f"cannot load its VAE: {error}") from error
    vae.requires_grad_(False)
    return vae.eval()
