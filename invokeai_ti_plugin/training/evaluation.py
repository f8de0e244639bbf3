"""The fixed-noise evaluation loss: a curve that moves only when the embedding does.

The training loss jumps from step to step with its random images, timesteps and noise, so it
says little about progress. This loss is the mean denoising error over every training image and
its mirror, at fixed timesteps (stratified over the whole schedule) with fixed noise and fixed
prompts, the same at every measurement of a run. It draws from its own generator, so measuring
it leaves the training's random stream, and so the trained vectors, exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from .latent_cache import LatentCache
from .objective import denoising_loss
from .text_conditioning import TextConditioning

TIMESTEPS_PER_VARIANT = 4  # per image and orientation: 8 denoising passes per image
_SEED = 1_000_003  # the same examples in every run, whatever its --seed


@dataclass(frozen=True)
class _Examples:
    """What each evaluation example denoises: an image variant, a prompt row, a timestep."""

    image_index: torch.Tensor  # [M] long
    flipped: torch.Tensor  # [M] bool
    prompt_row: torch.Tensor  # [M] long
    timesteps: torch.Tensor  # [M] long


def fixed_examples(
    caption_row: torch.Tensor, num_templates: int, num_timesteps: int
) -> _Examples:
    """Every image, unflipped and flipped, TIMESTEPS_PER_VARIANT times; its caption's prompt
    row, or the templates in turn; timesteps spread evenly over the schedule (one in each of M
    equal strata, shuffled), so all noise levels count alike."""
    num_images = len(caption_row)
    repeats = 2 * TIMESTEPS_PER_VARIANT
    count = num_images * repeats
    generator = torch.Generator().manual_seed(_SEED)
    strata = (torch.arange(count) + torch.rand(count, generator=generator)) / count
    timesteps = (strata * num_timesteps).long().clamp(max=num_timesteps - 1)
    timesteps = timesteps[torch.randperm(count, generator=generator)]
    image_index = torch.arange(num_images).repeat_interleave(repeats)
    flipped = (torch.arange(count) // TIMESTEPS_PER_VARIANT) % 2 == 1
    own = caption_row[image_index]
    prompt_row = torch.where(own >= 0, own, torch.arange(count) % num_templates)
    return _Examples(image_index, flipped, prompt_row, timesteps)


class FixedEvaluation:
    """Measures the evaluation loss of the vectors the text encoders hold now."""

    def __init__(
        self,
        examples: _Examples,
        latents: LatentCache,
        conditioning: TextConditioning,  # over the unwrapped encoders: no collective calls
        time_ids: torch.Tensor,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.examples = examples
        self.latents = latents
        self.conditioning = conditioning
        self.time_ids = time_ids
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def measure(self) -> float:
        """The mean loss over every example; each example's latent and noise are drawn on
        their own from a generator seeded afresh, so the batch size changes nothing drawn."""
        generator = torch.Generator().manual_seed(_SEED + 1)
        examples = self.examples
        total = 0.0
        for chunk in torch.arange(len(examples.timesteps)).split(self.batch_size):
            latents, noise = [], []
            for index in chunk.tolist():
                picked = slice(index, index + 1)
                latent = self.latents.sample(
                    examples.image_index[picked], examples.flipped[picked], generator
                )
                latents.append(latent)
                noise.append(torch.randn(latent.shape, generator=generator))
            images = examples.image_index[chunk]
            hidden, added = self.conditioning.encode(
                examples.prompt_row[chunk], self.time_ids[images.to(self.time_ids.device)]
            )
            loss = denoising_loss(
                self.unet,
                self.noise_scheduler,
                torch.cat(latents).to(self.device),
                hidden,
                torch.cat(noise).to(self.device),
                examples.timesteps[chunk].to(self.device),
                added,
            )
            total += float(loss) * len(chunk)
        return total / len(examples.timesteps)


@dataclass
class EvaluationRecord:
    """The measurements that matter later: the first, the last and the best (with the vectors
    it was measured on). Goes into every checkpoint, so a resumed run knows its best."""

    start: float | None = None  # before the first update
    last_step: int | None = None
    last: float | None = None
    best_step: int | None = None
    best: float | None = None
    best_vectors: dict[str, torch.Tensor] | None = None

    def add(self, step: int, value: float, vectors: dict[str, torch.Tensor]) -> bool:
        """Record a measurement; True when it is a new best (ties keep the earlier one)."""
        if step == 0:
            self.start = value
        self.last_step, self.last = step, value
        if self.best is not None and not value < self.best:
            return False
        self.best_step, self.best = step, value
        self.best_vectors = {key: tensor.detach().cpu().clone() for key, tensor in vectors.items()}
        return True

    def state_dict(self) -> dict[str, Any]:
        """The JSON-safe part (the best vectors are stored beside it, as an embedding file)."""
        return {
            "start": self.start,
            "last_step": self.last_step,
            "last": self.last,
            "best_step": self.best_step,
            "best": self.best,
        }

    def load_state_dict(
        self, state: Any, best_vectors: dict[str, torch.Tensor] | None
    ) -> None:
        """Restore from a checkpoint, which may be damaged or forged: wrong types are a
        TypeError, missing best vectors a ValueError."""
        if not isinstance(state, dict):
            raise TypeError(f"the evaluation record is a {type(state).__name__}, not a mapping")
        steps = [state.get(key) for key in ("last_step", "best_step")]
        values = [state.get(key) for key in ("start", "last", "best")]
        if not all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in steps):
            raise TypeError("the evaluation record's steps are not whole numbers")
        if not all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in values):
            raise TypeError("the evaluation record's losses are not finite numbers")
        if (state.get("best_step") is None) != (best_vectors is None):
            raise ValueError("the evaluation record and its best vectors do not go together")
        self.start, self.last_step, self.last = state["start"], steps[0], state["last"]
        self.best_step, self.best, self.best_vectors = steps[1], state["best"], best_vectors

    def summary(self, best_file: str | None) -> dict[str, Any]:
        """What embedding.json says about the evaluation loss."""
        return {**self.state_dict(), "best_embedding": best_file}
