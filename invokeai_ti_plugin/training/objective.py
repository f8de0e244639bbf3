"""The denoising loss, shared by the trainer, its tests and the benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel


def denoising_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the target its scheduler was trained for.

    The target follows `prediction_type`: the noise for epsilon models (SD 1.x, SD 2 base), the
    velocity for v-prediction models (SD 2.x 768-px).
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    dtype = unet.dtype
    if added_cond_kwargs is not None:  # SDXL: pooled text and size/crop conditioning
        added_cond_kwargs = {key: value.to(dtype) for key, value in added_cond_kwargs.items()}
    prediction = unet(
        noisy.to(dtype),
        timesteps,
        encoder_hidden_states.to(dtype),
        added_cond_kwargs=added_cond_kwargs,
    ).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
