"""Tiny, random-weight Stable Diffusion pipelines and demo images, built offline.

The demo and the test-suite need real diffusers pipelines that InvokeAI's model
probe accepts as SD-1, SD-2 or SDXL, yet nothing may be downloaded. So we build
them here from configs: the real architectures, shrunk in every dimension that
InvokeAI does not inspect (layers, channels, heads), but keeping the ones it does
(UNet ``cross_attention_dim``, text-encoder widths, the CLIP vocabulary size) and
the real CLIP tokenizer shipped as package data.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from PIL import Image, ImageDraw, ImageFilter

from .training.bases import CROSS_ATTENTION_DIMS, TOKEN_DIMS, TrainableBase

__all__ = ["build_tiny_pipeline", "clip_tokenizer_dir", "make_demo_images"]

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77

# Per base: pipeline class and scheduler prediction type (SD 2.x 768 models are v-prediction);
# the widths InvokeAI's probe reads are the real ones, from training.bases.
_PIPELINE_CLASS: dict[str, str] = {
    "sd-1": "StableDiffusionPipeline",
    "sd-2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
_PREDICTION_TYPE: dict[str, str] = {"sd-1": "epsilon", "sd-2": "v_prediction", "sdxl": "epsilon"}

# SD-family noise schedule shared by all three bases.
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_LATENT_SIZE = 8  # with the VAE's 8x scale: native resolution 64 px, like SD's 64 -> 512
_SDXL_TIME_EMBED_DIM = 8  # real SDXL uses 256; the probe does not look at it
_SDXL_POOLED_DIM = 1280  # width of text_encoder_2's projected (pooled) output


def clip_tokenizer_dir() -> Path:
    """Folder of the packaged CLIP BPE tokenizer, loadable by ``CLIPTokenizer.from_pretrained``."""
    folder = resources.files(__package__ or "invokeai_ti_plugin") / "data" / "clip_tokenizer"
    path = Path(str(folder))
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"packaged CLIP tokenizer missing at {path}")
    return path


def build_tiny_pipeline(path: Path, base: TrainableBase = "sd-1", *, seed: int = 0) -> Path:
    """Write a tiny random-weight diffusers pipeline for ``base`` at ``path`` and return it.

    Acts as an on-disk cache: a folder that already holds ``model_index.json`` is
    returned as is (after checking it is the requested base). The pipeline is built
    in a sibling temporary folder and renamed into place, so a crash or a concurrent
    builder never leaves a half-written pipeline behind.
    """
    if base not in _PIPELINE_CLASS:
        raise ValueError(f"unknown base {base!r}; expected one of {sorted(_PIPELINE_CLASS)}")
    path = Path(path)
    if (path / "model_index.json").is_file():
        _check_existing(path, base)
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists but is not a diffusers pipeline folder")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        pipe = _build_sdxl(seed) if base == "sdxl" else _build_sd(base, seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            if path.is_dir():
                path.rmdir()  # empty placeholder: rename() cannot replace it on every OS
            tmp.rename(path)
        except OSError:
            # Lost a race with another builder; its result is equally valid.
            if not (path / "model_index.json").is_file():
                raise
            _check_existing(path, base)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_existing(path: Path, base: TrainableBase) -> None:
    """Refuse to hand back a cached pipeline of a different base than asked for."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    class_name = index.get("_class_name")
    unet_config = path / "unet" / "config.json"
    cross = None
    if unet_config.is_file():
        cross = json.loads(unet_config.read_text(encoding="utf-8")).get("cross_attention_dim")
    if class_name != _PIPELINE_CLASS[base] or cross != CROSS_ATTENTION_DIMS[base]:
        found = f"{class_name} (cross_attention_dim={cross})"
        raise ValueError(f"{path} holds a {found}, not a tiny {base} pipeline")


def _seeded(seed: int, offset: int) -> None:
    """Seed torch before each module so every component is reproducible on its own."""
    torch.manual_seed(seed * 1000 + offset)


def _text_config(
    hidden: int, *, layers: int, act: str, projection_dim: int | None = None
) -> transformers.CLIPTextConfig:
    """CLIP text config: real width/vocab/positions, everything else minimal."""
    return transformers.CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=64,
        projection_dim=projection_dim if projection_dim is not None else hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        # Real ids, so pooling locates the actual EOS token rather than the argmax id.
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def _vae(seed: int, scaling_factor: float) -> diffusers.AutoencoderKL:
    """Four-block VAE: the real 8x latent scale InvokeAI assumes, so 64 px -> 8x8 latents."""
    _seeded(seed, 3)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _build_sd(base: TrainableBase, seed: int) -> diffusers.StableDiffusionPipeline:
    """SD 1.x (CLIP-L width 768) or SD 2.x (OpenCLIP-H width 1024, v-prediction)."""
    (width,) = TOKEN_DIMS[base]
    sd2 = base == "sd-2"
    _seeded(seed, 1)
    act = "gelu" if sd2 else "quick_gelu"
    text_encoder = transformers.CLIPTextModel(_text_config(width, layers=1, act=act))
    _seeded(seed, 2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=CROSS_ATTENTION_DIMS[base],
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
        use_linear_projection=sd2,
    )
    scheduler = diffusers.PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=_PREDICTION_TYPE[base],
    )
    return diffusers.StableDiffusionPipeline(
        vae=_vae(seed, 0.18215),
        text_encoder=text_encoder,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir()),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int) -> diffusers.StableDiffusionXLPipeline:
    """SDXL base: two text encoders (768 + 1280 with projection), text_time conditioning."""
    # Two layers each: SDXL conditions on the penultimate hidden state, which should be a
    # transformer layer's output rather than the bare embeddings.
    width, width_2 = TOKEN_DIMS["sdxl"]
    _seeded(seed, 1)
    text_encoder = transformers.CLIPTextModel(_text_config(width, layers=2, act="quick_gelu"))
    _seeded(seed, 4)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        _text_config(width_2, layers=2, act="gelu", projection_dim=_SDXL_POOLED_DIM)
    )
    _seeded(seed, 2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        # cross-attention at both levels, so the text conditions the tiny UNet noticeably
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=CROSS_ATTENTION_DIMS["sdxl"],
        transformer_layers_per_block=1,
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_SDXL_POOLED_DIM + 6 * _SDXL_TIME_EMBED_DIM,
    )
    scheduler = diffusers.EulerDiscreteScheduler(
        **_SD_BETAS,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type=_PREDICTION_TYPE["sdxl"],
    )
    tokenizer_dir = clip_tokenizer_dir()
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(seed, 0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


# ---------------------------------------------------------------------------
# Demo training images
# ---------------------------------------------------------------------------

_BACKGROUNDS: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = [
    ((135, 190, 235), (225, 240, 250)),  # sky
    ((60, 130, 70), (150, 200, 120)),  # grass
    ((90, 90, 100), (180, 180, 190)),  # concrete
    ((220, 205, 175), (245, 235, 215)),  # sand
    ((70, 50, 110), (150, 120, 190)),  # dusk
    ((30, 60, 90), (80, 140, 160)),  # sea
]
_RED = (210, 30, 40)
_YELLOW = (250, 205, 40)
_SUPERSAMPLE = 4


def make_demo_images(folder: Path, count: int = 4, size: int = 96, seed: int = 0) -> list[Path]:
    """Draw ``count`` PNGs of one distinctive object (a red-and-yellow striped ball).

    The demo needs a few training images of a single concept without any download;
    the ball keeps its look while background, position, scale and stripe angle vary,
    which is what textual inversion should learn to separate. Deterministic in ``seed``.
    """
    if count < 0 or size < 8:
        raise ValueError("count must be >= 0 and size >= 8")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths: list[Path] = []
    for i in range(count):
        image = _draw_scene(rng, size, _BACKGROUNDS[(i + seed) % len(_BACKGROUNDS)])
        out = folder / f"demo_{i:02d}.png"
        image.save(out, format="PNG")
        paths.append(out)
    return paths


def _draw_scene(
    rng: random.Random, size: int, background: tuple[tuple[int, int, int], tuple[int, int, int]]
) -> Image.Image:
    """Gradient background, a ground band, the ball and its shadow; drawn large then downsampled."""
    big = size * _SUPERSAMPLE
    top, bottom = background
    canvas = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(canvas)
    for y in range(big):
        t = y / (big - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (big, y)], fill=colour)
    horizon = round(big * rng.uniform(0.6, 0.8))
    ground = tuple(max(0, c - 40) for c in bottom)
    draw.rectangle([0, horizon, big, big], fill=ground)

    radius = big * rng.uniform(0.16, 0.3)
    cx = rng.uniform(radius, big - radius)
    cy = min(rng.uniform(big * 0.35, big * 0.75), big - radius - 1)
    shadow = Image.new("L", (big, big), 0)
    ImageDraw.Draw(shadow).ellipse(
        [cx - radius, cy + radius * 0.85, cx + radius, cy + radius * 1.1], fill=110
    )
    shadow = shadow.filter(ImageFilter.GaussianBlur(big / 60))
    canvas.paste((20, 20, 20), mask=shadow)

    ball = _striped_disc(big, cx, cy, radius, rng.uniform(0, math.pi))
    canvas.paste(ball, mask=_disc_mask(big, cx, cy, radius))
    highlight = Image.new("L", (big, big), 0)
    hx, hy, hr = cx - radius * 0.35, cy - radius * 0.4, radius * 0.22
    ImageDraw.Draw(highlight).ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=150)
    highlight = highlight.filter(ImageFilter.GaussianBlur(hr / 2))
    canvas.paste((255, 255, 255), mask=highlight)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _disc_mask(big: int, cx: float, cy: float, radius: float) -> Image.Image:
    """Opaque disc where the ball is."""
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    return mask


def _striped_disc(big: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    """Red bands on yellow at ``angle``, so the ball looks turned differently in each image."""
    stripes = Image.new("RGB", (big, big), _YELLOW)
    draw = ImageDraw.Draw(stripes)
    width = radius / 2.5
    dx, dy = math.cos(angle), math.sin(angle)  # stripe normal
    reach = radius * 1.5
    for k in range(-4, 5, 2):
        c0, c1 = k * width, (k + 1) * width  # band between these offsets along the normal
        band = ((c0, -reach), (c0, reach), (c1, reach), (c1, -reach))
        draw.polygon([(cx + dx * c - dy * t, cy + dy * c + dx * t) for c, t in band], fill=_RED)
    return stripes
