"""Sample grids while training: see the concept appear, and check it before trusting it.

The run's own in-memory model (with the new word's current vectors) drives a diffusers pipeline
with a fast multistep scheduler and few steps, and the same seeds every time, so grids from
different steps differ only by what was learned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from ..atomic_files import write_atomically
from .model_files import ModelParts
from .run_folder import RunFolder

INFERENCE_STEPS = 20


@torch.no_grad()
def render_samples(
    parts: ModelParts,
    text_encoders: list[torch.nn.Module],
    prompt: str,
    count: int,
    resolution: int,
    seed: int,
    device: torch.device,
) -> list[Image.Image]:
    """`count` images of `prompt`, seeds seed, seed+1, ...; the VAE is loaded just for this."""
    scheduler = DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config)
    vae = parts.vae_loader().to(device)
    vae.enable_slicing()  # decode one image at a time: SDXL's decoder needs GiBs per 1024-px image
    common = {"vae": vae, "unet": parts.unet, "scheduler": scheduler}
    if parts.info.is_sdxl:
        pipeline = StableDiffusionXLPipeline(
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            **common,
        )
    else:
        pipeline = StableDiffusionPipeline(
            text_encoder=text_encoders[0],
            tokenizer=parts.tokenizers[0],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **common,
        )
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + index) for index in range(count)]
    # The pipeline makes its prompts and latents in the text encoder's precision, which our fp32
    # vectors make fp32 over a 16-bit UNet: autocast runs the UNet in its own. The VAE decodes
    # outside it, in its own precision (fp32 for SDXL, whose VAE overflows in fp16).
    unet_dtype = parts.unet.dtype
    with torch.autocast(device.type, dtype=unet_dtype, enabled=unet_dtype != torch.float32):
        latents = pipeline(
            [prompt] * count,
            num_inference_steps=INFERENCE_STEPS,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type="latent",
        ).images
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images: list[Image.Image] = pipeline.image_processor.postprocess(decoded, output_type="pil")
    return images


def save_grid(images: list[Image.Image], path: Path) -> None:
    """One row of up to four images per line, written atomically."""
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    write_atomically(path, lambda temp: grid.save(temp, format="PNG"))


def runs_last_grid(out_dir: Path, num_validation_images: int) -> Path | None:
    """The newest sample grid in a run's folder, if the run drew grids at all (an older grid
    left there by an earlier run is not this run's)."""
    return RunFolder(out_dir).newest_sample() if num_validation_images else None


def first_sample(grid: Path, resolution: int) -> Image.Image:
    """The grid's first image, a square of the run's resolution at its top left."""
    with Image.open(grid) as image:
        return image.convert("RGB").crop((0, 0, resolution, resolution))
