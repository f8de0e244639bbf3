"""Encode every training image once instead of running the VAE on every step.

The VAE is frozen and the only augmentations are an optional flip and a fixed resize/crop, so
each image has at most two possible inputs. Each is encoded the first time training meets it
(so training starts as soon as the first batch is ready), its latent distribution (mean and std)
is kept, and once every variant is in, the VAE is let go. Drawing `mean + std * noise` per step
is exactly what `latent_dist.sample()` would give: caching changes the cost, not the training.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class LatentCache:
    """Latent distributions of each image, unflipped (index 0) and flipped (index 1)."""

    def __init__(
        self, vae: AutoencoderKL, pixels: torch.Tensor, with_flips: bool, chunk: int = 4
    ) -> None:
        """`pixels` [N, 3, H, W] in [-1, 1]; encoded on the VAE's device, in its dtype."""
        self._vae: AutoencoderKL | None = vae
        self.pixels = pixels
        self.chunk = chunk
        self.scaling_factor = float(vae.config.scaling_factor)
        self.encoded = torch.zeros(len(pixels), 2, dtype=torch.bool)
        if not with_flips:
            self.encoded[:, 1] = True  # never drawn
        self.mean: torch.Tensor | None = None  # [N, 2, C, h, w], filled as variants come in
        self.std: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return bool(self.encoded.all())

    def encode_all(self) -> None:
        self._encode(self.encoded.logical_not().nonzero().tolist())

    @torch.no_grad()
    def _encode(self, pairs: list[list[int]]) -> None:
        if not pairs:
            return
        assert self._vae is not None
        vae = self._vae
        for start in range(0, len(pairs), self.chunk):
            part = pairs[start : start + self.chunk]
            batch = torch.stack(
                [self.pixels[i].flip(-1) if flipped else self.pixels[i] for i, flipped in part]
            )
            dist = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
            if self.mean is None or self.std is None:
                shape = (len(self.pixels), 2, *dist.mean.shape[1:])
                self.mean = dist.mean.new_zeros(shape)
                self.std = dist.std.new_zeros(shape)
            rows = torch.tensor([i for i, _ in part])
            variants = torch.tensor([flipped for _, flipped in part])
            self.mean[rows, variants] = dist.mean
            self.std[rows, variants] = dist.std
            self.encoded[rows, variants] = True
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
