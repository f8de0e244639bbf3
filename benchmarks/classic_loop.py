"""The classic textual-inversion loop, re-implemented here as the benchmark's reference.

It follows the widely used recipe our trainer replaces: the whole 49408-row token table is the
trainable parameter (dense gradient and AdamW state for every row), the original rows are copied
back after every update, and the VAE encodes the batch on every step. Everything else (images,
prompts, resolution, batch, learning rate, AdamW settings, precision, seed) is what our trainer
gets, so the timing difference is the recipe's, not the settings'.

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
from transformers import CLIPTextModel, CLIPTokenizer

from invokeai_ti_plugin.training.images import load_training_images
from invokeai_ti_plugin.training.objective import denoising_loss
from invokeai_ti_plugin.training.prompts import training_prompts

StepCallback = Callable[[int, float], None]
"""Called after each complete update (optimizer step and row restore) with step and loss."""


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
    mixed_precision: Literal["no", "fp16"]
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
    cpu: bool = True


class _Examples:
    """Shuffled passes over the images with a random flip and template, as the classic dataset
    (shuffled DataLoader, RandomHorizontalFlip(0.5), random.choice of template) draws them."""

    def __init__(
        self,
        pixels: torch.Tensor,
        prompts: list[str],
        tokenizer: CLIPTokenizer,
        seed: int,
    ) -> None:
        self.pixels = pixels
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        for _ in range(size):
            if not self.order:
                self.order = torch.randperm(len(self.pixels), generator=self.generator).tolist()
            image = self.pixels[self.order.pop()]
            if torch.rand(()) < 0.5:
                image = torch.flip(image, dims=[-1])
            images.append(image)
            # The classic dataset tokenizes each example's prompt as it is drawn.
            ids.append(
                self.tokenizer(
                    random.choice(self.prompts),
                    padding="max_length",
                    truncation=True,
                    max_length=self.tokenizer.model_max_length,
                    return_tensors="pt",
                ).input_ids[0]
            )
        return torch.stack(images), torch.stack(ids)


def train_classic(settings: ClassicSettings, on_step: StepCallback) -> None:
    """Load the model from disk and run `max_steps` classic updates."""
    accelerator = Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
    set_seed(settings.seed)
    folder = str(settings.model_dir)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")

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
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = text_encoder.text_model
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)

    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(),
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
    text_encoder, optimizer, lr_scheduler = accelerator.prepare(
        text_encoder, optimizer, lr_scheduler
    )
    weight_dtype = torch.float16 if settings.mixed_precision == "fp16" else torch.float32
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)

    images = load_training_images(settings.images_dir, settings.resolution, settings.center_crop)
    prompts = training_prompts(settings.placeholder_token, settings.learnable_property)
    examples = _Examples(
        torch.stack([image.pixels for image in images]), prompts, tokenizer, settings.seed
    )
    original_rows = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight.data
    original_rows = original_rows.clone()
    num_timesteps = noise_scheduler.config.num_train_timesteps

    text_encoder.train()
    for step in range(1, settings.max_steps + 1):
        pixels, input_ids = examples.next_batch(settings.batch_size)
        with accelerator.accumulate(text_encoder):
            latents = vae.encode(pixels.to(accelerator.device, dtype=weight_dtype))
            latents = latents.latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, num_timesteps, (len(latents),), device=latents.device)
            hidden_states = text_encoder(input_ids.to(accelerator.device))[0]
            # the same loss as ours: the recipes differ in what they train and cache, not in it
            loss = denoising_loss(unet, noise_scheduler, latents, hidden_states, noise, timesteps)
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            # Put back every row but the new one: only the new word may change.
            index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
            index_no_updates[placeholder_id] = False
            with torch.no_grad():
                table = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight
                table[index_no_updates] = original_rows[index_no_updates]
        on_step(step, float(loss.detach().item()))
