"""From prompts to what the UNet is conditioned on, for one text encoder (SD 1/2) or two (SDXL).

Every prompt is tokenized once, before training; a step only picks rows. SDXL conditions on both
encoders' penultimate hidden states side by side, the second encoder's pooled output, and each
image's original size, crop and target size, as it was trained.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTokenizer

from .images import TrainingImage


class TextConditioning:
    def __init__(
        self,
        tokenizers: list[CLIPTokenizer],
        text_encoders: list[nn.Module],
        prompts: list[str],
        device: torch.device,
    ) -> None:
        self.text_encoders = text_encoders
        self.prompt_ids = [
            tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            for tokenizer in tokenizers
        ]

    def encode(
        self, prompt_rows: torch.Tensor, time_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Hidden states for the UNet, and SDXL's added conditions (None for SD 1/2): one text
        encoder conditions by its last hidden state, SDXL's two as described above."""
        rows = prompt_rows.to(self.prompt_ids[0].device)
        if len(self.text_encoders) == 1:
            return self.text_encoders[0](self.prompt_ids[0][rows])[0], None
        outputs = [
            encoder(ids[rows], output_hidden_states=True)
            for encoder, ids in zip(self.text_encoders, self.prompt_ids, strict=True)
        ]
        hidden = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        assert time_ids is not None
        return hidden, {"text_embeds": outputs[-1].text_embeds, "time_ids": time_ids}


def sdxl_time_ids(images: list[TrainingImage], resolution: int) -> torch.Tensor:
    """[N, 6] per image: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor(
        [[*image.original_size, *image.crop_top_left, resolution, resolution] for image in images],
        dtype=torch.float32,
    )
