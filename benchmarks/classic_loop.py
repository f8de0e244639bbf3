"""The classic textual-inversion loop, re-implemented here as the benchmark's reference.

It follows the widely used recipe our trainer replaces: the whole 49408-row token table is the
trainable parameter (dense gradient and AdamW state for every row), the original rows are copied
back after every update, and the VAE encodes the batch on every step. Everything else (images,
prompts, resolution, batch, learning rate, AdamW settings, precision, seed) is what our trainer
gets, so the timing difference is the recipe's, not the settings'.

For SDXL it follows diffusers' textual_inversion_sdxl.py with both text encoders trained (their
whole token tables, each kept in float32), conditioning on both encoders' penultimate hidden
states, the second one's pooled output and the images' size and crop.

One deliberate kindness to the reference: its images are decoded and resized once up front (with
our own `load_training_images`), not re-read from disk on every step, so it never loses time to
image decoding that a careful implementation could also avoid.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from invokeai_ti_plugin.training.images import load_training_images, to_vae_range
from invokeai_ti_plugin.training.model_files import text_model
from invokeai_ti_plugin.training.objective import denoising_loss
from invokeai_ti_plugin.training.prompts import training_prompts
from invokeai_ti_plugin.training.text_conditioning import sdxl_time_ids

StepCallback = Callable[[int, float], bool]
"""Called after each complete update (optimizer step and row restore) with step and loss;
returns True to stop there."""

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ClassicSettings:
    """The run's settings; the benchmark fills them from the same values it gives our trainer."""

    model_dir: Path
    images_dir: Path
    resolution: int
    batch_size: int
    max_steps: int
    learning_rate: float
    seed: int
    mixed_precision: Literal["no", "fp16", "bf16"]
    placeholder_token: str
    initializer_token: str
    learnable_property: Literal["object", "style"]
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    center_crop: bool = False
    gradient_checkpointing: bool = False
    cpu: bool = True


@dataclass(frozen=True)
class _Batch:
    pixels: torch.Tensor
    input_ids: list[torch.Tensor]  # one [B, 77] per tokenizer
    image_index: torch.Tensor


class _Examples:
    """Shuffled passes over the images with a random flip and template, as the classic dataset
    (shuffled DataLoader, RandomHorizontalFlip(0.5), random.choice of template) draws them."""

    def __init__(
        self,
        pixels: torch.Tensor,
        prompts: list[str],
        tokenizers: list[CLIPTokenizer],
        seed: int,
    ) -> None:
        self.pixels = pixels
        self.prompts = prompts
        self.tokenizers = tokenizers
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self, size: int) -> _Batch:
        images: list[torch.Tensor] = []
        indices: list[int] = []
        ids: list[list[torch.Tensor]] = [[] for _ in self.tokenizers]
        for _ in range(size):
            if not self.order:
                self.order = torch.randperm(len(self.pixels), generator=self.generator).tolist()
            index = self.order.pop()
            image = self.pixels[index]
            if torch.rand(()) < 0.5:
                image = torch.flip(image, dims=[-1])
            images.append(image)
            indices.append(index)
            # The classic dataset tokenizes each example's prompt as it is drawn.
            prompt = random.choice(self.prompts)
            for tokenizer, rows in zip(self.tokenizers, ids, strict=True):
                rows.append(
                    tokenizer(
                        prompt,
                        padding="max_length",
                        truncation=True,
                        max_length=tokenizer.model_max_length,
                        return_tensors="pt",
                    ).input_ids[0]
                )
        return _Batch(
            torch.stack(images), [torch.stack(rows) for rows in ids], torch.tensor(indices)
        )


def _add_placeholder(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, settings: ClassicSettings
) -> int:
    """Add the new token, grow the token table by its row and start it at the initializer's."""
    if tokenizer.add_tokens([settings.placeholder_token]) != 1:
        raise ValueError(f"{settings.placeholder_token!r} is already in the tokenizer")
    initializer_ids = tokenizer.encode(settings.initializer_token, add_special_tokens=False)
    if len(initializer_ids) != 1:
        raise ValueError(f"{settings.initializer_token!r} is not a single token")
    placeholder_id = int(tokenizer.convert_tokens_to_ids(settings.placeholder_token))
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        token_embeds[placeholder_id] = token_embeds[initializer_ids[0]].clone()
    # Everything is frozen except the token table, which trains in full.
    inner = text_model(text_encoder)
    inner.encoder.requires_grad_(False)
    inner.final_layer_norm.requires_grad_(False)
    inner.embeddings.position_embedding.requires_grad_(False)
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        text_encoder.text_projection.requires_grad_(False)
    return placeholder_id


def train_classic(settings: ClassicSettings, on_step: StepCallback) -> None:
    """Load the model from disk and run up to `max_steps` classic updates."""
    accelerator = Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
    set_seed(settings.seed)
    folder = str(settings.model_dir)
    sdxl = (settings.model_dir / "text_encoder_2").is_dir()
    suffixes = ["", "_2"] if sdxl else [""]
    tokenizers = [
        CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{suffix}") for suffix in suffixes
    ]
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoders = [
        encoder_class.from_pretrained(folder, subfolder=f"text_encoder{suffix}")
        for encoder_class, suffix in zip(
            [CLIPTextModel, CLIPTextModelWithProjection], suffixes, strict=False
        )
    ]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")

    placeholder_ids = [
        _add_placeholder(tokenizer, encoder, settings)
        for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True)
    ]
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    if settings.gradient_checkpointing:  # as the recipe's --gradient_checkpointing does
        unet.train()
        unet.enable_gradient_checkpointing()
        for encoder in text_encoders:
            encoder.gradient_checkpointing_enable()

    optimizer = torch.optim.AdamW(
        [encoder.get_input_embeddings().weight for encoder in text_encoders],
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=settings.max_steps,
    )
    *text_encoders, optimizer, lr_scheduler = accelerator.prepare(
        *text_encoders, optimizer, lr_scheduler
    )
    weight_dtype = _DTYPES[settings.mixed_precision]
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)

    images = load_training_images(settings.images_dir, settings.resolution, settings.center_crop)
    prompts = training_prompts(settings.placeholder_token, settings.learnable_property)
    examples = _Examples(
        torch.stack([image.pixels for image in images]), prompts, tokenizers, settings.seed
    )
    tables = [
        accelerator.unwrap_model(encoder).get_input_embeddings().weight for encoder in text_encoders
    ]
    original_rows = [table.data.clone() for table in tables]
    time_ids = sdxl_time_ids(images, settings.resolution).to(accelerator.device)
    num_timesteps = noise_scheduler.config.num_train_timesteps

    for encoder in text_encoders:
        encoder.train()
    for step in range(1, settings.max_steps + 1):
        batch = examples.next_batch(settings.batch_size)
        with accelerator.accumulate(*text_encoders):
            pixels = to_vae_range(batch.pixels)  # the classic dataset's float pixels
            latents = vae.encode(pixels.to(accelerator.device, dtype=weight_dtype))
            latents = latents.latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, num_timesteps, (len(latents),), device=latents.device)
            input_ids = [ids.to(accelerator.device) for ids in batch.input_ids]
            added: dict[str, torch.Tensor] | None = None
            if sdxl:
                outputs = [
                    encoder(ids, output_hidden_states=True)
                    for encoder, ids in zip(text_encoders, input_ids, strict=True)
                ]
                hidden_states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
                added = {
                    "text_embeds": outputs[1].text_embeds,
                    "time_ids": time_ids[batch.image_index.to(accelerator.device)],
                }
            else:
                hidden_states = text_encoders[0](input_ids[0])[0]
            # the same loss as ours: the recipes differ in what they train and cache, not in it
            loss = denoising_loss(
                unet, noise_scheduler, latents, hidden_states, noise, timesteps, added
            )
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            # Put back every row but the new one: only the new word may change.
            with torch.no_grad():
                for table, original, placeholder_id in zip(
                    tables, original_rows, placeholder_ids, strict=True
                ):
                    index_no_updates = torch.ones((len(table),), dtype=torch.bool)
                    index_no_updates[placeholder_id] = False
                    table[index_no_updates] = original[index_no_updates]
        if on_step(step, float(loss.detach().item())):
            break
