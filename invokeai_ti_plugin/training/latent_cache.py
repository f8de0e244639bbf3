"""Encode every training image once instead of running the VAE on every step.

The VAE is frozen and the only augmentations are an optional flip and a fixed resize/crop, so
each image has at most two possible inputs. Their latent distributions (mean and std) are kept;
drawing `mean + std * noise` per step is exactly what `latent_dist.sample()` would give, so
caching changes the cost, not the training.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class LatentCache:
    """Latent distributions of each image, unflipped (index 0) and flipped (index 1)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float) -> None:
        self.mean = mean  # [N, 2, C, h, w]
        self.std = std
        self.scaling_factor = scaling_factor

    @classmethod
    @torch.no_grad()
    def encode(
        cls, vae: AutoencoderKL, pixels: torch.Tensor, with_flips: bool, chunk: int = 4
    ) -> LatentCache:
        """`pixels` [N, 3, H, W] in [-1, 1]; encoded on the VAE's device and dtype."""
        variants = [pixels, torch.flip(pixels, dims=[-1])] if with_flips else [pixels]
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        for variant in variants:
            for start in range(0, len(variant), chunk):
                batch = variant[start : start + chunk].to(vae.device, vae.dtype)
                dist = vae.encode(batch).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        count = len(pixels)
        mean = torch.cat(means).unflatten(0, (len(variants), count)).transpose(0, 1)
        std = torch.cat(stds).unflatten(0, (len(variants), count)).transpose(0, 1)
        if not with_flips:  # index 1 is never drawn, but keep the layout uniform
            mean, std = mean.expand(-1, 2, -1, -1, -1), std.expand(-1, 2, -1, -1, -1)
        return cls(mean.contiguous(), std.contiguous(), float(vae.config.scaling_factor))

    def sample(
        self, image_index: torch.Tensor, flipped: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scaled latents for a batch, drawn with the run's generator."""
        variant = flipped.long()
        mean = self.mean[image_index.to(self.mean.device), variant.to(self.mean.device)]
        std = self.std[image_index.to(self.std.device), variant.to(self.std.device)]
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        latents = mean.float() + std.float() * noise.to(mean.device)
        return latents * self.scaling_factor
