"""Encode every training image once instead of running the VAE on every step.

The VAE is frozen and the only augmentations are an optional flip and a fixed resize/crop, so
each image has at most two possible inputs. Each is encoded the first time training meets it
(so training starts as soon as the first batch is ready), its latent distribution (mean and std)
is kept, and once every variant is in, the VAE is let go. Drawing `mean + std * noise` per step
is exactly what `latent_dist.sample()` would give: caching changes the cost, not the training.
Each variant is encoded on its own: in a batch its latent would depend (in the last bits) on which
other variants training met at the same time, and a resumed run meets them in other groups.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class LatentCache:
    """Latent distributions of each image, unflipped (index 0) and flipped (index 1)."""

    def __init__(self, vae: AutoencoderKL, pixels: torch.Tensor, with_flips: bool) -> None:
        """`pixels` [N, 3, H, W] in [-1, 1]; encoded on the VAE's device, in its dtype."""
        self._vae: AutoencoderKL | None = vae
        self.pixels = pixels
        self.scaling_factor = float(vae.config.scaling_factor)
        self.encoded = torch.zeros(len(pixels), 2, dtype=torch.bool)
        if not with_flips:
            self.encoded[:, 1] = True  # never drawn
        self.mean: torch.Tensor | None = None  # [N, 2, C, h, w], filled as variants come in
        self.std: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return bool(self.encoded.all())

    @torch.no_grad()
    def _encode(self, pairs: list[list[int]]) -> None:
        """Encode (image, flipped) variants one at a time, so each latent is the same bits
        whenever and beside whatever it is encoded."""
        if not pairs:
            return
        assert self._vae is not None
        vae = self._vae
        for index, flipped in pairs:
            pixels = self.pixels[index].flip(-1) if flipped else self.pixels[index]
            dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
            if self.mean is None or self.std is None:
                shape = (len(self.pixels), 2, *dist.mean.shape[1:])
                self.mean = dist.mean.new_zeros(shape)
                self.std = dist.std.new_zeros(shape)
            self.mean[index, flipped] = dist.mean[0]
            self.std[index, flipped] = dist.std[0]
            self.encoded[index, flipped] = True
        if self.complete:
            self._vae = None  # every variant is in: free the VAE's memory

    def sample(
        self, image_index: torch.Tensor, flipped: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scaled latents for a batch, drawn with the run's generator."""
        variant = flipped.long()
        missing = self.encoded[image_index, variant].logical_not()
        if missing.any():
            pairs = torch.stack([image_index[missing], variant[missing]], dim=1).unique(dim=0)
            self._encode(pairs.tolist())
        assert self.mean is not None and self.std is not None
        device = self.mean.device
        mean = self.mean[image_index.to(device), variant.to(device)]
        std = self.std[image_index.to(device), variant.to(device)]
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        latents = mean.float() + std.float() * noise.to(device)
        return latents * self.scaling_factor
