"""Reading a diffusers Stable Diffusion folder: what it is, and its parts for training.

`inspect_model` reads only JSON configs, so listing models and choosing defaults stays instant;
`load_model_parts` loads the weights once the run really starts. A run takes its model from a
`ModelSource`: a diffusers folder (`FolderModelSource`, here) or InvokeAI's own model manager
(`host.model_loading`, which also loads single-file checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import UserInputError
from .bases import TRAINABLE_BASES, Base, base_of_unet
from .weight_files import weights_variant


@dataclass(frozen=True)
class ModelInfo:
    """What training needs to know about a model before loading it."""

    folder: Path | None  # its diffusers folder; None for a single-file model InvokeAI loads
    base: Base
    token_dims: tuple[int, ...]  # width of each text encoder's tokens (two for SDXL)
    native_resolution: int
    prediction_type: str
    name: str = ""  # how messages name it; "" for the folder's path
    host_key: str | None = None  # InvokeAI's key of the model, when InvokeAI loads it

    @property
    def label(self) -> str:
        return self.name or str(self.folder)

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
    base = base_of_unet(int(unet.get("cross_attention_dim", 0) or 0))
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
            f"{info.label} is an {info.base} model; this version trains embeddings for "
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
    vae_loader: Callable[[], AutoencoderKL]  # the VAE, from the same source, when it is needed


class ModelSource(Protocol):
    """Where a run gets its model: a diffusers folder, or InvokeAI's model manager."""

    info: ModelInfo

    @property
    def dtype(self) -> torch.dtype | None:
        """The precision the model comes in when its loader decides it (InvokeAI does); None
        when the run may choose."""

    def load_parts(self, dtype: torch.dtype) -> ModelParts:
        """The frozen parts in `dtype`, held for the run until `close`."""

    def load_vae(self, dtype: torch.dtype) -> AutoencoderKL:
        """The frozen VAE (float32 for SDXL, whose VAE overflows in float16)."""

    def close(self) -> None:
        """The run is over: give back what it held, as it was."""


class FolderModelSource:
    """A diffusers pipeline folder, loaded privately for the run."""

    dtype = None

    def __init__(self, folder: Path) -> None:
        self.info = inspect_model(folder)

    def load_parts(self, dtype: torch.dtype) -> ModelParts:
        return load_model_parts(self.info, dtype)

    def load_vae(self, dtype: torch.dtype) -> AutoencoderKL:
        return load_vae(self.info, dtype)

    def close(self) -> None:
        """Nothing to give back: the parts are the run's own, dropped with it."""


def vae_dtype(info: ModelInfo, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE stays float32: in float16 it overflows (a known SDXL fault)."""
    return torch.float32 if info.is_sdxl else dtype


def freeze_parts(
    tokenizers: list[CLIPTokenizer], text_encoders: list[CLIPTextModel], unet: torch.nn.Module
) -> None:
    """Frozen, in eval mode, pooling at the real end-of-text token: only the new vectors learn.

    Old CLIP configs say eos_token_id=2 and then pool at the highest token id, which becomes the
    new word's.
    """
    for module in (*text_encoders, unet):
        module.requires_grad_(False)
        module.eval()
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        encoder.config.eos_token_id = tokenizer.eos_token_id
        text_model(encoder).eos_token_id = tokenizer.eos_token_id


def load_model_parts(info: ModelInfo, dtype: torch.dtype = torch.float32) -> ModelParts:
    """Load the weights in `dtype`, frozen and in eval mode: only the new vectors will learn.

    The VAE is not among them: it only encodes each image once and draws sample grids, so it
    is loaded for that (`load_vae`) and dropped again.
    """
    if info.folder is None:
        raise ValueError(f"{info.label} has no diffusers folder to load")
    folder = info.folder
    suffixes = ["", "_2"] if info.is_sdxl else [""]
    encoder_classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(suffixes)]
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(str(folder), subfolder=f"tokenizer{suffix}")
            for suffix in suffixes
        ]
        text_encoders = [
            encoder_class.from_pretrained(
                str(folder),
                subfolder=f"text_encoder{suffix}",
                torch_dtype=dtype,
                variant=weights_variant(folder / f"text_encoder{suffix}"),
            )
            for encoder_class, suffix in zip(encoder_classes, suffixes, strict=True)
        ]
        unet = UNet2DConditionModel.from_pretrained(
            str(folder),
            subfolder="unet",
            torch_dtype=dtype,
            variant=weights_variant(folder / "unet"),
        )
        noise_scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    except (OSError, ValueError, KeyError) as error:
        raise _not_a_pipeline(info.folder, f"cannot load it: {error}") from error
    freeze_parts(tokenizers, text_encoders, unet)
    vae_loader = partial(load_vae, info, dtype)
    return ModelParts(info, dtype, tokenizers, text_encoders, unet, noise_scheduler, vae_loader)


def text_model(encoder: CLIPTextModel) -> torch.nn.Module:
    """The module that pools at `eos_token_id`: the encoder's `text_model` in transformers 5.5,
    the encoder itself by 5.17, whose CLIPTextModel has no such wrapper any more
    (CLIPTextModelWithProjection still has one)."""
    inner: torch.nn.Module = getattr(encoder, "text_model", encoder)
    return inner


def load_vae(info: ModelInfo, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The frozen VAE, in `vae_dtype`."""
    if info.folder is None:
        raise ValueError(f"{info.label} has no diffusers folder to load")
    try:
        vae = AutoencoderKL.from_pretrained(
            str(info.folder),
            subfolder="vae",
            torch_dtype=vae_dtype(info, dtype),
            variant=weights_variant(info.folder / "vae"),
        )
    except (OSError, ValueError, KeyError) as error:
        raise _not_a_pipeline(info.folder, f"cannot load its VAE: {error}") from error
    vae.requires_grad_(False)
    return vae.eval()
