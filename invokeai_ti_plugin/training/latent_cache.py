"""Encode every training image once instead of running the VAE on every step.

The VAE is frozen and the only augmentations are an optional flip and a fixed resize/crop, so
each image has at most two possible inputs. All of them are encoded before training, before the
UNet comes onto the GPU: the VAE's activations (large at 1024 px, where SDXL's VAE runs in
float32) then never share the GPU with a training step, and the VAE is let go before the memory
plan reads what is free (SDXL on a 12 GiB card failed in a backward pass when they did).
Drawing `mean + std * noise` per step is exactly what `latent_dist.sample()` would give: caching
changes the cost, not the training. Each variant is encoded on its own, so its latent is the
same bits whatever the other images are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL

from .images import to_vae_range


class LatentCache:
    """Latent distributions of each image: [N, variants, C, h, w], variant 1 the mirror image."""

    def __init__(
        self, vae: AutoencoderKL, pixels: Sequence[torch.Tensor], with_flips: bool
    ) -> None:
        """`pixels`: each image [3, H, W] uint8, made float one at a time (never all at once);
        encoded on the VAE's device, in its dtype. The cache keeps no reference to `vae`:
        dropping the caller's frees it."""
        self.scaling_factor = float(vae.config.scaling_factor)
        means, stds = [], []
        with torch.no_grad():
            for image in pixels:
                variants = (image, image.flip(-1)) if with_flips else (image,)
                for variant in variants:
                    scaled = to_vae_range(variant[None]).to(vae.device, vae.dtype)
                    dist = vae.encode(scaled).latent_dist
                    means.append(dist.mean[0])
                    stds.append(dist.std[0])
        shape = (len(pixels), 2 if with_flips else 1, *means[0].shape)
        self.mean = torch.stack(means).reshape(shape)
        self.std = torch.stack(stds).reshape(shape)

    def sample(
        self, image_index: torch.Tensor, flipped: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scaled latents for a batch, drawn with the run's generator."""
        if self.mean.shape[1] == 1 and bool(flipped.any()):  # encoded without mirror images
            raise ValueError("this cache holds no mirrored images")
        device = self.mean.device
        variant = flipped.long().to(device)
        mean = self.mean[image_index.to(device), variant]
        std = self.std[image_index.to(device), variant]
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        latents = mean.float() + std.float() * noise.to(device)
        return latents * self.scaling_factor
