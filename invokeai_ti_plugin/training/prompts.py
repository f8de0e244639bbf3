"""Prompts that put the new word in varied contexts.

Varied sentences teach the vector the concept itself rather than one phrasing; object and style
concepts need different sentence shapes ("a photo of X" versus "a painting in the style of X").
"""

from __future__ import annotations

import re
from typing import Literal

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a photo of one {}",
    "a photo of my {}",
    "a good photo of a {}",
    "a clean photo of the {}",
    "a blurry photo of a {}",
    "a rendering of a {}",
    "a picture of the {}",
    "an image showing a {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a photo of the nice {}",
    "a photo of the weird {}",
    "a snapshot of a {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a bright painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "a weird painting in the style of {}",
    "an illustration in the style of {}",
    "artwork in the style of {}",
)


def training_prompts(token_text: str, learnable_property: Literal["object", "style"]) -> list[str]:
    """Every template with the placeholder text put in."""
    templates = OBJECT_TEMPLATES if learnable_property == "object" else STYLE_TEMPLATES
    return [template.format(token_text) for template in templates]


def caption_prompt(caption: str, placeholder: str, token_text: str) -> str:
    """An image's own caption with the new word in it: where the caption puts `{}`, the
    placeholder or the bare trigger word; else in front."""
    if "{}" in caption:
        return caption.replace("{}", token_text)
    if placeholder in caption:
        return caption.replace(placeholder, token_text)
    trigger = re.compile(rf"(?<![\w<-]){re.escape(placeholder.strip('<>'))}(?![\w>-])")
    if trigger.search(caption):
        return trigger.sub(lambda _: token_text, caption)
    return f"{token_text}, {caption}"


def validation_prompt(token_text: str, learnable_property: Literal["object", "style"]) -> str:
    """The default sample prompt: the first template, which reads most plainly."""
    return training_prompts(token_text, learnable_property)[0]
