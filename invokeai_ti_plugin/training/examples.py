"""Which image, orientation and prompt each training example uses.

Draws come from one seeded generator whose state, with the current pass order, goes into every
checkpoint; a resumed run therefore sees the same examples as an uninterrupted one. Every image is
seen once per pass, and the cost per step does not grow with the data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ExampleBatch:
    image_index: torch.Tensor  # [B] long
    flipped: torch.Tensor  # [B] bool
    prompt_index: torch.Tensor  # [B] long


class ExampleSampler:
    """Endless shuffled passes over the images, with a random flip and prompt for each."""

    def __init__(
        self, num_images: int, num_prompts: int, flip: bool, generator: torch.Generator
    ) -> None:
        self.num_images = num_images
        self.num_prompts = num_prompts
        self.flip = flip
        self.generator = generator
        self.order = torch.randperm(num_images, generator=generator)
        self.position = 0

    def next_batch(self, size: int) -> ExampleBatch:
        picked: list[torch.Tensor] = []
        needed = size
        while needed:
            if self.position == self.num_images:
                self.order = torch.randperm(self.num_images, generator=self.generator)
                self.position = 0
            take = min(needed, self.num_images - self.position)
            picked.append(self.order[self.position : self.position + take])
            self.position += take
            needed -= take
        flipped = (
            torch.rand(size, generator=self.generator) < 0.5
            if self.flip
            else torch.zeros(size, dtype=torch.bool)
        )
        prompts = torch.randint(0, self.num_prompts, (size,), generator=self.generator)
        return ExampleBatch(torch.cat(picked), flipped, prompts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "position": self.position,
        }

    @staticmethod
    def is_state(state: dict[str, Any], num_images: int) -> bool:
        """Whether `state` is a whole `state_dict` over `num_images` images (a damaged or
        hostile checkpoint may hold anything)."""
        generator, order, position = (state.get(key) for key in ("generator", "order", "position"))
        return (
            isinstance(generator, torch.Tensor)
            and generator.dtype == torch.uint8
            and isinstance(order, torch.Tensor)
            and order.dtype == torch.long
            and torch.equal(order.sort().values, torch.arange(num_images))
            and isinstance(position, int)
            and 0 <= position <= num_images
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])
